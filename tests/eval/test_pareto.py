"""accel-eval pareto: sweeps parsed and refused, a small sweep end to end and resumed, the aggregation on hand-made rows
(random-weight shapes pipeline, 4 steps: mechanics, not quality)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import accel
from accel.eval.harness import generate, pareto
from accel.eval.harness.cli import main
from accel.eval.harness.spec import RunSpec, SpecError, parse_sweep
from accel.pipelines.shapes.models import image_transformer
from accel.pipelines.shapes.pipelines import ShapesImagePipeline

SWEEPS = ["--seeds", "1", "--sweep", "cg_taylor:schedule=2|3", "--sweep", "first_block_cache:threshold=0|1e9"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a CPU shared with other jobs, torch's threads wait on each other far longer than one thread computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    torch.manual_seed(0)
    ShapesImagePipeline(image_transformer().eval(), FlowMatchEulerDiscreteScheduler()).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    (root / "one.txt").write_text("a red circle\n")
    return root


def _args(setup, out, *extra, prompts="prompts.txt", steps=4):
    return ["pareto", "--pipeline", str(setup / "pipe"), "--prompts", str(setup / prompts), "--steps", str(steps),
            "--repeats", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def swept(setup):
    """A finished two-method sweep, 2 prompts x 1 seed."""
    out = setup / "swept"
    assert main(_args(setup, out, *SWEEPS)) == 0
    return out


def _quality(out):
    rows = json.load(open(out / "pareto.json"))["rows"]
    return [{k: v for k, v in r.items() if not k.startswith(("speedup", "rounds"))} for r in rows]


def test_sweep_parses_its_knob_values_and_fixed_options():
    sweep = parse_sweep("taylorseer:cache_interval=2|3|4,disable_cache_before_step=3")
    assert (sweep.method, sweep.knob, sweep.values, dict(sweep.fixed)) == ("taylorseer", "cache_interval", (2, 3, 4),
                                                                             {"disable_cache_before_step": 3})
    assert sweep.name == "taylorseer (cache_interval; disable_cache_before_step=3)"
    assert [c.label for c in sweep.configs()][0] == "taylorseer(cache_interval=2,disable_cache_before_step=3)"
    assert parse_sweep("first_block_cache:threshold=0.1").values == (0.1,)  # one value: a one-point line
    assert parse_sweep("cg_taylor:schedule=[0,2,4]|[0,3]").values == ([0, 2, 4], [0, 3])
    assert parse_sweep("cg_taylor:schedule=gate|3").values == ("gate", 3)


BAD_SWEEPS = {  # --sweep text: what the message must say
    "cg_taylor": "no knob",
    "cg_taylor:schedule=2||3": "empty value",
    "cg_taylor:schedule=2|2": "given twice",
    "cg_taylor:schedule=0|2": "schedule must be",
    "cg_taylor:schedule=2|3,threshold=0.1|0.2": "one knob per --sweep",
    "cg_taylor:schedule=2|3,bogus=1": "unknown cg_taylor option",
    "warp:level=1|2": "unknown method 'warp'",
    "baseline:x=1|2": "name a method",
    "pyramid_attention_broadcast:spatial_attention_block_skip_range=2|3": "two transformer calls",  # refused at step 0
}


@pytest.mark.parametrize("text", BAD_SWEEPS)
def test_bad_sweep_is_one_line_exit_2_and_writes_nothing(setup, text, capsys):
    out = setup / "refused"
    assert main(_args(setup, out, "--sweep", text)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("accel-eval: error: --sweep") and BAD_SWEEPS[text] in err
    assert not out.exists()


def test_a_line_swept_twice_is_refused_and_lines_of_one_knob_differ_by_their_fixed_options(setup, capsys):
    argv = _args(setup, setup / "twice", "--sweep", "cg_taylor:schedule=2|3", "--sweep", "cg_taylor:schedule=4|5")
    assert main(argv) == 2 and "swept twice" in capsys.readouterr().err
    lines = [parse_sweep(f"cg_taylor:schedule=0.3|0.4,warmup_steps={w}") for w in (2, 4)]
    assert [s.name for s in lines] == ["cg_taylor (schedule; warmup_steps=2)", "cg_taylor (schedule; warmup_steps=4)"]


def test_small_sweep_writes_tables_json_plots_and_report_rebuilds_them(setup, swept, capsys):
    for name in ("pareto.md", "pareto.json", "pareto_fraction.png", "pareto_speedup.png", "results.md", "samples.png"):
        assert (swept / name).stat().st_size > 0
    results = json.load(open(swept / "pareto.json"))
    assert [line["name"] for line in results["lines"]] == ["cg_taylor (schedule)", "first_block_cache (threshold)"]
    rows = {r["config"]: r for r in results["rows"]}
    assert all(r["n"] == 2 and len(r["samples"]["psnr"]) == 2 for r in rows.values())  # 2 prompts x 1 seed
    same = rows["first_block_cache(threshold=0)"]  # never skips: every sample identical to the baseline's
    assert same["fraction"] == 1.0 and same["identical"] == 2 and same["psnr_std"] == 0.0
    assert same["psnr"] == pareto.one_level_psnr(np.zeros((32, 32, 3))) == results["identical_psnr"]
    assert rows["first_block_cache(threshold=1000000000.0)"]["fraction"] < 1.0
    assert all(r["speedup_min"] <= r["speedup"] <= r["speedup_max"] and r["rounds"] == 1 for r in rows.values())
    table = (swept / "pareto.md").read_text()
    assert "## cg_taylor (schedule)" in table and "| schedule | computed | PSNR dB | SSIM |" in table
    assert "Each point: 2 samples (2 prompts x 1 seeds)" in table and "(2/2 identical)" in table and "Dominance (best mean PSNR" in table
    if pareto._lpips_reason(np.zeros((1, 8, 8, 3), np.uint8)):
        assert "LPIPS: left out" in table and "LPIPS |" not in table
    (swept / "pareto.md").unlink()
    capsys.readouterr()
    assert main(["report", str(swept)]) == 0
    assert (swept / "pareto.md").read_text() == table and "Dominance" in capsys.readouterr().out


def test_default_sweep_runs_the_methods_that_apply_and_notes_the_others(setup, monkeypatch):
    out = setup / "default"
    assert main(_args(setup, out, "--seeds", "1", prompts="one.txt", steps=2)) == 0
    results = json.load(open(out / "pareto.json"))
    assert [line["method"] for line in results["lines"]] == ["cg_taylor", "first_block_cache", "taylorseer",
                                                             "mag_cache"]
    assert {"pyramid_attention_broadcast", "faster_cache"} <= set(results["left_out"])
    # MagCache runs on a model diffusers has no ratios for: measured once, one per step, kept for a resumed run
    ratios = json.load(open(out / "spec.json"))["mag_ratios"]
    assert len(ratios) == 2 and ratios[0] == 1.0 and results["mag_ratios"] == ratios
    assert "- mag_cache: magnitude ratios measured on this pipeline" in (out / "pareto.md").read_text()

    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed run measures its MagCache ratios again")

    monkeypatch.setattr(accel, "calibrate_mag_ratios", measured_again)
    assert main(_args(setup, out, "--seeds", "1", prompts="one.txt", steps=2)) == 0  # the saved ratios, reused


class Interrupted(Exception):
    pass


def test_interrupted_sweep_resumes_and_gives_the_same_numbers(setup, swept, monkeypatch):
    out = setup / "resumed"
    call = generate._call

    def dies_after_five(*args, **kwargs):
        if len(list((out / "samples").rglob("*.npy"))) >= 5:
            raise Interrupted
        return call(*args, **kwargs)

    monkeypatch.setattr(generate, "_call", dies_after_five)
    with pytest.raises(Interrupted):
        main(_args(setup, out, *SWEEPS))
    monkeypatch.setattr(generate, "_call", call)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.npy")}
    assert len(stamps) == 5 and not (out / "pareto.json").exists()
    assert main(_args(setup, out, *SWEEPS)) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing done twice
    assert len(list((out / "samples").rglob("*.npy"))) == 5 * 2 and _quality(out) == _quality(swept)


# The aggregation, on hand-made numbers ------------------------------------------------------------------------------

def _row(line, config, fraction, psnr, psnr_std, samples=None):
    samples = [psnr - 1, psnr + 1] if samples is None else samples  # the same two prompts for every row
    return {"line": line, "config": config, "fraction": fraction, "psnr": psnr, "psnr_std": psnr_std,
            "samples": {"psnr": samples}}


def test_mean_and_std_over_samples_and_paired_speedup():
    assert pareto.mean_std("psnr", [30.0, 32.0, 34.0]) == {"psnr": 32.0, "psnr_std": 2.0}  # n-1 std
    assert pareto.mean_std("psnr", [30.0]) == {"psnr": 30.0, "psnr_std": 0.0}
    assert pareto.mean_std("fraction", [0.5, None]) == {"fraction": None, "fraction_std": None}
    timing = {"configs": {"baseline": {"latencies_s": [2.0, 4.0, 3.0]}, "fast": {"latencies_s": [1.0, 1.0, 3.0]}}}
    assert pareto.speedup(timing, "baseline", "fast") == {"speedup": 7 / 3, "speedup_min": 1.0, "speedup_max": 4.0,
                                                          "rounds": 3}


def test_fraction_bins_and_their_edges():
    assert pareto.fraction_bins() == [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7)]
    assert pareto._in_bin(0.3, 0.3, 0.4, last=False) and not pareto._in_bin(0.4, 0.3, 0.4, last=False)
    assert pareto._in_bin(np.mean([0.3] * 7), 0.3, 0.4, last=False)  # a mean a last bit under 0.3
    assert pareto._in_bin(0.7, 0.6, 0.7, last=True) and not pareto._in_bin(0.71, 0.6, 0.7, last=True)
    assert not pareto._in_bin(None, 0.3, 0.4, last=False)


def test_dominance_names_the_best_line_per_bin_and_weighs_its_margin_against_the_spread():
    rows = [_row("a", "a(1)", 0.35, 30.0, 1.0), _row("a", "a(2)", 0.38, 28.0, 1.0), _row("b", "b(1)", 0.32, 25.0, 2.0),
            _row("a", "a(3)", 0.45, 31.0, 3.0, [29.0, 33.0]), _row("b", "b(2)", 0.48, 30.0, 1.0),
            _row("b", "b(3)", 0.55, 33.0, 1.0), _row("a", "a(4)", 0.9, 40.0, 1.0)]
    entries = pareto.dominance(rows, seeds=2)  # the two samples: one prompt, two seeds
    assert [e["bin"] for e in entries] == [[0.3, 0.4], [0.4, 0.5], [0.5, 0.6], [0.6, 0.7]]
    first, second, third, fourth = entries
    assert first["best"]["config"] == "a(1)" and first["runner_up"]["config"] == "b(1)"
    assert first["margin"] == 5.0 and first["spread"] == 2.0 and first["beyond_spread"]
    assert first["per_seed"] == [5.0, 5.0] and first["beyond_seed_spread"]
    assert second["best"]["config"] == "a(3)" and second["margin"] == 1.0 and not second["beyond_spread"]
    assert second["per_seed"] == [0.0, 2.0] and not second["beyond_seed_spread"]  # not ahead on the first seed
    assert third["best"]["config"] == "b(3)" and "margin" not in third and fourth["best"] is None
    line = pareto.dominance_line(entries)
    assert ("0.3-0.4: a(1) 30.0 dB, +5.0 dB over b(1) (beyond the spread of 2.0 dB; paired: ahead on 2/2 samples, "
            "difference +5.0 ± 0.0 dB; per seed: +5.0 / +5.0 dB, beyond the seed-to-seed spread)") in line
    assert ("0.4-0.5: a(3) 31.0 dB, +1.0 dB over b(2) (within the spread of 3.0 dB; paired: ahead on 1/2 samples, "
            "difference +1.0 ± 1.4 dB; per seed: +0.0 / +2.0 dB, not beyond the seed-to-seed spread)") in line  # 0 and 2
    assert "0.5-0.6: b(3) 33.0 dB, the only method here" in line and "0.6-0.7: no point" in line


def test_a_margin_is_beyond_the_seed_to_seed_spread_only_when_larger_than_the_range_of_the_per_seed_margins():
    # Two prompts x two seeds, prompt-major: per seed the differences are (0.5, 0.5) and (3.5, 3.5).
    best, other = _row("a", "a(1)", 0.35, 32.0, 1.0, [30.5, 33.5, 30.5, 33.5]), _row("b", "b(1)", 0.35, 30.0, 1.0, [30.0] * 4)
    margins = pareto._margins(best, other, seeds=2)
    assert margins["per_seed"] == [0.5, 3.5] and margins["margin"] == 2.0 and not margins["beyond_seed_spread"]
    steady = _row("a", "a(2)", 0.35, 32.0, 1.0, [31.5, 32.5, 31.5, 32.5])  # per seed 1.5 and 2.5: range 1 < 2
    assert pareto._margins(steady, other, seeds=2)["beyond_seed_spread"]


def _curve_row(method, fraction, samples):
    return {**_row(f"{method} (k)", f"{method}({fraction})", fraction, float(np.mean(samples)), 0.0, samples),
            "method": method}


def test_curves_compare_methods_at_the_same_fraction_interpolating_each_sample():
    rows = [_curve_row("a", 0.30, [20.0, 22.0]), _curve_row("a", 0.40, [30.0, 32.0]),
            _curve_row("a", 0.50, [29.0, 29.0]),  # computes more, does no better: off the curve, but its reach counts
            _curve_row("b", 0.35, [25.0, 25.0]), _curve_row("b", 0.45, [27.0, 27.0])]
    entries = {e["fraction"]: e for e in pareto.curves(rows, seeds=2)}
    assert list(entries) == list(pareto.CURVE_FRACTIONS)
    assert entries[0.3]["psnr"] == {"a": 21.0} and "best" not in entries[0.3]  # b's sweep starts at 0.35
    at = entries[0.35]  # a halfway from 0.30 to 0.40: the mean of the squared errors, 22.60 and 24.60 dB
    half = [-10 * math.log10((10 ** -2.0 + 10 ** -3.0) / 2), -10 * math.log10((10 ** -2.2 + 10 ** -3.2) / 2)]
    assert at["psnr"] == pytest.approx({"a": sum(half) / 2, "b": 25.0}) and half[0] == pytest.approx(22.596, abs=1e-3)
    assert at["best"] == "b" and at["per_seed"] == pytest.approx([25.0 - half[0], 25.0 - half[1]])
    assert entries[0.45]["best"] == "a" and entries[0.45]["margin"] == pytest.approx(4.0)  # a held at 0.40's 31
    assert entries[0.5]["psnr"] == pytest.approx({"a": 31.0})  # b's sweep ends at 0.45
    assert entries[0.55]["psnr"] == {}  # past every sweep
    table = "\n".join(pareto.curves_table(list(entries.values())))
    assert "| 0.45 | 31.00 | 27.00 | a | +4.00 ± 1.41 dB over b, 2/2, per seed +3.00 / +5.00 (beyond" in table


def test_interpolating_toward_an_identical_sample_promises_what_a_mixture_of_the_two_settings_gives():
    # A fifth of the generations identical (capped at 95 dB), the rest at 25 dB: the error falls by a fifth (+0.97 dB),
    # where linear in PSNR would promise 39 dB.
    assert pareto._mixed_psnr(25.0, 95.0, 0.2) == pytest.approx(25.0 - 10 * math.log10(0.8), abs=1e-6)
    assert pareto._mixed_psnr(25.0, 30.0, 0.0) == 25.0 and pareto._mixed_psnr(25.0, 30.0, 1.0) == pytest.approx(30.0)


def test_curves_are_per_line_when_the_run_sweeps_one_method():
    rows = [_curve_row("a", 0.30, [20.0, 22.0]), {**_curve_row("a", 0.30, [24.0, 24.0]), "line": "a (other)"}]
    assert pareto.curves(rows, seeds=2)[0]["best"] == "a (other)"


def test_table_and_plots_from_hand_made_results(tmp_path):
    def row(line, value, fraction, psnr):
        return {"line": line, "value": value, "config": f"{line}={value}", "n": 4, "identical": 0, "fraction": fraction,
                "fraction_std": 0.01, "psnr": psnr, "psnr_std": 1.5, "ssim": 0.9, "ssim_std": 0.01, "speedup": 1 / fraction,
                "speedup_min": 0.9 / fraction, "speedup_max": 1.1 / fraction, "rounds": 2}
    rows = [row("a (k)", 2, 0.55, 30.0), row("a (k)", 3, 0.4, 27.0), row("b (t)", 0.1, 0.6, 33.0)]
    results = {"pipeline": "shapes-image", "environment": {"device": "cpu", "dtype": "float32", "call": {}},
               "counts": {"samples": 4, "prompts": 2, "seeds": 2, "frames": None, "rounds": 2}, "baseline_latency_s": 1.0,
               "identical_psnr": 83.0,
               "lines": [{"name": "a (k)", "knob": "k", "fixed": {"w": 2}}, {"name": "b (t)", "knob": "t", "fixed": {}}],
               "rows": rows, "dominance": pareto.dominance(rows), "left_out": {"mag_cache": "needs ratios"}}
    table = pareto.markdown(results)
    assert "## a (k) (w=2)" in table and "| 2 | 0.55 ± 0.01 | 30.00 ± 1.50 | 0.9000 ± 0.0100 | 1.82x (1.64-2.00) |" in table
    assert "- mag_cache: left out: needs ratios" in table and "0.5-0.6: a (k)=2 30.0 dB" in table
    for x in ("fraction", "speedup"):
        pareto.plot(results, x, str(tmp_path / f"{x}.png"))
        assert (tmp_path / f"{x}.png").stat().st_size > 0


def test_spec_json_keeps_the_sweeps_and_refuses_configs_that_are_not_theirs():
    sweeps = [parse_sweep("cg_taylor:schedule=2|3")]
    spec = RunSpec("shapes-image", sweeps[0].configs(), ["a red circle"], sweeps=sweeps, left_out={"mag_cache": "why"})
    assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert "sweeps" not in RunSpec("shapes-image", sweeps[0].configs(), ["a red circle"]).to_json()  # plain runs as before
    with pytest.raises(SpecError, match="the sweeps' configurations"):
        RunSpec("shapes-image", sweeps[0].configs()[:1], ["a red circle"], sweeps=sweeps)


class _FakeProcesses:
    """Two accelerate processes, played one after the other: rank 0 first; broadcast hands rank 1 what rank 0 had."""

    def __init__(self):
        self.rank, self.sent = 0, None

    def state(self, cpu):
        return type("State", (), {"is_main_process": self.rank == 0, "num_processes": 2})()

    def broadcast(self, objects):
        if self.rank == 0:
            self.sent = list(objects)
        else:
            objects[:] = self.sent


@pytest.mark.parametrize("fails", [False, True])
def test_mag_ratios_are_measured_on_the_main_process_only_and_shared(monkeypatch, fails):
    import accelerate
    import accelerate.utils

    fake = _FakeProcesses()
    monkeypatch.setattr(accelerate, "PartialState", fake.state)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", fake.broadcast)
    spec = RunSpec("shapes-image", [], ["a red circle"], device="cpu")
    calls = []

    def measure():
        calls.append(fake.rank)
        if fails:
            raise ValueError("the residual vanished")
        return [1.0, 0.9]

    results = []
    for fake.rank in (0, 1):
        if fails:
            want = r"the residual vanished" if fake.rank == 0 else r"the main process failed: ValueError: the residual vanished"
            with pytest.raises((ValueError, RuntimeError), match=want):
                pareto._main_process_result(measure, spec)
        else:
            results.append(pareto._main_process_result(measure, spec))
    assert calls == [0]  # rank 1 never measured
    assert fails or results == [[1.0, 0.9], [1.0, 0.9]]
