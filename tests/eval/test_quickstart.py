"""The README's main job: `accel-eval quickstart` on the shipped reference pipelines, on the CPU, offline."""

import json
import os

from accel.eval.harness import cli


def test_quickstart_runs_offline_and_writes_tables_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["quickstart", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("shapes-image", "shapes-video"):
        assert f"## {name}" in out
        folder = tmp_path / name
        for produced in ("results.md", "results.csv", "results.json", "pareto.png", "samples.png"):
            assert os.path.isfile(folder / produced), f"{name}: no {produced}"
        rows = json.load(open(folder / "results.json"))["rows"]
        assert [r["config"] for r in rows][0] == "baseline" and len(rows) == 1 + len(cli.QUICKSTART_METHODS)
        assert rows[0]["psnr"] == float("inf") and all(0 < r["computed_share"] <= 1 for r in rows)
    assert "## HMAR vs VAR" in out  # the class-conditional generators, side by side
    generators = json.load(open(tmp_path / "generators.json"))
    assert os.path.isfile(tmp_path / "generators.md") and generators["generators"] == cli.QUICKSTART_GENERATORS
    *made, real = generators["rows"]
    samples = 24 * cli.QUICKSTART_GENERATOR_SEEDS
    for row in made:  # enough samples for FID on the classifier's 128 features
        assert row["class_agreement_n"] == samples and row["fid"] > 0 and row["peak_memory_gb"] > 0
    # Real images as a reference row (at 144 samples FID's own noise is as large as a trained generator's FID)
    assert real["class_agreement_n"] == samples and real["class_agreement"] == 1.0 and real["fid"] > 0
