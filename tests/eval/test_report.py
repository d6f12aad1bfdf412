"""The timing's interleaving, the table's counts and omissions, the Pareto plot's lines and the labelled sample grid."""

import json

import numpy as np

from accel.eval.harness import generate, report
from accel.eval.harness.spec import RunSpec, parse_method

CONFIGS = [parse_method(m) for m in ("cg_taylor", "first_block_cache:threshold=0.1", "first_block_cache:threshold=0.2")]


def _spec(**kw):
    return RunSpec("shapes-image", CONFIGS, ["a red circle", "a blue square"], **kw)


class _Prompted:
    """A stand-in pipeline called with a prompt: timed one sample a call."""

    def __call__(self, prompt):
        raise AssertionError("the timed call is replaced")


def test_timing_warms_up_then_interleaves_every_configuration_in_turning_order(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(generate, "_timed_call", lambda pipe, spec, config: (calls.append(config.label), (1.0, None, None))[1])
    monkeypatch.setattr(generate, "environment", lambda spec: {"device": "cpu"})
    spec = _spec(repeats=3)
    generate.time_configs(_Prompted(), spec, str(tmp_path))
    labels = [c.label for c in spec.configs]
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 4 and all(sorted(r) == sorted(labels) for r in rounds)  # a warm-up round, then 3 timed
    assert [r[0] for r in rounds] == labels  # each round starts one further on: the baseline is not always first
    timing = json.load(open(tmp_path / "timing.json"))
    assert timing["rounds"] == rounds[1:] and all(len(t["latencies_s"]) == 3 for t in timing["configs"].values())
    assert timing["timed_batch"] == 1
    calls.clear()
    generate.time_configs(_Prompted(), spec, str(tmp_path))
    assert calls == []  # a resumed run keeps its timing


def test_speedup_is_the_median_of_each_rounds_paired_ratio_with_its_range():
    timing = {"configs": {"baseline": {"latencies_s": [2.0, 4.0, 2.2], "peak_memory_gb": None},
                          "fast": {"latencies_s": [1.0, 2.0, 2.2], "peak_memory_gb": None}}}
    row = report.timing_summary(timing, "baseline", "fast")
    assert (row["speedup"], row["speedup_min"], row["speedup_max"]) == (2.0, 1.0, 2.0)
    assert (row["latency_s"], row["latency_min_s"], row["latency_max_s"], row["rounds"]) == (2.0, 1.0, 2.2, 3)
    assert report.timing_summary(timing, "baseline", "baseline")["speedup"] == 1.0


def _row(config, method, speedup, psnr, agreement=0.5, options=""):
    return {"config": config, "method": method, "options": options, "speedup": speedup, "speedup_min": speedup,
            "speedup_max": speedup, "latency_s": 1 / speedup, "latency_min_s": 1, "latency_max_s": 1, "rounds": 3,
            "computed_share": 1.0, "peak_memory_gb": None, "psnr": psnr, "agreement": agreement, "agreement_n": 4}


def _results(rows):
    return {"rows": rows, "counts": {"samples": 4, "prompts": 4, "seeds": 1, "frames": None, "rounds": 3},
            "environment": {"device": "cpu"}, "omitted": {"kid": "KID needs at least 10 samples a side; this run has 2"},
            "rules": "the rules"}


def test_plot_draws_a_line_per_method_sorted_by_speedup_and_agreement_only_where_it_varies(tmp_path):
    rows = [_row("baseline", "baseline", 1.0, float("inf")), _row("a(t=2)", "a", 2.0, 20.0, options="t=2"),
            _row("b", "b", 1.5, 30.0), _row("a(t=1)", "a", 1.2, float("inf"), options="t=1")]
    assert report._method_lines(rows) == {"a": [3, 1], "b": [2]}
    assert report._legend_label(rows, "a", [3, 1]).startswith("a: t=1 | t=2")
    ys, top = report._y_values(rows, "psnr")
    assert top > 30 and ys[0] == ys[3] == top  # identical to the baseline: drawn above the finite values
    assert [k for k, _ in report._panels(rows)] == ["psnr"]  # agreement the same everywhere: no panel
    rows[1]["agreement"] = 0.75
    assert [k for k, _ in report._panels(rows)] == ["psnr", "agreement"]
    report.pareto_plot(_results(rows), str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_table_states_its_sample_counts_spreads_and_what_it_left_out():
    table = report.markdown_table(_results([_row("baseline", "baseline", 1.0, float("inf"))]))
    assert "Each configuration: 4 samples (4 prompts x 1 seeds)" in table and "3 interleaved rounds" in table
    assert "| 1.000 (1.000-1.000) | 1.00x (1.00x-1.00x) |" in table and "50% (2/4)" in table
    assert "- kid: left out: KID needs at least 10 samples a side; this run has 2" in table and "Rules: the rules" in table


def test_sample_grid_is_a_column_per_configuration_and_a_row_per_prompt_upscaled(tmp_path):
    import imageio.v3 as iio

    spec = _spec(seeds=2)
    for config in spec.configs:
        for prompt_index, seed in spec.jobs():
            path = generate.sample_path(str(tmp_path), config, prompt_index, seed)
            generate.atomic_write(path, lambda f: np.save(f, np.zeros((32, 32, 3), np.uint8)))
            generate.atomic_json(path[:-4] + ".json", {})
    assert report._first_sample_per_prompt(spec) == [0, 2]
    report.sample_grids(str(tmp_path), spec, str(tmp_path))
    height, width = iio.imread(tmp_path / "samples.png").shape[:2]
    assert height >= 2 * 32 * report.UPSCALE and width >= 4 * 32 * report.UPSCALE  # 2 prompts, 4 configurations


def test_video_cells_show_a_few_frames():
    video = np.zeros((17, 32, 32, 3), np.uint8)
    cell = report._cell(video)
    assert cell.shape[0] == 32 * report.UPSCALE
    assert cell.shape[1] == report.VIDEO_FRAMES_SHOWN * (32 * report.UPSCALE + 2) - 2
