"""The derived tables of the CG-Taylor studies of 2026-12-07, recomputed from their committed raw results (every
sample's PSNR; no model runs). The runs themselves are `accel-eval pareto` commands, written in each results file.

    python benchmarks/cg_taylor_studies.py

Prints, as markdown:
- `results/pareto_shapes_cpu_image_order_reach.md`: each last-block variant's mean PSNR per computed fraction, with its
  mean paired difference to the first variant on seeds 0-1 (where the variants were chosen) and on seeds 2-3 (held
  out); then the chosen default against the other methods at the same computed fraction on all 4 seeds.
- `results/pareto_shapes_cpu_warmup.md`: mean PSNR per computed fraction for each warm-up, on both models.
- `results/pareto_shapes_cpu_image_spacing.md`: mean PSNR per spacing of the computed steps and computed fraction;
  spacing 1.25 against the even placement on held-out seeds, and against the other methods.
- `results/pareto_shapes_cpu_long_video.md` (2026-12-08): CG-Taylor settings on shapes-long-video (the SANA-Video
  family), and the chosen one against the other methods.
"""

from __future__ import annotations

import json
import os
import statistics

from accel.eval.harness import pareto

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = {  # run key in pareto_shapes_cpu_image_order_reach.json -> the table's name
    "v_base": "order 1, damping 0.7 (the previous default)",
    "v_o1d6": "order 1, damping 0.6",
    "v_o1d8": "order 1, damping 0.8",
    "v_o2d7": "order 2, damping 0.7",
    "v_o2d8": "order 2, damping 0.8",
    "v_o2d7r1": "order 2, damping 0.7, order_reach 1",
    "v_o2d7r0.5": "order 2, damping 0.7, order_reach 0.5 (the new default)",
}
CHOSEN = "v_o2d7r0.5"


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def cg_taylor_samples(rows: list[dict], line: str | None = "cg_taylor (schedule)") -> dict[float, list[float]]:
    """Per computed fraction, every sample's PSNR of one CG-Taylor line (None: of the run's only CG-Taylor line)."""
    return {round(r["fraction"], 2): r["samples"]["psnr"] for r in rows
            if (r["line"] == line if line else r["method"] == "cg_taylor")}


def halves(differences: list[float], seeds: int) -> tuple[float, float]:
    """The mean difference on the first half of the seeds and on the second (samples are prompt-major)."""
    first = [d for i, d in enumerate(differences) if i % seeds < seeds // 2]
    second = [d for i, d in enumerate(differences) if i % seeds >= seeds // 2]
    return statistics.fmean(first), statistics.fmean(second)


def held_out_table(runs: dict) -> list[str]:
    seeds = runs["v_base"]["counts"]["seeds"]
    base = cg_taylor_samples(runs["v_base"]["rows"])
    lines = ["| last block | " + " | ".join(f"{f:.2f}" for f in base) + " |", "|---|" + "---|" * len(base)]
    for key, name in VARIANTS.items():
        own, cells = cg_taylor_samples(runs[key]["rows"]), []
        for f, reference in base.items():
            cell = f"{statistics.fmean(own[f]):.2f}"
            if key != "v_base":
                first, second = halves([a - b for a, b in zip(own[f], reference)], seeds)
                cell += f" ({first:+.2f} / {second:+.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def chosen_against_others(runs: dict) -> list[str]:
    others = [r for r in runs["v_base"]["rows"] if r["method"] != "cg_taylor"]
    entries = pareto.curves(others + runs[CHOSEN]["rows"], runs[CHOSEN]["counts"]["seeds"])
    return pareto.curves_table(entries)[4:]  # the table without its heading and explanation


def warmup_table() -> list[str]:
    runs = load("pareto_shapes_cpu_warmup.json")
    image4, video4 = (load(f"pareto_shapes_cpu_{m}_residual.json")["rows"] for m in ("image", "video"))
    video3 = cg_taylor_samples(runs["vid_w3"]["rows"])  # 0.35 and 0.40; 0.30 ran beside the warm-up-4 line
    video3[0.3] = next(r["samples"]["psnr"] for r in video4 if r["line"] == "cg_taylor (warmup_steps)" and r["value"] == 3)
    columns = {  # name -> {fraction: every sample's PSNR}
        "image, warm-up 3": cg_taylor_samples(runs["img_w3"]["rows"]),
        "image, 4": cg_taylor_samples(image4),
        "image, 5": cg_taylor_samples(runs["img_w5"]["rows"]),
        "video, 3": video3,
        "video, 4": cg_taylor_samples(video4),
    }
    lines = ["| computed | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for f in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
        cells = [f"{statistics.fmean(c[f]):.2f}" if f in c else "" for c in columns.values()]
        lines.append(f"| {f:.2f} | " + " | ".join(cells) + " |")
    return lines


SPACINGS = (0.7, 1.0, 1.25, 1.5, 2.0)
FRACTIONS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def spacing_of(row: dict) -> float | None:
    """The spacing a CG-Taylor row's schedule was laid out with (the runs gave the step lists themselves), or None."""
    from accel.cg_taylor import fraction_steps

    if not isinstance(row["value"], list):
        return 1.0  # a fraction schedule: the even placement
    f = round(len(row["value"]) / 20, 2)
    return next((g for g in SPACINGS if sorted(fraction_steps(f, 20, 4, g)) == row["value"]), None)


def spacing_samples(rows: list[dict]) -> dict[tuple[float, float], list[float]]:
    """(spacing, fraction) -> every sample's PSNR, over the CG-Taylor rows of one run."""
    return {(spacing_of(r), round(r["fraction"], 2)): r["samples"]["psnr"] for r in rows if r["method"] == "cg_taylor"}


def spacing_table(runs: dict) -> list[str]:
    """Mean PSNR per spacing and computed fraction on seeds 0-1, the two 2-seed runs together."""
    cells = {**spacing_samples(runs["seeds01_spacing_0.7_1_1.5"]["rows"]),
             **spacing_samples(runs["seeds01_spacing_1.25_1.5_2"]["rows"])}
    lines = ["| spacing | " + " | ".join(f"{f:.2f}" for f in FRACTIONS) + " |", "|---|" + "---|" * len(FRACTIONS)]
    for g in SPACINGS:
        row = [f"{statistics.fmean(cells[g, f]):.2f}" if (g, f) in cells else "" for f in FRACTIONS]
        lines.append(f"| {g:g} | " + " | ".join(row) + " |")
    return lines


def spacing_held_out(run: dict, halves_named: str = "seeds 0-1 / 2-3") -> list[str]:
    """Spacing 1.25 against the even placement: means, and the paired difference on each half of the seeds."""
    cells, seeds = spacing_samples(run["rows"]), run["counts"]["seeds"]
    lines = [f"| computed | even | spacing 1.25 | difference, {halves_named} |", "|---|---|---|---|"]
    for f in FRACTIONS:
        even, packed = cells[1.0, f], cells[1.25, f]
        first, second = halves([a - b for a, b in zip(packed, even)], seeds)
        lines.append(f"| {f:.2f} | {statistics.fmean(even):.2f} | {statistics.fmean(packed):.2f} | "
                     f"{first:+.2f} / {second:+.2f} |")
    return lines


def spacing_against_others(runs: dict) -> list[str]:
    """The spaced schedule against the other methods of the order_reach run (same prompts, the same 4 seeds)."""
    others = [r for r in load("pareto_shapes_cpu_image_order_reach.json")["v_base"]["rows"] if r["method"] != "cg_taylor"]
    spaced = [r for r in runs["seeds0123_spacing_1.25"]["rows"] if r["method"] == "cg_taylor" and spacing_of(r) == 1.25]
    return pareto.curves_table(pareto.curves(others + spaced, 4))[4:]


def spacing_video_against_others() -> list[str]:
    """shapes-video: the spaced schedule against the other methods of the residual run (same prompts and seeds)."""
    others = [r for r in load("pareto_shapes_cpu_video_residual.json")["rows"] if r["method"] != "cg_taylor"]
    run = load("pareto_shapes_cpu_video_spacing.json")["seeds01_spacing_1.25"]
    spaced = [r for r in run["rows"] if r["method"] == "cg_taylor" and spacing_of(r) == 1.25]
    return pareto.curves_table(pareto.curves(others + spaced, run["counts"]["seeds"]))[4:]


LONG_VIDEO = "pareto_shapes_cpu_long_video_study.json"
LONG_VIDEO_LINES = {  # run key in LONG_VIDEO -> the table's name
    "default_sweeps": "output forecast, warm-up 2, even (the family's previous default)",
    "residual_warmup4": "residual, damping 0.7, warm-up 4, spacing 1.25 (Wan's default)",
    "residual_warmup2": "residual, damping 0.7, warm-up 2, spacing 1.25 (the new default)",
}


def long_video_table(runs: dict) -> list[str]:
    """shapes-long-video: mean PSNR per computed fraction of each CG-Taylor setting, with the paired difference to the
    previous default on seed 0 / seed 1 where both ran that fraction."""
    base = cg_taylor_samples(runs["default_sweeps"]["rows"])
    lines = {key: cg_taylor_samples(runs[key]["rows"], line=None) for key in LONG_VIDEO_LINES}
    fractions = sorted({f for c in lines.values() for f in c})
    out = ["| CG-Taylor | " + " | ".join(f"{f:.2f}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for key, name in LONG_VIDEO_LINES.items():
        cells = []
        for f in fractions:
            own = lines[key].get(f)
            cell = f"{statistics.fmean(own):.2f}" if own else ""
            if own and key != "default_sweeps" and f in base:
                first, second = halves([a - b for a, b in zip(own, base[f])], runs[key]["counts"]["seeds"])
                cell += f" ({first:+.2f} / {second:+.2f})"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def long_video_against_others(runs: dict, chosen: str) -> list[str]:
    """The chosen CG-Taylor setting against the other methods of the default sweeps (same prompts and seeds)."""
    others = [r for r in runs["default_sweeps"]["rows"] if r["method"] != "cg_taylor"]
    own = [r for r in runs[chosen]["rows"] if r["method"] == "cg_taylor"]
    return pareto.curves_table(pareto.curves(others + own, runs[chosen]["counts"]["seeds"]))[4:]


def main() -> None:
    runs = load("pareto_shapes_cpu_image_order_reach.json")
    print("## pareto_shapes_cpu_image_order_reach.md: variants, paired difference on seeds 0-1 / 2-3\n")
    print("\n".join(held_out_table(runs)))
    print("\n## pareto_shapes_cpu_image_order_reach.md: the chosen default against the other methods, 4 seeds\n")
    print("\n".join(chosen_against_others(runs)))
    print("\n## pareto_shapes_cpu_warmup.md: mean PSNR per computed fraction\n")
    print("\n".join(warmup_table()))
    runs = load("pareto_shapes_cpu_image_spacing.json")
    print("\n## pareto_shapes_cpu_image_spacing.md: mean PSNR per spacing, seeds 0-1\n")
    print("\n".join(spacing_table(runs)))
    print("\n## pareto_shapes_cpu_image_spacing.md: spacing 1.25 against even, held-out seeds\n")
    print("\n".join(spacing_held_out(runs["seeds0123_spacing_1.25"])))
    print("\n## pareto_shapes_cpu_image_spacing.md: shapes-video, spacing 1.25 against even\n")
    print("\n".join(spacing_held_out(load("pareto_shapes_cpu_video_spacing.json")["seeds01_spacing_1.25"],
                                      "seed 0 / seed 1")))
    print("\n## pareto_shapes_cpu_image_spacing.md: spacing 1.25 against the other methods, 4 seeds\n")
    print("\n".join(spacing_against_others(runs)))
    print("\n## pareto_shapes_cpu_image_spacing.md: shapes-video, spacing 1.25 against the other methods, 2 seeds\n")
    print("\n".join(spacing_video_against_others()))
    runs = load(LONG_VIDEO)
    print("\n## pareto_shapes_cpu_long_video.md: CG-Taylor settings, paired difference on seed 0 / seed 1\n")
    print("\n".join(long_video_table(runs)))
    for key in ("residual_warmup2", "residual_warmup4"):
        print(f"\n## pareto_shapes_cpu_long_video.md: {LONG_VIDEO_LINES[key]} against the other methods\n")
        print("\n".join(long_video_against_others(runs, key)))


if __name__ == "__main__":
    main()
