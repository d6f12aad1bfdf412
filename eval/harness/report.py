"""From cached samples and timings to the results: a table (markdown, CSV, JSON), a Pareto plot, sample grids.

Every figure says what it rests on: the table's header gives the sample count and the timed rounds, each spread is
shown beside its median, and a metric the sample count cannot support is left out with the reason in the notes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import textwrap

import numpy as np
from tqdm.auto import tqdm

from . import metrics
from .class_conditional import SHAPES_REFERENCE_RULE, sample_labels
from .generate import atomic_json, atomic_write, load_samples, timing_path
from .spec import RunSpec, SpecError

UPSCALE = 4  # sample grids: nearest-neighbour, so 32x32 shapes can be seen
GRID_ROWS = 8  # prompts shown in a sample grid
VIDEO_FRAMES_SHOWN = 4


def load_timing(run_dir: str, spec: RunSpec) -> dict:
    path = timing_path(run_dir)
    if not os.path.isfile(path):
        raise SpecError(f"{run_dir}: no timing.json (the run stopped before timing); run `accel-eval run` again "
                        "with the same arguments to finish it")
    timing = json.load(open(path))
    missing = [c.label for c in spec.configs if c.label not in timing.get("configs", {})]
    if missing:
        raise SpecError(f"{path}: no timings for {missing}; delete it and run `accel-eval run` again to retime")
    return timing


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timing_summary(timing: dict, baseline: str, label: str) -> dict:
    """Median latency and its range; the speedup from the rounds' paired ratios (baseline / configuration, both timed
    in the same round), so that a slow moment of the machine slows both sides of a ratio."""
    base, own = timing["configs"][baseline]["latencies_s"], timing["configs"][label]["latencies_s"]
    latency, speedup = _spread(own), _spread([b / x for b, x in zip(base, own)])
    return {"latency_s": latency["median"], "latency_min_s": latency["min"], "latency_max_s": latency["max"],
            "speedup": speedup["median"], "speedup_min": speedup["min"], "speedup_max": speedup["max"],
            "rounds": len(own), "peak_memory_gb": timing["configs"][label]["peak_memory_gb"]}


def _try(fn, *args) -> tuple[dict, dict]:
    try:
        return fn(*args), {}
    except metrics.Unavailable as why:
        return {}, {fn.__name__: str(why)}


def _computed_share(stats: list[dict]) -> float | None:
    steps = sum(s.get("steps", 0) for s in stats)
    return sum(s.get("computed", 0) for s in stats) / steps if steps else None


def _distribution(samples: np.ndarray, reference: np.ndarray, extractor) -> list:
    return [_try(fn, samples, reference, extractor) if isinstance(extractor, metrics.FeatureExtractor)
            else ({}, {fn.__name__: extractor}) for fn in (metrics.fid, metrics.kid)]


def _quality(spec: RunSpec, samples: np.ndarray, baseline: np.ndarray, prompts: list[str], extractor,
             labels: list[int] | None = None) -> list:
    """(values, reasons) of each wanted metric. `labels`: the class ids of a class-conditional run's samples."""
    wanted = set(spec.metrics)
    shapes_classes = labels is not None and metrics.is_shapes_pipeline(spec.pipeline)
    parts = []
    if "fidelity" in wanted:
        parts += [_try(metrics.fidelity, samples, baseline), _try(metrics.lpips, samples, baseline)]
    if "fid" in wanted and shapes_classes:  # a generator of the shapes data: against its real images
        parts += _distribution(samples, metrics.shapes_real_images(labels), extractor)
    elif "fid" in wanted:
        parts += _distribution(*metrics.independent_halves(samples, baseline), extractor)
    if "clip" in wanted and labels is None:  # class names are no captions
        parts.append(_try(metrics.clip_score, samples, prompts))
    if "agreement" in wanted and shapes_classes:
        parts.append(_try(metrics.class_agreement, samples, labels))
    elif "agreement" in wanted and metrics.is_shapes_pipeline(spec.pipeline):
        parts.append(_try(metrics.caption_agreement, samples, prompts))
    if "flicker" in wanted and samples.ndim == 5:
        parts.append(_try(metrics.temporal_flicker, samples))
    return parts


def evaluate(run_dir: str, spec: RunSpec) -> dict:
    """Every configuration's row: timing, steps computed, fidelity to the baseline, distribution and text metrics."""
    timing = load_timing(run_dir, spec)
    baseline, _ = load_samples(run_dir, spec, spec.configs[0])
    prompts = [spec.prompts[i] for i, _ in spec.jobs()]
    try:
        extractor = metrics.feature_extractor(spec.pipeline)
    except metrics.Unavailable as why:
        extractor = str(why)
    rows, omitted = [], {}
    labels = None
    for config in tqdm(spec.configs, desc="metrics"):
        samples, stats = load_samples(run_dir, spec, config)
        labels = sample_labels(stats)
        row = {"config": config.label, "method": config.method or "baseline", "options": config.options_text,
               **timing_summary(timing, spec.configs[0].label, config.label),
               "computed_share": _computed_share(stats) if config.method else 1.0}
        for values, why in _quality(spec, samples, baseline, prompts, extractor, labels):
            row.update(values)
            omitted.update(why)
        rows.append(row)
    counts = {"samples": len(baseline), "prompts": len(spec.prompts), "seeds": spec.seeds,
              "frames": int(baseline.shape[1]) if baseline.ndim == 5 else None, "rounds": len(timing["rounds"]),
              "timed_batch": timing.get("timed_batch", 1), "class_conditional": labels is not None}
    return {"environment": timing["environment"], "spec": spec.to_json(), "counts": counts, "rows": rows,
            "omitted": omitted, "rules": _rules(spec, labels)}


def _rules(spec: RunSpec, labels: list[int] | None) -> str:
    if labels is not None and metrics.is_shapes_pipeline(spec.pipeline):  # FID / KID against real images, not halves
        return f"{SHAPES_REFERENCE_RULE} {metrics.SAMPLE_COUNT_RULES}"
    return metrics.STATISTICS_RULES


# The table --------------------------------------------------------------------------------------------------------

def _num(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    return "inf" if isinstance(value, float) and math.isinf(value) else fmt.format(value)


def _range(row: dict, key: str, fmt: str, low: str, high: str) -> str:
    text = _num(row[key], fmt)
    return text if row["rounds"] < 2 else f"{text} ({_num(row[low], fmt)}-{_num(row[high], fmt)})"


def _agreement(row: dict, key: str = "agreement") -> str:
    n = row[f"{key}_n"]
    return f"{row[key]:.0%} ({round(row[key] * n)}/{n})"


COLUMNS = [  # (key that must be in a row, header, the cell's text)
    ("config", "config", lambda r: r["config"]),
    ("latency_s", "latency s", lambda r: _range(r, "latency_s", "{:.3f}", "latency_min_s", "latency_max_s")),
    ("speedup", "speedup", lambda r: _range(r, "speedup", "{:.2f}x", "speedup_min", "speedup_max")),
    ("computed_share", "steps computed", lambda r: _num(r["computed_share"], "{:.0%}")),
    ("peak_memory_gb", "peak GB", lambda r: _num(r["peak_memory_gb"], "{:.2f}")),
    ("psnr", "PSNR dB", lambda r: _num(r["psnr"], "{:.2f}")),
    ("ssim", "SSIM", lambda r: _num(r["ssim"], "{:.4f}")),
    ("lpips", "LPIPS", lambda r: _num(r["lpips"], "{:.4f}")),
    ("fid", "FID", lambda r: _num(r["fid"], "{:.2f}")),
    ("kid", "KID", lambda r: f"{r['kid']:.4f} ± {r['kid_std']:.4f}"),
    ("clip_score", "CLIPScore", lambda r: _num(r["clip_score"], "{:.2f}")),
    ("agreement", "caption agreement", _agreement),
    ("class_agreement", "class agreement", lambda r: _agreement(r, "class_agreement")),
    ("flicker", "flicker", lambda r: _num(r["flicker"], "{:.2f}")),
]


def _samples_sentence(c: dict) -> str:
    if c.get("class_conditional"):
        return (f"Each configuration: {c['samples']} samples ({c['prompts']} classes x {c['seeds']} seeds), compared "
                "with the baseline's samples of the same seeds (PSNR, SSIM, LPIPS) and with their classes (agreement).")
    video = f" videos of {c['frames']} frames" if c["frames"] else " samples"
    return (f"Each configuration: {c['samples']}{video} ({c['prompts']} prompts x {c['seeds']} seeds), compared with "
            "the baseline's samples of the same seeds (PSNR, SSIM, LPIPS, agreement over all of them).")


def _counts_line(results: dict) -> str:
    c, rows = results["counts"], results["rows"]
    line = _samples_sentence(c)
    n = next((r.get("fid_n") or r.get("kid_n") for r in rows if "fid_n" in r or "kid_n" in r), None)
    if n:
        line += f" FID / KID: {n} samples a side."
    batch = c.get("timed_batch", 1)
    timed = f"a batch of {batch} images (one per prompt)" if batch > 1 else "one sample"
    return line + (f" Timing: {timed} per configuration in each of {c['rounds']} interleaved rounds after a warm-up "
                   f"round on {results['environment'].get('gpu') or results['environment'].get('device')}; "
                   "median (min-max); speedup from each round's paired ratio to the baseline.")


def markdown_table(results: dict) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in results["rows"])]
    lines = [_counts_line(results), "", "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in results["rows"]:
        lines.append("| " + " | ".join(cell(row) if key in row else "n/a" for key, _, cell in cols) + " |")
    notes = [f"- {name}: left out: {why}" for name, why in results["omitted"].items()]
    return "\n".join(lines + ["", "Notes:", *notes, f"- Rules: {results['rules']}"])


# The Pareto plot --------------------------------------------------------------------------------------------------

def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, axis label): fidelity to the baseline, and caption agreement only where it varies."""
    panels = [("psnr", "PSNR to baseline (dB, higher: closer)")]
    if all("lpips" in r for r in rows):
        panels.append(("lpips", "LPIPS to baseline (lower: closer)"))
    if all("agreement" in r for r in rows) and len({r["agreement"] for r in rows}) > 1:
        panels.append(("agreement", "caption agreement"))
    return panels


def _y_values(rows: list[dict], key: str) -> tuple[list[float], float | None]:
    """The panel's values; an infinite PSNR (identical to the baseline) drawn at a level above the finite ones."""
    finite = [r[key] for r in rows if not math.isinf(r[key])]
    top = max(finite, default=40.0) + 5.0 if any(math.isinf(r[key]) for r in rows) else None
    return [top if math.isinf(r[key]) else r[key] for r in rows], top


def _method_lines(rows: list[dict]) -> dict[str, list[int]]:
    """Row indices per method (baseline apart), each sorted by speedup."""
    lines: dict[str, list[int]] = {}
    for i, r in enumerate(rows[1:], start=1):
        lines.setdefault(r["method"], []).append(i)
    return {m: sorted(idx, key=lambda i: rows[i]["speedup"]) for m, idx in lines.items()}


def _legend_label(rows: list[dict], method: str, indices: list[int]) -> str:
    settings = [rows[i]["options"] or "defaults" for i in indices]
    return textwrap.fill(f"{method}: " + " | ".join(settings), 60) + ("  (left to right)" if len(indices) > 1 else "")


def _fidelity_panel(ax, rows: list[dict], key: str, label: str) -> None:
    ys, top = _y_values(rows, key)
    for method, idx in _method_lines(rows).items():
        xerr = [[rows[i]["speedup"] - rows[i]["speedup_min"] for i in idx],
                [rows[i]["speedup_max"] - rows[i]["speedup"] for i in idx]]
        ax.errorbar([rows[i]["speedup"] for i in idx], [ys[i] for i in idx], xerr=xerr, marker="o", capsize=3,
                    label=_legend_label(rows, method, idx))
    ax.plot([1.0], [ys[0]], marker="*", markersize=14, color="black", linestyle="none", label="baseline")
    if top is not None:
        ax.axhline(top, color="grey", linestyle=":", linewidth=1)
        ax.annotate("identical to the baseline (PSNR inf)", (0.99, top), xycoords=("axes fraction", "data"),
                    xytext=(0, -10), textcoords="offset points", fontsize=7, color="grey", ha="right")
    if key == "agreement":
        ax.yaxis.set_major_formatter(lambda y, _: f"{y:.0%}")
    ax.axvline(1.0, color="black", linewidth=0.5)
    ax.set(xlabel="speedup over baseline (median, min-max)", ylabel=label)
    ax.grid(alpha=0.3)


def pareto_plot(results: dict, path: str) -> None:
    """Fidelity to the baseline against speedup: a line per method through its settings, sorted by speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, panels = results["rows"], _panels(results["rows"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False, layout="constrained")
    for ax, (key, label) in zip(axes[0], panels):
        _fidelity_panel(ax, rows, key, label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(panels), 2), fontsize=7, frameon=False)
    fig.suptitle(f"Fidelity vs speed ({results['counts']['samples']} samples a configuration, "
                 f"{results['counts']['rounds']} timed rounds)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


# The sample grids -------------------------------------------------------------------------------------------------

def _upscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    return pixels.repeat(factor, axis=-3).repeat(factor, axis=-2)


def _cell(sample: np.ndarray) -> np.ndarray:
    """An image, or a few evenly spaced frames of a video side by side (a thin line apart), upscaled."""
    if sample.ndim == 3:
        return _upscale(sample, UPSCALE)
    picks = np.linspace(0, len(sample) - 1, VIDEO_FRAMES_SHOWN).round().astype(int)
    frames = [np.pad(_upscale(f, UPSCALE), ((0, 0), (0, 2), (0, 0)), constant_values=255) for f in sample[picks]]
    return np.concatenate(frames, axis=1)[:, :-2]


def _first_sample_per_prompt(spec: RunSpec) -> list[int]:
    """Indices (in job order) of the first seed of each of the first prompts."""
    first: dict[int, int] = {}
    for j, (prompt_index, _) in enumerate(spec.jobs()):
        first.setdefault(prompt_index, j)
    return list(first.values())[:GRID_ROWS]


def _mosaic(cells: list[list[np.ndarray]], gap: int) -> np.ndarray:
    """Rows of equally sized cells, white gaps between them."""
    h, w = cells[0][0].shape[-3:-1]
    canvas = np.full((*cells[0][0].shape[:-3], len(cells) * (h + gap) - gap, len(cells[0]) * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            canvas[..., r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w, :] = cell
    return canvas


def _labelled_png(grid: np.ndarray, columns: list[str], rows: list[str], cell_hw: tuple[int, int], gap: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi, (h, w) = 100, cell_hw
    margin_left, margin_top = 1.9, 0.9  # inches for the prompts and the wrapped configuration names
    fig = plt.figure(figsize=(grid.shape[1] / dpi + margin_left + 0.1, grid.shape[0] / dpi + margin_top + 0.1), dpi=dpi)
    width, height = fig.get_size_inches()
    ax = fig.add_axes((margin_left / width, 0.1 / height, grid.shape[1] / dpi / width, grid.shape[0] / dpi / height))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([c * (w + gap) + w / 2 for c in range(len(columns))])
    names = [c.replace("(", " (").replace(",", ", ") for c in columns]  # wrapped between options, not inside
    ax.set_xticklabels([textwrap.fill(n, max(12, w // 7)) for n in names], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (h + gap) + h / 2 for r in range(len(rows))])
    ax.set_yticklabels([textwrap.fill(p, 28) for p in rows], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def sample_grids(run_dir: str, spec: RunSpec, out_dir: str) -> None:
    """samples.png: a column per configuration, a row per prompt (its first seed), upscaled; videos show a few
    frames, and samples.gif plays them in the same rows and columns."""
    picks = _first_sample_per_prompt(spec)
    samples = [load_samples(run_dir, spec, c)[0][picks] for c in spec.configs]  # per configuration: (rows, ...)
    video = samples[0].ndim == 5
    gap = 16 if video else 4  # wider between videos than between their frames
    cells = [[_cell(s[r]) for s in samples] for r in range(len(picks))]
    prompts = [spec.prompts[spec.jobs()[j][0]] for j in picks]
    png = _labelled_png(_mosaic(cells, gap), [c.label for c in spec.configs], prompts, cells[0][0].shape[:2], gap)
    atomic_write(os.path.join(out_dir, "samples.png"), lambda f: f.write(png))
    if video:
        import imageio.v3 as iio

        frames = _mosaic([[_upscale(s[r], UPSCALE) for s in samples] for r in range(len(picks))], gap)
        buf = io.BytesIO()
        iio.imwrite(buf, frames, extension=".gif", duration=120, loop=0)
        atomic_write(os.path.join(out_dir, "samples.gif"), lambda f: f.write(buf.getvalue()))


# All outputs ------------------------------------------------------------------------------------------------------

def write_report(run_dir: str, results: dict) -> str:
    table = markdown_table(results)
    video = " samples.gif plays the videos in the same rows and columns." if results["counts"]["frames"] else ""
    files = (f"Plot: pareto.png (fidelity vs speedup, a line per method). Samples: samples.png (a column per "
             f"configuration, a row per prompt).{video}")
    atomic_write(os.path.join(run_dir, "results.md"), lambda f: f.write(f"{table}\n\n{files}\n".encode()))
    atomic_json(os.path.join(run_dir, "results.json"), results)
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for row in results["rows"] for k in row))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(results["rows"])
    atomic_write(os.path.join(run_dir, "results.csv"), lambda f: f.write(buf.getvalue().encode()))
    pareto_plot(results, os.path.join(run_dir, "pareto.png"))
    return table
