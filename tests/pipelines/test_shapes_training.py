import json
import os

import pytest
import torch
from safetensors.torch import load_file

from accel.pipelines.shapes.train import TrainConfig, train


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
