"""The shapes VAR / HMAR: the three training stages at toy sizes on the CPU (a few steps, resume equal to an
uninterrupted run across HMAR's switch to masked refinement, atomic checkpoints, exports that load), HMAR's start
from VAR's weights, and the shipped shapes-var and shapes-hmar."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from accel.pipelines import reference_names, reference_pipeline
from accel.pipelines.hmar import HMARPipeline, VARPipeline, VARTransformer
from accel.pipelines.hmar import train as training
from accel.pipelines.hmar.train import MASK_SCHEDULE, TrainConfig, hmar_from_var, train
from accel.pipelines.streaming_t2v import train as checkpoints


def _toy_sizes(mp: pytest.MonkeyPatch) -> None:
    """The stages' models at toy sizes (the same scales and image size): a step takes milliseconds."""
    mp.setattr(training, "TOKENIZER_CONFIG", dict(vocab_size=32, codebook_dim=4, scales=training.SCALES, ch=8,
                                                  ch_mult=(1, 1, 1), num_res_blocks=1, norm_num_groups=4))
    mp.setattr(training, "TRANSFORMER_CONFIG", dict(num_classes=24, depth=2, width=32, num_heads=2,
                                                    scales=training.SCALES))
    mp.setattr(training, "HMAR_BRANCH_DEPTH", 1)


@pytest.fixture(autouse=True)
def toy_sizes(monkeypatch):
    _toy_sizes(monkeypatch)


def _config(stage: str = "tokenizer", **kw) -> TrainConfig:
    return TrainConfig(**{"stage": stage, "steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1,
                          "checkpoint_every": 1, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three stages after two steps each; HMAR's second step is masked refinement."""
    with pytest.MonkeyPatch.context() as mp:
        _toy_sizes(mp)
        root = tmp_path_factory.mktemp("runs")
        train(_config("tokenizer"), str(root / "tokenizer"))
        train(_config("var", init=str(root / "tokenizer" / "model")), str(root / "var"))
        train(_config("hmar", init=str(root / "var" / "model"), next_scale_steps=1), str(root / "hmar"))
    return root


def _checkpoint(out) -> dict:
    return load_file(os.path.join(out, training.CHECKPOINT))


def test_the_stages_export_pipelines_that_generate(runs):
    var = VARPipeline.from_pretrained(runs / "var" / "model", dtype=torch.float32)
    hmar = HMARPipeline.from_pretrained(runs / "hmar" / "model", dtype=torch.float32)
    assert hmar.config.mask_schedule == [list(c) for c in MASK_SCHEDULE]  # the export carries its schedule
    for pipe in (var, hmar):
        pipe.set_progress_bar_config(disable=True)
        images = pipe([0, 23], output_type="np").images
        assert images.shape == (2, 32, 32, 3)
    config = json.load(open(runs / "hmar" / "model" / "tokenizer" / "config.json"))
    assert "_name_or_path" not in config  # no path of the machine that trained it
    # The mask branch began as a copy of the next-scale branch, then trained on its own.
    assert not torch.equal(hmar.transformer.mask_head.proj.weight, hmar.transformer.next_scale_head.proj.weight)


def test_hmar_starts_from_the_vars_weights():
    var = VARTransformer(vocab_size=32, codebook_dim=4, **training.TRANSFORMER_CONFIG).eval()
    hmar = hmar_from_var(var, branch_depth=1).eval()
    assert torch.equal(hmar.base_blocks[0].attn.to_qkv.weight, var.blocks[0].attn.to_qkv.weight)
    assert torch.equal(hmar.next_scale_blocks[0].mlp.fc_in.weight, var.blocks[1].mlp.fc_in.weight)
    assert torch.equal(hmar.token_embed_bias, var.token_embed.bias)
    # Scale 0 sees only itself under both masks: the same logits.
    labels = torch.tensor([3, 24])
    inputs = torch.randn(2, hmar.layout.total - 1, 4)
    assert torch.allclose(hmar(labels, inputs)[:, :1], var(labels, inputs)[:, :1], atol=1e-5)


@pytest.mark.parametrize("stage", ["tokenizer", "var", "hmar"])
def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path, runs, stage):
    init = {"tokenizer": None, "var": str(runs / "tokenizer" / "model"), "hmar": str(runs / "var" / "model")}[stage]
    extra = {"next_scale_steps": 1} if stage == "hmar" else {}  # the resumed step is the first masked one
    config = lambda **kw: _config(stage, init=init, **extra, **kw)  # noqa: E731
    train(config(), str(tmp_path / "whole"))
    train(config(steps=1), str(tmp_path / "parts"))
    report = train(config(), str(tmp_path / "parts"))
    assert report["steps_done"] == 2 and [s for s, _ in report["losses"]] == [1, 2]
    whole, parts = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    train(_config("tokenizer", steps=1), str(tmp_path))
    before = _checkpoint(tmp_path)

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(_config("tokenizer"), str(tmp_path))
    after = _checkpoint(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("change, match", [
    ({"stage": "vae"}, "stage must be one of"),
    ({"stage": "var"}, "--init is the tokenizer's folder"),
    ({"stage": "hmar", "init": "x"}, "next_scale_steps is for the hmar stage"),
    ({"next_scale_steps": 1}, "next_scale_steps is for the hmar stage"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_bad_configurations_are_refused_before_any_work(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train(_config(**change), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_the_command_line_reports_bad_options_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["var", "--out", str(tmp_path), "--steps", "1"])
    assert exit_info.value.code == 2
    assert "--init is the tokenizer's folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["shapes-var", "shapes-hmar"])
def test_the_shipped_models_generate_the_classes_asked_for(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert name in reference_names()
    pipe = reference_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 23], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    for bad in (24, [-1, 3]):
        with pytest.raises(ValueError, match="unknown class ids"):
            pipe(bad)


def test_the_shipped_hmar_samples_with_its_saved_schedule(monkeypatch):
    """Its folder carries the schedule it was trained for: the same tokens as passing it, and not HMAR's default
    (which is for VAR's scales and would be refused)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = reference_pipeline("shapes-hmar")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.mask_schedule == [list(c) for c in MASK_SCHEDULE]
    draw = lambda **call: pipe(list(range(24)), generator=torch.Generator().manual_seed(0), guidance_scale=3.0,  # noqa: E731
                               output_type="pt", **call).token_indices
    saved, explicit = draw(), draw(mask_schedule=MASK_SCHEDULE)
    assert all(torch.equal(a, b) for a, b in zip(saved, explicit))
    plain = draw(mask_schedule=[[n * n] for n in training.SCALES])  # a call's schedule still wins
    assert not all(torch.equal(a, b) for a, b in zip(saved, plain))
