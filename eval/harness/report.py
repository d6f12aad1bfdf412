"""From cached samples and timings to the results: a table (markdown, CSV, JSON), a Pareto plot, sample grids."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
from tqdm.auto import tqdm

from . import metrics
from .generate import atomic_json, atomic_write, environment, load_samples
from .spec import RunSpec

COLUMNS = [
    ("config", "config", "{}"), ("latency_s", "latency s", "{:.3f}"), ("speedup", "speedup", "{:.2f}x"),
    ("computed_share", "steps computed", "{:.0%}"), ("peak_memory_gb", "peak GB", "{:.2f}"),
    ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"),
    ("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("clip_score", "CLIPScore", "{:.2f}"),
    ("agreement", "caption agreement", "{:.0%}"), ("flicker", "flicker", "{:.2f}"),
]


def _recorded_environment(run_dir: str, spec: RunSpec) -> dict:
    """Where the samples were generated (a report rebuilt elsewhere keeps it); older runs: this machine, marked."""
    timing = json.load(open(os.path.join(run_dir, "timing", f"{spec.configs[0].slug}.json")))
    return timing.get("environment") or {**environment(spec), "recorded": "when the report was written"}


def _try(fn, *args) -> tuple[dict, dict]:
    try:
        return fn(*args), {}
    except metrics.Unavailable as why:
        return {}, {fn.__name__: str(why)}


def _computed_share(stats: list[dict]) -> float | None:
    steps = sum(s.get("steps", 0) for s in stats)
    return sum(s.get("computed", 0) for s in stats) / steps if steps else None


def evaluate(run_dir: str, spec: RunSpec) -> dict:
    """Every configuration's row: timing, steps computed, fidelity to the baseline, distribution and text metrics."""
    baseline, _ = load_samples(run_dir, spec, spec.configs[0])
    prompts = [spec.prompts[i] for i, _ in spec.jobs()]
    try:
        extractor = metrics.feature_extractor(spec.pipeline)
    except metrics.Unavailable as why:
        extractor, extractor_reason = None, str(why)
    rows, unavailable = [], {}
    for config in tqdm(spec.configs, desc="metrics"):
        samples, stats = load_samples(run_dir, spec, config)
        timing = json.load(open(os.path.join(run_dir, "timing", f"{config.slug}.json")))
        row = {"config": config.label, "latency_s": timing["median_s"], "peak_memory_gb": timing["peak_memory_gb"],
               "computed_share": _computed_share(stats) if config.method else 1.0}
        wanted = set(spec.metrics)
        parts = []
        if "fidelity" in wanted:
            parts += [_try(metrics.fidelity, samples, baseline), _try(metrics.lpips, samples, baseline)]
        if "fid" in wanted:
            parts.append(_try(metrics.fid_kid, samples, baseline, extractor) if extractor else ({}, {"fid_kid": extractor_reason}))
        if "clip" in wanted:
            parts.append(_try(metrics.clip_score, samples, prompts))
        if "agreement" in wanted and metrics.is_shapes_pipeline(spec.pipeline):
            parts.append(_try(metrics.caption_agreement, samples, prompts))
        if "flicker" in wanted and samples.ndim == 5:
            parts.append(_try(metrics.temporal_flicker, samples))
        for values, why in parts:
            row.update(values)
            unavailable.update(why)
        rows.append(row)
    base_latency = rows[0]["latency_s"]
    for row in rows:
        row["speedup"] = base_latency / row["latency_s"]
    return {"environment": _recorded_environment(run_dir, spec), "spec": spec.to_json(), "rows": rows, "unavailable": unavailable,
            "fid_reference": "the baseline's own samples"}


def _cell(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def markdown_table(results: dict) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in results["rows"])]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in cols) + " |")
    for name, why in results["unavailable"].items():
        lines.append(f"\n{name}: unavailable ({why})")
    return "\n".join(lines)


def pareto_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    quality = next((k for k in ("agreement", "clip_score", "ssim") if all(k in r for r in rows)), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    ys = [r.get(quality, 0.0) if quality else 0.0 for r in rows]
    ax.scatter([r["speedup"] for r in rows], ys)
    for r, y in zip(rows, ys):
        ax.annotate(r["config"], (r["speedup"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="speedup over baseline", ylabel=quality or "(no quality metric)", title="quality vs speed")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def sample_grids(run_dir: str, spec: RunSpec, out_dir: str, columns: int = 6) -> None:
    """Rows: configurations; columns: the first samples. Videos also as an animated GIF of the same grid."""
    import imageio.v3 as iio

    tiles = [load_samples(run_dir, spec, c)[0][:columns] for c in spec.configs]
    grid = np.concatenate([np.concatenate(list(t), axis=-2) for t in tiles], axis=-3)  # rows x cols, per frame
    still = grid if grid.ndim == 3 else grid[grid.shape[0] // 2]
    buf = io.BytesIO()
    iio.imwrite(buf, still, extension=".png")
    atomic_write(os.path.join(out_dir, "samples.png"), lambda f: f.write(buf.getvalue()))
    if grid.ndim == 4:
        buf = io.BytesIO()
        iio.imwrite(buf, grid, extension=".gif", duration=120, loop=0)
        atomic_write(os.path.join(out_dir, "samples.gif"), lambda f: f.write(buf.getvalue()))


def write_report(run_dir: str, results: dict) -> str:
    table = markdown_table(results)
    labels = "\n".join(f"- {c['label']}" for c in results["spec"]["configs"])
    atomic_write(os.path.join(run_dir, "results.md"), lambda f: f.write(f"{table}\n\nConfigurations:\n{labels}\n".encode()))
    atomic_json(os.path.join(run_dir, "results.json"), results)
    buf = io.StringIO()
    keys = [c[0] for c in COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["rows"])
    atomic_write(os.path.join(run_dir, "results.csv"), lambda f: f.write(buf.getvalue().encode()))
    pareto_plot(results, os.path.join(run_dir, "pareto.png"))
    return table
