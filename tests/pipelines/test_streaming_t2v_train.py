"""Training StreamingT2V's memories and the open_clip shapes model, at toy sizes on the CPU: a few steps, the base
frozen, resume equal to an uninterrupted run, atomic checkpoints, exports that load."""

import os

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipelines as tp
from accel.pipelines.streaming_t2v import load_image_encoder, train as training
from accel.pipelines.streaming_t2v.shapes import ShapesStreamingT2VPipeline
from accel.pipelines.streaming_t2v.train import CLIP_ARCH, CLIP_CHECKPOINT, TrainConfig, train


def _clip_config(**kw) -> TrainConfig:
    return TrainConfig(**{"kind": "clip", "steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1,
                          "checkpoint_every": 1, **kw})


def _streaming_config(clip: str | None, **kw) -> TrainConfig:
    return TrainConfig(**{"kind": "streaming", "steps": 2, "batch_size": 2, "lr": 1e-3, "base": "tiny", "clip": clip,
                          "cam_blocks": 1, "max_start": 8, "log_every": 1, "checkpoint_every": 1, **kw})


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    """The open_clip shapes model after two steps: ACCEL_CLIP's value for it."""
    out = tmp_path_factory.mktemp("clip")
    train(_clip_config(), str(out))
    return f"{CLIP_ARCH}:{out / 'model' / CLIP_CHECKPOINT}"


def _checkpoint(out) -> dict:
    return load_file(os.path.join(out, "checkpoint.safetensors"))


def test_clip_model_trains_and_loads_through_open_clip(clip_spec):
    encoder = load_image_encoder(clip_spec)
    assert encoder.embed_dim == training.CLIP_CONFIG["embed_dim"]
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, encoder.embed_dim)


def test_streaming_training_freezes_the_base_and_exports_a_pipeline(tmp_path, clip_spec):
    base = tp.shapes_video()
    frozen = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    report = train(_streaming_config(clip_spec), str(tmp_path), base=base)
    assert report["steps_done"] == 2 and len(report["losses"]) == 2
    assert all(torch.equal(v, base.transformer.state_dict()[k]) for k, v in frozen.items())
    pipe = ShapesStreamingT2VPipeline.from_pretrained(tmp_path / "model", image_encoder=load_image_encoder(clip_spec))
    assert not torch.equal(pipe.cam.fusions[0].to_out.weight, torch.zeros_like(pipe.cam.fusions[0].to_out.weight))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle moving left", num_chunks=2, num_inference_steps=1).frames
    assert frames.shape == (1, 24, 32, 32, 3)


@pytest.mark.parametrize("kind", ["clip", "streaming"])
def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path, clip_spec, kind):
    config = (lambda **kw: _clip_config(**kw)) if kind == "clip" else (lambda **kw: _streaming_config(clip_spec, **kw))
    base = (lambda: None) if kind == "clip" else tp.shapes_video
    train(config(steps=3), str(tmp_path / "whole"), base=base())
    train(config(steps=1), str(tmp_path / "parts"), base=base())
    train(config(steps=3), str(tmp_path / "parts"), base=base())
    whole, parts = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    train(_clip_config(steps=1), str(tmp_path))
    before = _checkpoint(tmp_path)

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(training, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(_clip_config(steps=2), str(tmp_path))
    after = _checkpoint(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resuming_with_another_configuration_is_refused(tmp_path):
    train(_clip_config(steps=1), str(tmp_path))
    with pytest.raises(ValueError, match="another configuration"):
        train(_clip_config(steps=2, lr=2e-3), str(tmp_path))


@pytest.mark.parametrize("change, match", [
    ({"kind": "video"}, "kind must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"overlap_frames": 16}, "overlap_frames must be in"),
    ({"lr": 0.0}, "lr must be > 0"),
])
def test_bad_configurations_are_refused_before_any_work(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train(_clip_config(**change), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_the_command_line_reports_bad_options_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["clip", "--out", str(tmp_path), "--clip", "x:y"])
    assert exit_info.value.code == 2
    assert "--clip and --base are for the streaming kind" in capsys.readouterr().err
