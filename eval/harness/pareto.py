"""`accel-eval pareto`: each method's main knob swept on one pipeline; quality against the computed fraction and
against the measured speedup, a line per method, mean and spread over prompts x seeds.

A Pareto run is a run folder like any other (samples, timing.json, results.md, resumable); on top of it:
    pareto.md, pareto.json   a table per method: knob value, computed fraction, PSNR and SSIM (and LPIPS where its
                             weights are here) mean ± std over the samples, speedup mean (min-max) over the timed
                             rounds; the dominance line (pareto.json also keeps every sample's values)
    pareto_fraction.png      PSNR against computed fraction, a line per method
    pareto_speedup.png       PSNR against speedup, a line per method
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import statistics

import numpy as np
import torch
from tqdm.auto import tqdm

import accel

from . import metrics
from .class_conditional import methods_refusal
from .generate import _call, atomic_json, atomic_write, load_samples, patch_config
from .report import load_timing
from .spec import RunSpec, SpecError, Sweep

DEFAULT_SWEEPS = (  # each method's main knob, over a range that takes shapes' computed fraction across ~0.3-0.9
    "cg_taylor:schedule=0.3|0.4|0.5|0.6|0.7",  # the share of steps computed; the rest from the family default
    "first_block_cache:threshold=0.05|0.1|0.15|0.2|0.3",
    "taylorseer:cache_interval=2|3|4|5",
    "mag_cache:threshold=0.03|0.06|0.12|0.24",  # ratios: FLUX's from diffusers, else measured here (with_mag_ratios)
    "pyramid_attention_broadcast:spatial_attention_block_skip_range=2|3|4|6",
    "faster_cache:spatial_attention_block_skip_range=2|3|4",
)
DOMINANCE_RANGE = (0.3, 0.7)
BIN_WIDTH = 0.1
MAG_RATIOS_MISSING = "needs per-model magnitude ratios"  # accel's MagCache error where a model has none
# Denoiser calls a method must get through to count as running here: both guidance branches of the first step (where
# pyramid_attention_broadcast refuses separate branches) and the next step's first.
PROBE_CALLS = 3


# Which methods run on the pipeline ---------------------------------------------------------------------------------

class _Probed(Exception):
    """The probe's denoiser calls went through."""


def refusal(pipe, spec: RunSpec, config) -> str | None:
    """Why the configuration cannot run on this pipeline (at patching or in its first denoiser calls), or None."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    calls = itertools.count(1)

    def stop(module, args, kwargs):
        if next(calls) > PROBE_CALLS:
            raise _Probed

    hook = denoiser.register_forward_pre_hook(stop, with_kwargs=True) if isinstance(denoiser, torch.nn.Module) else None
    try:
        with patch_config(pipe, config, spec):
            _call(pipe, spec.prompts[0], 0, spec.call, spec.device)
    except _Probed:
        return None
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:  # what the methods raise on models they can't patch
        return " ".join(str(err).split())
    finally:
        if hook:
            hook.remove()
    return None


def applicable(pipe, spec: RunSpec, strict: bool) -> RunSpec:
    """The spec cut down to the sweeps whose method runs on this pipeline. A sweep asked for by name that cannot run is
    an error (strict); a default one is left out, and why is kept for the notes."""
    why = methods_refusal(pipe)
    if why:  # no sweep can run: one reason, not the same one per method
        raise SpecError(f"--sweep: {why}")
    spec = with_mag_ratios(pipe, spec)
    kept, left_out = [], {}
    for sweep in spec.sweeps:
        why = refusal(pipe, spec, sweep.configs()[0])
        if why and strict:
            raise SpecError(f"--sweep {sweep.name}: {why}")
        if why:
            left_out[sweep.method] = why
        else:
            kept.append(sweep)
    if not kept:
        raise SpecError(f"--sweep: none of the default methods runs on {type(pipe).__name__}: "
                        + "; ".join(f"{m}: {w}" for m, w in left_out.items()))
    return dataclasses.replace(spec, configs=[c for s in kept for c in s.configs()], sweeps=kept, left_out=left_out)


def with_mag_ratios(pipe, spec: RunSpec) -> RunSpec:
    """MagCache's magnitude ratios, measured on this pipeline where the model has none of its own (diffusers ships
    FLUX's only): one generation of the first prompt with seed 0 at the run's settings, nothing skipped
    (`accel.calibrate_mag_ratios`). They are kept in the spec (spec.json) and given to every mag_cache point. Under
    `accelerate launch` the main process measures them and hands them to the others, so every process caches with
    the same ratios (measured on each, they could differ in the last bits)."""
    sweep = next((s for s in spec.sweeps if s.method == "mag_cache"), None)
    if sweep is None or spec.mag_ratios is not None or "mag_ratios" in dict(sweep.fixed):
        return spec
    if MAG_RATIOS_MISSING not in (refusal(pipe, spec, sweep.configs()[0]) or ""):
        return spec  # FLUX, or a model MagCache refuses for another reason (applicable() says which)
    return dataclasses.replace(spec, mag_ratios=_main_process_result(lambda: _measure_mag_ratios(pipe, spec), spec))


def _measure_mag_ratios(pipe, spec: RunSpec) -> list[float]:
    run_once = lambda: _call(pipe, spec.prompts[0], 0, spec.call, spec.device)  # noqa: E731
    return [round(float(r), 6) for r in accel.calibrate_mag_ratios(pipe.transformer, run_once)]


def _main_process_result(compute, spec: RunSpec):
    """compute() run on the main process only, its result (or its error, raised on every process: none is left
    waiting) broadcast to the others of an accelerate launch."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=spec.device == "cpu")
    outcome, error = [None], None
    if state.is_main_process:
        try:
            outcome = [("ok", compute())]
        except Exception as err:  # noqa: BLE001 -- raised below, on every process (as text on the others)
            outcome, error = [("error", f"{type(err).__name__}: {err}")], err
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if error is not None:
        raise error
    if kind == "error":
        raise RuntimeError(f"the main process failed: {value}")
    return value


# Per-sample measures and their aggregation --------------------------------------------------------------------------

def _lpips_reason(baseline: np.ndarray) -> str | None:
    try:
        metrics.lpips(baseline[:1], baseline[:1])
    except metrics.Unavailable as why:
        return str(why)
    return None


def one_level_psnr(sample: np.ndarray) -> float:
    """The PSNR of a sample one 8-bit level off in one of its values: the closest two different samples can be."""
    return 10 * math.log10(255**2 * sample.size)


def sample_measures(samples: np.ndarray, baseline: np.ndarray, stats: list[dict], with_lpips: bool) -> dict[str, list]:
    """Each sample against the baseline's of the same prompt and seed (a video: over its frames), and its computed
    fraction (None for a method that skips no step). A sample identical to the baseline's has an infinite PSNR, which
    would make the mean infinite: it counts as `one_level_psnr`, and is marked identical."""
    out = {"psnr": [], "ssim": [], "fraction": [], "identical": [], **({"lpips": []} if with_lpips else {})}
    for sample, base, stat in zip(samples, baseline, stats):
        fid, identical = metrics.fidelity(sample[None], base[None]), bool(np.array_equal(sample, base))
        out["psnr"].append(one_level_psnr(sample) if identical else fid["psnr"])
        out["identical"].append(identical)
        out["ssim"].append(fid["ssim"])
        out["fraction"].append(stat["computed"] / stat["steps"] if stat.get("steps") else None)
        if with_lpips:
            out["lpips"].append(metrics.lpips(sample[None], base[None])["lpips"])
    return out


def mean_std(key: str, values: list) -> dict:
    """Mean and standard deviation over samples (n-1; 0 for one sample); None where a sample has no value."""
    if any(v is None for v in values):
        return {key: None, f"{key}_std": None}
    return {key: statistics.fmean(values), f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0}


def speedup(timing: dict, baseline: str, label: str) -> dict:
    """Mean and range of each timed round's paired ratio: the baseline's latency over the configuration's, both of the
    same round, so a slow moment of the machine slows both sides."""
    base, own = (timing["configs"][k]["latencies_s"] for k in (baseline, label))
    ratios = [b / x for b, x in zip(base, own)]
    return {"speedup": statistics.fmean(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "rounds": len(ratios)}


def point(sweep: Sweep, value, label: str, measures: dict[str, list], timing: dict, baseline: str) -> dict:
    row = {"line": sweep.name, "method": sweep.method, "knob": sweep.knob, "value": value, "config": label,
           "n": len(measures["psnr"]), "identical": sum(measures["identical"])}
    for key in ("fraction", "psnr", "ssim", "lpips"):
        if key in measures:
            row.update(mean_std(key, measures[key]))
    return {**row, **speedup(timing, baseline, label), "samples": measures}


def fraction_bins() -> list[tuple[float, float]]:
    low, high = DOMINANCE_RANGE
    count = round((high - low) / BIN_WIDTH)
    return [(round(low + i * BIN_WIDTH, 6), round(low + (i + 1) * BIN_WIDTH, 6)) for i in range(count)]


def _in_bin(fraction: float | None, low: float, high: float, last: bool) -> bool:
    if fraction is None:
        return False
    fraction = round(fraction, 6)  # 6 steps of 20 averaged over samples is 0.3 give or take the last bit
    return low <= fraction < high or (last and fraction == high)


def dominance(rows: list[dict], seeds: int = 1) -> list[dict]:
    """Per computed-fraction bin: the line whose best point in the bin has the highest mean PSNR, its margin over the
    next line's best point there, whether the margin exceeds the spread (the larger of the two points' std over
    samples), and the paired views (the prompts' spread cancels there): on how many samples (the same prompt and seed)
    the best point is ahead, the std of the per-sample differences, and the margin on each seed alone (samples are
    prompt-major, `seeds` to a prompt); the margin is beyond the seed-to-seed spread when it is positive on every seed
    and larger than the range of the per-seed margins."""
    bins, out = fraction_bins(), []
    for i, (low, high) in enumerate(bins):
        best: dict[str, dict] = {}
        for row in rows:
            if _in_bin(row["fraction"], low, high, i == len(bins) - 1) and row["psnr"] > best.get(row["line"], {}).get("psnr", -np.inf):
                best[row["line"]] = row
        ranked = sorted(best.values(), key=lambda r: r["psnr"], reverse=True)
        entry = {"bin": [low, high], "best": {k: ranked[0][k] for k in ("line", "config", "psnr")} if ranked else None}
        if len(ranked) > 1:
            entry.update(runner_up={k: ranked[1][k] for k in ("line", "config", "psnr")},
                         **_margins(ranked[0], ranked[1], seeds))
        out.append(entry)
    return out


def _margins(best: dict, runner_up: dict, seeds: int) -> dict:
    margin, spread = best["psnr"] - runner_up["psnr"], max(best["psnr_std"], runner_up["psnr_std"])
    differences = [a - b for a, b in zip(best["samples"]["psnr"], runner_up["samples"]["psnr"])]
    per_seed = [statistics.fmean(differences[s::seeds]) for s in range(seeds)]
    return dict(margin=margin, spread=spread,
                beyond_spread=margin > spread, ahead_on=sum(d > 0 for d in differences), samples=len(differences),
                paired_std=statistics.stdev(differences) if len(differences) > 1 else 0.0, per_seed=per_seed,
                beyond_seed_spread=min(per_seed) > 0 and margin > max(per_seed) - min(per_seed))


def dominance_line(entries: list[dict]) -> str:
    parts = []
    for e in entries:
        span, best = f"{e['bin'][0]:.1f}-{e['bin'][1]:.1f}", e["best"]
        if best is None:
            parts.append(f"{span}: no point")
        elif "margin" not in e:
            parts.append(f"{span}: {best['config']} {best['psnr']:.1f} dB, the only method here")
        else:
            verdict = "beyond" if e["beyond_spread"] else "within"
            per_seed = " / ".join(f"{m:+.1f}" for m in e["per_seed"])
            seed_verdict = "beyond" if e["beyond_seed_spread"] else "not beyond"
            parts.append(f"{span}: {best['config']} {best['psnr']:.1f} dB, +{e['margin']:.1f} dB over "
                         f"{e['runner_up']['config']} ({verdict} the spread of {e['spread']:.1f} dB; paired: ahead "
                         f"on {e['ahead_on']}/{e['samples']} samples, difference +{e['margin']:.1f} ± "
                         f"{e['paired_std']:.1f} dB; per seed: {per_seed} dB, {seed_verdict} the seed-to-seed "
                         f"spread)")
    return "Dominance (best mean PSNR per computed-fraction bin): " + "; ".join(parts)


# Curves at matched computed fraction --------------------------------------------------------------------------------
# A bin compares points of different fractions (0.30 against 0.39); the curves compare at the same fraction.

CURVE_FRACTIONS = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.30, 0.35, ... 0.70


def _frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats with no more computed (sorted by fraction): the method's curve."""
    out = []
    for row in sorted(points, key=lambda r: (round(r["fraction"], 6), -r["psnr"])):
        if not out or row["psnr"] > out[-1]["psnr"]:
            out.append(row)
    return out


def _mixed_psnr(a: float, b: float, w: float) -> float:
    """The PSNR of the mean squared error (1 - w) * MSE(a) + w * MSE(b): what running a share w of the generations at
    b's setting and the rest at a's gives. Linear in PSNR would promise more, without bound next to an identical
    (capped) sample."""
    return -10.0 * math.log10((1 - w) * 10.0 ** (-a / 10.0) + w * 10.0 ** (-b / 10.0))


def _point_at(frontier: list[dict], fraction: float, reach: float) -> dict | None:
    """The curve at `fraction`, each sample's error interpolated linearly (`_mixed_psnr`) between the two frontier
    points around it, and held at the last frontier point up to `reach` (the sweep's largest fraction: a method that
    computed more and did no better can still give that); None outside the sweep's range."""
    fractions = [round(r["fraction"], 6) for r in frontier]
    if not fractions[0] <= fraction <= round(reach, 6):
        return None
    above = next((i for i, f in enumerate(fractions) if f >= fraction), len(fractions) - 1)
    below = max(above - 1, 0)
    low, high = frontier[below], frontier[above]
    span = fractions[above] - fractions[below]
    w = min(1.0, (fraction - fractions[below]) / span) if span else 1.0
    samples = [_mixed_psnr(a, b, w) for a, b in zip(low["samples"]["psnr"], high["samples"]["psnr"])]
    config = low["config"] if w == 0 else high["config"] if w == 1 else f"{low['config']} ~ {high['config']}"
    return {"config": config, "psnr": statistics.fmean(samples),
            "psnr_std": statistics.stdev(samples) if len(samples) > 1 else 0.0, "samples": {"psnr": samples}}


def curves(rows: list[dict], seeds: int = 1) -> list[dict]:
    """At each of CURVE_FRACTIONS: every method's curve (every line of one method pooled; per line when the run has
    one method), the best and its margins over the next (as in `dominance`)."""
    key = "line" if len({r["method"] for r in rows}) == 1 else "method"
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["fraction"] is not None:
            groups.setdefault(row[key], []).append(row)
    out = []
    for fraction in CURVE_FRACTIONS:
        at = {name: p for name, points in groups.items()
              if (p := _point_at(_frontier(points), fraction, max(r["fraction"] for r in points))) is not None}
        ranked = sorted(at.items(), key=lambda kv: kv[1]["psnr"], reverse=True)
        entry = {"fraction": fraction, "psnr": {name: p["psnr"] for name, p in ranked}}
        if len(ranked) > 1:
            entry.update(best=ranked[0][0], runner_up=ranked[1][0], **_margins(ranked[0][1], ranked[1][1], seeds))
        out.append(entry)
    return out


def curves_table(entries: list[dict]) -> list[str]:
    names = list(dict.fromkeys(name for e in entries for name in e["psnr"]))
    lines = ["## Curves at matched computed fraction", "",
             "Each method's curve: its points that no other of its points beats with no more computed, each sample's "
             "squared error interpolated linearly between the two around the fraction (as running a share of the "
             "generations at each would give; held at the last up to the largest fraction swept), in PSNR. Margin: "
             "the best over the next, with the paired views of the dominance line.", "",
             "| computed | " + " | ".join(names) + " | best | margin (paired ± std, ahead on, per seed) |",
             "|---|" + "---|" * (len(names) + 2)]
    for e in entries:
        cells = [f"{e['psnr'][n]:.2f}" if n in e["psnr"] else "" for n in names]
        margin = ""
        if "margin" in e:
            seed_verdict = "beyond" if e["beyond_seed_spread"] else "not beyond"
            margin = (f"+{e['margin']:.2f} ± {e['paired_std']:.2f} dB over {e['runner_up']}, {e['ahead_on']}/"
                      f"{e['samples']}, per seed {' / '.join(f'{m:+.2f}' for m in e['per_seed'])} ({seed_verdict} "
                      "the seed-to-seed spread)")
        lines.append(f"| {e['fraction']:.2f} | " + " | ".join(cells) + f" | {e.get('best', '')} | {margin} |")
    return lines + [""]


def pareto_results(run_dir: str, spec: RunSpec) -> dict:
    """Every sweep point's row, the dominance per bin, and what they rest on."""
    timing = load_timing(run_dir, spec)
    baseline, _ = load_samples(run_dir, spec, spec.configs[0])
    lpips_why = _lpips_reason(baseline)
    rows = []
    for sweep in tqdm(spec.sweeps, desc="pareto metrics"):
        for value, config in zip(sweep.values, sweep.configs()):
            samples, stats = load_samples(run_dir, spec, config)
            measures = sample_measures(samples, baseline, stats, lpips_why is None)
            rows.append(point(sweep, value, config.label, measures, timing, spec.configs[0].label))
    omitted = {**spec.left_out, **({"LPIPS": lpips_why} if lpips_why else {})}
    base_latency = statistics.median(timing["configs"][spec.configs[0].label]["latencies_s"])
    counts = {"samples": len(baseline), "prompts": len(spec.prompts), "seeds": spec.seeds,
              "frames": int(baseline.shape[1]) if baseline.ndim == 5 else None, "rounds": len(timing["rounds"])}
    return {"pipeline": spec.pipeline, "environment": timing["environment"], "counts": counts,
            "baseline_latency_s": base_latency, "identical_psnr": one_level_psnr(baseline[0]), "lines": [s.to_json() | {"name": s.name} for s in spec.sweeps],
            "rows": rows, "dominance": dominance(rows, spec.seeds),
            "curves": curves(rows, spec.seeds), "left_out": omitted, "mag_ratios": spec.mag_ratios}


# The table ---------------------------------------------------------------------------------------------------------

def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _pm(row: dict, key: str, fmt: str) -> str:
    return "n/a" if row[key] is None else f"{fmt.format(row[key])} ± {fmt.format(row[key + '_std'])}"


def _header(results: dict) -> str:
    c, env = results["counts"], results["environment"]
    video = f" videos of {c['frames']} frames" if c["frames"] else " samples"
    where = env.get("gpu") or env.get("device")
    return (f"# Pareto sweep: {results['pipeline']}\n\n"
            f"Each point: {c['samples']}{video} ({c['prompts']} prompts x {c['seeds']} seeds), each compared with the "
            "baseline's sample of the same prompt and seed; mean ± std over the samples. Computed: the share of "
            f"denoiser steps computed. Speedup: the baseline's latency over the configuration's in each of {c['rounds']} "
            "interleaved rounds after a warm-up round (one sample a round: the first prompt, seed 0), mean (min-max); "
            f"baseline {results['baseline_latency_s']:.3f} s a sample (median), on {where}, {env.get('dtype')}, "
            f"call {env.get('call')}.")


def _line_table(results: dict, line: dict) -> list[str]:
    rows = [r for r in results["rows"] if r["line"] == line["name"]]
    lpips = "lpips" in rows[0]
    fixed = ", ".join(f"{k}={_value_text(v)}" for k, v in line["fixed"].items())
    lines = [f"## {line['name']}" + (f" ({fixed})" if fixed else ""), "",
             f"| {line['knob']} | computed | PSNR dB | SSIM |{' LPIPS |' if lpips else ''} speedup |",
             "|---|---|---|---|" + ("---|" if lpips else "") + "---|"]
    for r in rows:
        identical = f" ({r['identical']}/{r['n']} identical)" if r["identical"] else ""
        cells = [_value_text(r["value"]), _pm(r, "fraction", "{:.2f}"), _pm(r, "psnr", "{:.2f}") + identical,
                 _pm(r, "ssim", "{:.4f}"),
                 *([_pm(r, "lpips", "{:.4f}")] if lpips else []),
                 f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: dict) -> str:
    body = [_header(results), ""]
    for line in results["lines"]:
        body += _line_table(results, line)
    notes = [f"- {name}: left out: {why}" for name, why in results["left_out"].items()]
    if results.get("mag_ratios"):
        notes.append(f"- mag_cache: magnitude ratios measured on this pipeline by one generation of the first prompt "
                     f"(seed 0), nothing skipped: {', '.join(f'{r:.3f}' for r in results['mag_ratios'])}")
    notes.append(f"- A sample identical to the baseline's (PSNR infinite) counts as {results['identical_psnr']:.1f} dB, "
                 "the PSNR of one 8-bit level off in one value; the tables say how many are.")
    notes.append("- Plots: pareto_fraction.png (PSNR vs computed fraction), pareto_speedup.png (PSNR vs speedup); "
                 "results.md has the pooled metrics of every configuration.")
    curve_lines = curves_table(results["curves"]) if results.get("curves") else []
    return "\n".join([*body, *curve_lines, dominance_line(results["dominance"]), "", "Notes:", *notes])


# The plots ---------------------------------------------------------------------------------------------------------

AXES = {"fraction": "computed fraction of the denoiser steps (mean ± std over samples)",
        "speedup": "speedup over the baseline (mean, min-max over the timed rounds)"}


def _errors(rows: list[dict], x: str) -> list:
    if x == "fraction":
        return [r["fraction_std"] for r in rows]
    return [[r["speedup"] - r["speedup_min"] for r in rows], [r["speedup_max"] - r["speedup"] for r in rows]]


def plot(results: dict, x: str, path: str) -> None:
    """Mean PSNR against `x` ("fraction" or "speedup"): a line per method through its knob values (each point labelled
    with its value), error bars for the spread over samples (PSNR, fraction) or timed rounds (speedup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
    for line in results["lines"]:
        rows = sorted((r for r in results["rows"] if r["line"] == line["name"] and r[x] is not None), key=lambda r: r[x])
        if not rows:
            continue
        ax.errorbar([r[x] for r in rows], [r["psnr"] for r in rows], yerr=[r["psnr_std"] for r in rows],
                    xerr=_errors(rows, x), marker="o", capsize=3, label=line["name"])
        for r in rows:
            ax.annotate(_value_text(r["value"]), (r[x], r["psnr"]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    if x == "fraction":
        ax.axvspan(*DOMINANCE_RANGE, color="grey", alpha=0.08, label="dominance bins")
    else:
        ax.axvline(1.0, color="black", linewidth=0.5)
    c = results["counts"]
    ax.set(xlabel=AXES[x], ylabel="PSNR to the baseline (dB, mean ± std over samples)",
           title=f"{results['pipeline']}: PSNR vs {x.replace('fraction', 'computed fraction')}\n{c['samples']} samples a point ({c['prompts']} prompts x "
                 f"{c['seeds']} seeds), {c['rounds']} timed rounds; point labels: knob values")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_pareto(run_dir: str, spec: RunSpec) -> str:
    results = pareto_results(run_dir, spec)
    text = markdown(results)
    atomic_write(os.path.join(run_dir, "pareto.md"), lambda f: f.write(f"{text}\n".encode()))
    atomic_json(os.path.join(run_dir, "pareto.json"), results)
    for x in ("fraction", "speedup"):
        plot(results, x, os.path.join(run_dir, f"pareto_{x}.png"))
    return text
