"""The shipped class-conditional generators (shapes-var, shapes-hmar) in accel-eval: class names as prompts, class
agreement and FID against real shapes images, batched timing, accel's methods refused, generators side by side."""

import json
import os

import pytest

from accel.eval.harness import cli
from accel.eval.harness.class_conditional import label_ids
from accel.eval.harness.spec import RunSpec
from accel.pipelines import reference_pipeline

CLASSES = ["a red circle", "a blue square", "7"]  # class ids 0, 1 * 6 + 2, and 7 given as a number


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES))
    return str(path)


def test_prompts_are_class_names_or_ids_and_other_text_is_refused_naming_the_names():
    pipe = reference_pipeline("shapes-var")
    assert label_ids(pipe, CLASSES) == [0, 8, 7]
    with pytest.raises(ValueError, match=r"a class name \('a red circle', 'a green circle', .*\) or a class id"):
        label_ids(pipe, ["a purple blob"])


def test_a_run_measures_class_agreement_and_times_a_batch_of_classes(tmp_path, prompts):
    out = tmp_path / "run"
    assert cli.main(["run", "--pipeline", "shapes-hmar", "--prompts", prompts, "--method", "baseline",
                     "--guidance", "3", "--repeats", "1", "--out", str(out)]) == 0
    results = json.load(open(out / "results.json"))
    (row,) = results["rows"]
    assert row["class_agreement_n"] == 3 and 0 <= row["class_agreement"] <= 1 and "agreement" not in row
    assert "clip_score" not in row and "clip_score" not in results["omitted"]  # class names are no captions
    assert results["counts"]["timed_batch"] == 3 and json.load(open(out / "timing.json"))["timed_batch"] == 3
    labels = [json.load(open(out / "samples" / "baseline" / f"{i:05d}-{1000 * i}.json"))["class_label"]
              for i in range(3)]
    assert labels == [0, 8, 7]
    table = (out / "results.md").read_text()
    assert "class agreement" in table and "a batch of 3 images (one per prompt)" in table
    assert "3 samples (3 classes x 1 seeds)" in table and "with their classes (agreement)" in table
    assert "fid: left out: FID needs more samples a side than the shapes-classifier's 128" in table
    assert "real images of the shapes data" in results["rules"] and "odd-numbered" not in results["rules"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "cg_taylor"], "no accel.patch method applies"),
    (["pareto"], "no accel.patch method applies"),
    (["run", "--method", "baseline", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
])
def test_methods_and_bad_settings_are_refused_in_one_line(tmp_path, prompts, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main([*argv, "--pipeline", "shapes-var", "--prompts", prompts, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(out / "samples")


def test_a_prompt_that_names_no_class_is_refused_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "classes.txt"
    path.write_text("a red circle\na purple blob\n")
    out = tmp_path / "out"
    assert cli.main(["run", "--pipeline", "shapes-hmar", "--prompts", str(path), "--method", "baseline",
                     "--out", str(out)]) == 2
    assert "prompt 2 of 2 ('a purple blob'): HMARPipeline is class-conditional" in capsys.readouterr().err
    assert not os.path.exists(out / "samples")


def test_generators_side_by_side_share_timed_rounds_and_give_one_table(tmp_path):
    specs = [RunSpec(name, [], CLASSES, call={"guidance_scale": 3.0}, repeats=2) for name in cli.QUICKSTART_GENERATORS]
    prepared = [(*cli.prepare(spec, str(tmp_path / spec.pipeline)), spec.pipeline) for spec in specs]
    table = cli.compare_generators(prepared, str(tmp_path))
    data = json.load(open(tmp_path / "generators.json"))
    var, hmar, real = data["rows"]
    assert [var["generator"], hmar["generator"], real["generator"]] == [*cli.QUICKSTART_GENERATORS,
                                                                        "real images (reference)"]
    assert var["speedup"] == [1.0, 1.0] and len(hmar["speedup"]) == 2
    assert var["peak_memory_gb"] > 0 and hmar["peak_memory_gb"] > 0  # measured on the CPU too
    assert real["class_agreement"] == 1.0 and "fid" not in real  # 3 images: no FID, for the generators either
    rounds = json.load(open(tmp_path / "shapes-hmar" / "timing.json"))["rounds"]
    assert sorted(rounds[0]) == ["baseline", "shapes-var: baseline"]  # one round holds both generators
    assert table == (tmp_path / "generators.md").read_text().strip()
    assert "| shapes-var | " in table and "| 1.00x (1.00-1.00) |" in table
    assert "| real images (reference) | - | - | - | 100% (3/3) | n/a | - |" in table
    assert "fid: left out" in table and "lpips" not in table  # only the table's own columns' omissions


def test_real_images_for_fid_are_of_the_samples_classes_in_order():
    """A run over a subset of classes is compared with real images of that subset: one per sample, its class."""
    import numpy as np

    from accel.eval.harness.metrics import shapes_real_images
    from accel.pipelines.hmar.report import real_images, real_images_of
    from accel.pipelines.shapes.report import HELD_OUT_SEED

    labels = [8, 0, 8, 23]
    got = shapes_real_images(labels)
    stream, stream_labels = real_images(HELD_OUT_SEED, 256)  # the seed's first batch, in the order it draws them
    firsts = {c: [i for i, x in enumerate(stream_labels.tolist()) if x == c] for c in set(labels)}
    want = np.stack([stream[firsts[8][0]], stream[firsts[0][0]], stream[firsts[8][1]], stream[firsts[23][0]]])
    assert got.shape == (4, 32, 32, 3) and np.array_equal(got, want)
    assert not np.array_equal(shapes_real_images(labels, seed_offset=1), got)  # the reference row's own set
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 24\)"):
        real_images_of(HELD_OUT_SEED, [24])


def test_generators_table_refuses_samples_without_class_ids(tmp_path, monkeypatch):
    """A run folder whose samples predate the recorded class ids: a one-line error, not a crash in the FID."""
    from accel.eval.harness import generate

    monkeypatch.setattr(generate, "load_samples", lambda run_dir, spec, config: (None, [{"steps": 1}]))
    spec = RunSpec("shapes-var", [cli.parse_method("baseline")], CLASSES)
    with pytest.raises(cli.SpecError, match="do not record their class ids"):
        cli._sample_labels(spec, str(tmp_path))
