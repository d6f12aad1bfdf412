"""accel-eval end to end on a locally saved shapes pipeline (random weights: mechanics, not quality)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from accel.eval.harness.cli import main
from accel.pipelines.shapes.models import image_transformer
from accel.pipelines.shapes.pipelines import ShapesImagePipeline

METHODS = ["--method", "cg_taylor:threshold=0", "--method", "first_block_cache:threshold=1e9"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    ShapesImagePipeline(image_transformer().eval(), FlowMatchEulerDiscreteScheduler()).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("a red circle\na blue square\n\na green cross\n")
    return root


def _run(setup, out, *extra):
    return main(["run", "--pipeline", str(setup / "pipe"), "--prompts", str(setup / "prompts.txt"), *METHODS,
                 "--steps", "4", "--repeats", "1", "--out", str(out), *extra])


def _quality(out):
    rows = json.load(open(out / "results.json"))["rows"]
    return [{k: v for k, v in r.items() if not k.startswith(("latency", "speedup", "peak_memory"))} for r in rows]


def test_run_writes_table_csv_json_plot_and_grid(setup):
    out = setup / "run"
    assert _run(setup, out) == 0
    for name in ("results.md", "results.csv", "results.json", "pareto.png", "samples.png", "spec.json"):
        assert (out / name).stat().st_size > 0
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["config"] for r in rows] == ["baseline", "cg_taylor(threshold=0)", "first_block_cache(threshold=1000000000.0)"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["psnr"] == float("inf")
    assert rows[1]["psnr"] == float("inf") and rows[1]["computed_share"] == 1.0  # threshold 0 changes nothing
    assert rows[2]["computed_share"] < 1.0 and rows[2]["psnr"] < float("inf")
    env = json.load(open(out / "results.json"))["environment"]
    assert env["torch"] == torch.__version__ and env["call"] == {"num_inference_steps": 4} and env["processes"] == 1
    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "1.00x" in table and "inf" in table
    assert "Each configuration: 3 samples (3 prompts x 1 seeds)" in table and "1 interleaved rounds" in table
    assert "lpips: left out" in table and "fid: left out: FID needs more samples a side than" in table
    assert "kid: left out: KID needs at least 10 samples a side; this run has 1" in table
    assert "agreement" in rows[0] and rows[0]["agreement_n"] == 3 and "fid" not in rows[0]
    timing = json.load(open(out / "timing.json"))
    (out / "timing.json").write_text(json.dumps({**timing, "environment": {"gpu": "elsewhere"}}))
    assert main(["report", str(out)]) == 0  # a rebuilt report keeps where the samples were made
    assert json.load(open(out / "results.json"))["environment"] == {"gpu": "elsewhere"}


def test_interrupted_run_resumes_without_recomputing(setup):
    out = setup / "resume"
    assert _run(setup, out) == 0
    before = _quality(out)
    samples = out / "samples" / "first_block_cache_threshold_1000000000.0"
    victim = sorted(samples.glob("*.npy"))[1]
    victim.unlink()
    (samples / "00001-1000.npy.tmp123").write_bytes(b"half a file")  # what a killed writer leaves behind
    stamps = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.npy")}
    assert _run(setup, out) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing else regenerated
    assert victim.exists() and _quality(out) == before
    assert main(["report", str(out)]) == 0 and _quality(out) == before
    (out / "timing.json").unlink()  # stopped while timing: the next run times again, regenerating nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.npy")}
    assert _run(setup, out) == 0 and (out / "timing.json").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()) and _quality(out) == before


def test_two_processes_give_the_same_numbers_as_one(setup):
    out = setup / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "accel.eval", "run",
           "--pipeline", str(setup / "pipe"), "--prompts", str(setup / "prompts.txt"), *METHODS, "--steps", "4",
           "--repeats", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    if not (setup / "run" / "results.json").exists():
        assert _run(setup, setup / "run") == 0
    assert _quality(out) == _quality(setup / "run")
    assert json.load(open(out / "results.json"))["environment"]["processes"] == 2


def test_mag_cache_takes_its_ratios_and_the_runs_steps_from_the_command_line(setup):
    from accel.eval.harness.cli import _check_configs
    from accel.eval.harness.generate import load_pipeline
    from accel.eval.harness.spec import RunSpec, parse_method

    config = parse_method("mag_cache:mag_ratios=[1.0,0.95,0.9,0.9],threshold=0.1")
    assert dict(config.options) == {"mag_ratios": [1.0, 0.95, 0.9, 0.9], "threshold": 0.1}
    spec = RunSpec(str(setup / "pipe"), [config], ["a red circle"], call={"num_inference_steps": 4})
    _check_configs(load_pipeline(spec.pipeline, "cpu", "float32"), spec)  # raises a SpecError if it cannot patch
