import json
import os

import pytest
import torch
from safetensors.torch import load_file

from accel.pipelines.shapes.data import video_batch
from accel.pipelines.shapes.train import TrainConfig, _noised, train


def _weights(folder):
    return load_file(str(folder / "checkpoint" / "state.safetensors"))


def test_resumed_training_equals_uninterrupted(tmp_path):
    cfg = dict(kind="classifier", batch_size=8, lr=1e-3, log_every=1, checkpoint_every=2)
    train(TrainConfig(steps=4, **cfg), str(tmp_path / "straight"))
    train(TrainConfig(steps=2, **cfg), str(tmp_path / "resumed"))
    report = train(TrainConfig(steps=4, **cfg), str(tmp_path / "resumed"))  # picks up the step-2 checkpoint
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in report["losses"]] == [1, 2, 3, 4]
    assert json.load(open(tmp_path / "resumed" / "training.json"))["config"]["steps"] == 4
    assert (tmp_path / "resumed" / "model" / "config.json").exists()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "resumed").iterdir())


@pytest.mark.parametrize("kind", ["image", "video"])
def test_resumed_training_of_models_with_dropout_equals_uninterrupted(tmp_path, kind):
    cfg = dict(kind=kind, batch_size=2, lr=1e-3, log_every=1, checkpoint_every=1)
    train(TrainConfig(steps=2, **cfg), str(tmp_path / "straight"))
    train(TrainConfig(steps=1, **cfg), str(tmp_path / "resumed"))
    train(TrainConfig(steps=2, **cfg), str(tmp_path / "resumed"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_while_the_old_checkpoint_is_aside_keeps_it(tmp_path, monkeypatch):
    from accel.pipelines.shapes.train import _existing, _replace_folder

    for name in ("checkpoint.old", "checkpoint.tmp"):  # what a stop between the two renames leaves, and a new save
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")

    def stop_at_the_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stop_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        _replace_folder(str(tmp_path / "checkpoint.tmp"), str(tmp_path / "checkpoint"))
    assert _existing(str(tmp_path / "checkpoint")) == str(tmp_path / "checkpoint.old")


def test_flow_matching_models_train_a_step(tmp_path):
    for kind in ("image", "video"):
        report = train(TrainConfig(kind=kind, steps=1, batch_size=2, lr=1e-4, log_every=1), str(tmp_path / kind))
        assert torch.isfinite(torch.tensor(report["losses"][0][1]))
        assert (tmp_path / kind / "model" / "model_index.json").exists()


def test_time_budget_stops_early_with_a_resumable_checkpoint(tmp_path):
    cfg = dict(kind="classifier", steps=50, batch_size=4, lr=1e-3, log_every=1)
    report = train(TrainConfig(max_minutes=0.0, **cfg), str(tmp_path))
    assert report["steps_done"] == 0 and (tmp_path / "checkpoint" / "state.json").exists()
    assert (tmp_path / "model" / "config.json").exists()


def test_init_continues_from_an_exported_model_and_records_its_history(tmp_path):
    for kind in ("classifier", "video"):
        cfg = dict(kind=kind, batch_size=4, lr=1e-3, log_every=1)
        train(TrainConfig(steps=2, **cfg), str(tmp_path / kind / "first"))
        first = tmp_path / kind / "first" / "model"
        report = train(TrainConfig(steps=0, init=str(first), **cfg), str(tmp_path / kind / "second"))  # exports the init
        assert report["init_training"]["steps_done"] == 2
        second = tmp_path / kind / "second" / "model"
        for file in first.rglob("*.safetensors"):
            a, b = load_file(str(file)), load_file(str(second / file.relative_to(first)))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_refuses_weights_of_another_model(tmp_path):
    train(TrainConfig(kind="classifier", steps=1, batch_size=4, lr=1e-3), str(tmp_path / "classifier"))
    with pytest.raises(ValueError, match="does not fit"):
        train(TrainConfig(kind="image", steps=1, batch_size=2, lr=1e-3, init=str(tmp_path / "classifier" / "model")),
              str(tmp_path / "image"))


def test_a_resumed_run_gets_its_own_time_budget_and_refuses_another_configuration(tmp_path):
    cfg = dict(kind="classifier", batch_size=4, lr=1e-3, log_every=1)
    assert train(TrainConfig(steps=2, max_minutes=5, **cfg), str(tmp_path))["steps_done"] == 2
    assert train(TrainConfig(steps=4, max_minutes=5, **cfg), str(tmp_path))["steps_done"] == 4  # 2 more
    with pytest.raises(ValueError, match="another configuration"):
        train(TrainConfig(steps=6, seed=1, **cfg), str(tmp_path))


def test_a_run_stopped_while_replacing_its_checkpoint_resumes_from_the_old_one(tmp_path, monkeypatch):
    from accel.pipelines.shapes import train as train_module

    cfg = dict(kind="classifier", batch_size=4, lr=1e-3, log_every=1)
    train(TrainConfig(steps=2, **cfg), str(tmp_path))
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # killed between the two renames
    steps_run = []
    loss = train_module._classifier_loss
    monkeypatch.setattr(train_module, "_classifier_loss", lambda *a: steps_run.append(a[1]) or loss(*a))
    assert train(TrainConfig(steps=3, **cfg), str(tmp_path))["steps_done"] == 3
    assert steps_run == [2]  # resumed after step 2, not restarted
    assert (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint.old").exists()


def _save_older_video_pipeline(folder, in_channels=3):
    """A shapes video pipeline from before some position channels (random weights): 3 input channels read the
    latents alone, 4 the frame too. Returns its transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from accel.pipelines.shapes.models import video_transformer
    from accel.pipelines.shapes.pipelines import ShapesVideoPipeline
    from accel.pipelines.shapes.text import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    encoder = build_text_encoder()
    old = WanTransformer3DModel.from_config({**video_transformer(encoder.config.d_model).config, "in_channels": in_channels})
    ShapesVideoPipeline(old, encoder, build_tokenizer(), FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    return old


@pytest.mark.parametrize("in_channels", [3, 4])
def test_init_from_a_video_model_with_fewer_position_channels_starts_out_as_that_model(tmp_path, in_channels):
    from diffusers import WanTransformer3DModel

    from accel.pipelines.shapes.models import with_positions

    old = _save_older_video_pipeline(tmp_path / "old", in_channels)
    train(TrainConfig(kind="video", steps=0, batch_size=2, lr=1e-3, init=str(tmp_path / "old")), str(tmp_path / "new"))
    new = WanTransformer3DModel.from_pretrained(tmp_path / "new" / "model" / "transformer").float()
    assert new.config.in_channels == 6
    x, text, t = torch.randn(2, 3, 17, 32, 32), torch.randn(2, 8, old.config.text_dim), torch.tensor([500.0, 900.0])
    old = old.half().float()  # exported in float16
    with torch.no_grad():
        expected = old(with_positions(old, x), timestep=t, encoder_hidden_states=text).sample
        actual = new(with_positions(new, x), timestep=t, encoder_hidden_states=text).sample
    torch.testing.assert_close(actual, expected)


def test_the_long_video_loss_weighs_the_chunk_without_memory_as_all_the_others():
    from accel.pipelines.shapes.train import FIRST_CHUNK_SHARE, _weigh_chunk_losses

    losses = [torch.tensor(x) for x in (4.0, 1.0, 2.0, 3.0)]
    assert FIRST_CHUNK_SHARE == 0.5
    assert _weigh_chunk_losses(losses, start=0).item() == 3.0  # (4 + mean(1, 2, 3)) / 2
    assert _weigh_chunk_losses(losses[1:], start=8).item() == 2.0  # a context-only first chunk: plain mean


def test_motion_trail_reaches_the_video_data_and_is_part_of_the_run(tmp_path, monkeypatch):
    from accel.pipelines.shapes import train as train_module

    asked = []

    def recording_video_batch(*args, trail=False, **kwargs):
        asked.append(trail)
        return video_batch(*args, trail=trail, **kwargs)

    monkeypatch.setattr(train_module, "video_batch", recording_video_batch)
    train(TrainConfig(kind="video", steps=1, batch_size=2, lr=1e-3, motion_trail=True), str(tmp_path / "trail"))
    assert asked == [True]
    assert json.load(open(tmp_path / "trail" / "training.json"))["config"]["motion_trail"] is True
    with pytest.raises(ValueError, match="another configuration"):  # resuming it without trails would mix two data sets
        train(TrainConfig(kind="video", steps=2, batch_size=2, lr=1e-3), str(tmp_path / "trail"))
    with pytest.raises(ValueError, match="video model's data"):
        train(TrainConfig(kind="classifier", steps=1, batch_size=4, lr=1e-3, motion_trail=True), str(tmp_path / "x"))


def test_a_high_noise_share_trains_that_share_in_the_top_tenth_of_noise(tmp_path):
    x0 = torch.zeros(8192, 1)
    plain = _noised(x0, torch.Generator().manual_seed(0))[1]  # as before the option existed
    quarter = _noised(x0, torch.Generator().manual_seed(0), high_noise_share=0.25)[1]
    top = (quarter >= 0.9).float().mean()
    assert abs(top - (0.25 + 0.75 * (plain >= 0.9).float().mean())) < 0.02 and quarter.max() < 1
    assert torch.equal(quarter[quarter < 0.9], plain[quarter < 0.9])  # the other samples keep their levels
    for bad, message in ((dict(kind="video", high_noise_share=1.0), r"in \[0, 1\)"),
                         (dict(kind="classifier", high_noise_share=0.25), "diffusion models")):
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(steps=1, batch_size=2, lr=1e-3, **bad), str(tmp_path / "x"))


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(tmp_path):
    cfg = dict(kind="classifier", batch_size=4, lr=1e-3, checkpoint_every=1)
    train(TrainConfig(steps=1, **cfg), str(tmp_path))
    state = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    for option in ("motion_trail", "high_noise_share"):
        del meta["config"][option]
    state.write_text(json.dumps(meta))
    assert train(TrainConfig(steps=2, **cfg), str(tmp_path))["steps_done"] == 2
