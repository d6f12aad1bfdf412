"""The shapes long-video pipeline and its training on random-init weights (the shipped weights: test_reference)."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import accel
from accel.pipelines.long_sana_video import CausalSanaVideoTransformer3DModel
from accel.pipelines.shapes.long_video import CHUNK_FRAMES, ShapesLongVideoPipeline, long_video_transformer
from accel.pipelines.shapes.text import build_text_encoder, build_tokenizer
from accel.pipelines.shapes.train import TrainConfig, train


@pytest.fixture(scope="module")
def pipe():
    """The shipped architecture at toy width: the Triton interpreter runs its attention in these tests."""
    torch.manual_seed(0)
    config = dict(long_video_transformer(64).config, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32)
    transformer = CausalSanaVideoTransformer3DModel.from_config(config).eval()
    pipe = ShapesLongVideoPipeline(transformer, build_text_encoder().eval(), build_tokenizer(), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompt="a red circle moving left", **kw):
    kw.setdefault("num_chunks", 2)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw)


def test_generates_whole_chunks_of_frames_in_range(pipe, caplog):
    frames = _run(pipe, ["a red circle moving left", "a blue cross moving up"], num_chunks=3).frames
    assert frames.shape == (2, 3 * CHUNK_FRAMES, 32, 32, 3) and 0 <= frames.min() and frames.max() <= 1
    with caplog.at_level(logging.WARNING, logger="accel"):
        rounded = _run(pipe, num_chunks=None, num_frames=CHUNK_FRAMES + 1)
    assert rounded.num_chunks == 2 and "rounded" in caplog.text


def test_earlier_chunks_do_not_depend_on_later_ones(pipe):
    short, long = _run(pipe, num_chunks=1).frames, _run(pipe, num_chunks=3).frames
    np.testing.assert_allclose(long[:, :CHUNK_FRAMES], short, atol=1e-6)


@pytest.mark.parametrize("kw, error, match", [(dict(prompt="a red circle moving sideways"), ValueError, "directions"),
                                              (dict(prompt=""), ValueError, "non-empty"),
                                              (dict(prompt=[]), ValueError, "non-empty"),
                                              (dict(prompt=None), TypeError, "caption"),
                                              (dict(negative_prompt="blurry"), ValueError, "captions only")])
def test_bad_input_is_refused(pipe, kw, error, match):
    with pytest.raises(error, match=match):
        _run(pipe, **kw)


def test_cg_taylor_that_skips_nothing_changes_nothing(pipe):
    base = _run(pipe).frames
    with accel.patch(pipe, method="cg_taylor", threshold=0.0):
        np.testing.assert_array_equal(_run(pipe).frames, base)


def test_a_trained_step_exports_a_pipeline_that_reloads_identically(tmp_path):
    report = train(TrainConfig(kind="long-video", steps=1, batch_size=2, lr=1e-4, log_every=1), str(tmp_path))
    assert np.isfinite(report["losses"][0][1])
    loaded = ShapesLongVideoPipeline.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert isinstance(loaded.transformer, CausalSanaVideoTransformer3DModel)
    loaded.save_pretrained(tmp_path / "again")
    again = ShapesLongVideoPipeline.from_pretrained(tmp_path / "again", dtype=torch.float32)
    for name in ("transformer", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.transformer.config) == public(again.transformer.config)


def test_the_eval_harness_runs_a_saved_long_video_pipeline(pipe, tmp_path, capsys):
    from accel.eval.harness.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a red circle moving left\n")
    argv = ["run", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
            "--method", "cg_taylor:threshold=0", "--repeats", "1"]
    assert main([*argv, "--out", str(tmp_path / "no-frames")]) == 2
    assert "give --frames" in capsys.readouterr().err
    assert main([*argv, "--frames", str(2 * CHUNK_FRAMES), "--out", str(tmp_path / "run")]) == 0
    rows = {r["config"]: r for r in json.load(open(tmp_path / "run" / "results.json"))["rows"]}
    assert rows["cg_taylor(threshold=0)"]["psnr"] == float("inf")  # skips nothing: changes nothing
    assert rows["cg_taylor(threshold=0)"]["computed_share"] == 1.0
    sample = json.load(open(next((tmp_path / "run" / "samples").glob("cg_taylor*/*.json"))))
    assert (sample["generations"], sample["steps"]) == (2, 4)  # both chunks' steps, not the last chunk's


def _long_video_loss_call_by_call(model, step, cfg):
    """The long-video loss as the pipeline runs: a separate call per noisy pass and per memory write."""
    from accel.pipelines.shapes import train as t

    rng = torch.Generator().manual_seed(t._step_seed(cfg, step, stream=1))
    start = 0 if torch.rand(1, generator=rng) < t.FROM_PATH_START else int(torch.randint(CHUNK_FRAMES, 12 * CHUNK_FRAMES, (1,), generator=rng))
    batch = t.video_batch(cfg.seed, step, cfg.batch_size, frames=t.LONG_CHUNKS * CHUNK_FRAMES, start=start)
    g = torch.Generator().manual_seed(t._step_seed(cfg, step))
    text = model.embed(batch.captions, torch.rand(cfg.batch_size, generator=g) < 0.1, "cpu")
    memory = model.transformer.new_memory(track_gradients=True)
    memory.frames = int(torch.randint(0, 256, (1,), generator=rng))
    zero, losses = torch.zeros(cfg.batch_size), []
    for i, chunk in enumerate(batch.pixels.split(CHUNK_FRAMES, dim=2)):
        if i > 0 or start == 0:
            xt, time, target = t._noised(chunk, g)
            pred = model.transformer(xt, text, time * 1000, memory=memory, return_dict=False)[0]
            losses.append(torch.nn.functional.mse_loss(pred, target))
        if i + 1 < t.LONG_CHUNKS:
            model.transformer(chunk, text, zero, memory=memory, write_memory=True)
    return t._weigh_chunk_losses(losses, start), start


def test_the_long_video_loss_batches_each_chunks_two_passes_without_changing_the_loss(pipe):
    from accel.pipelines.shapes import train as t

    model = t._VideoModel(lambda _: pipe.transformer)
    model.text_encoder = pipe.text_encoder
    cfg = TrainConfig(kind="long-video", steps=1, batch_size=2, lr=1e-4)
    starts = set()
    for step in range(4):
        expected, start = _long_video_loss_call_by_call(model, step, cfg)
        starts.add(start > 0)
        torch.testing.assert_close(t._long_video_loss(model, step, cfg, "cpu"), expected, rtol=1e-5, atol=1e-6)
    assert starts == {True, False}  # clips from the start of a path and from later (a context-only first chunk)
