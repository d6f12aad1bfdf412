"""Pareto sweeps on the shipped shapes models: `accel-eval pareto` with its default sweep (cg_taylor schedule 2-5,
first_block_cache thresholds, taylorseer intervals; methods that cannot run on shapes are left out, with the reason
in the notes), 20 steps, 8 prompts x 2 seeds; its tables copied to benchmarks/results/pareto_shapes_<device>.md and
its numbers (every sample's) to .json, its plots to _<model>_fraction.png / _speedup.png.

    python benchmarks/pareto_shapes.py [--models image,video] [--device cuda] [--repeats 3] [--runs out/pareto_shapes]

Each model is one run folder under --runs (samples, timing, plots): an interrupted benchmark resumes when run again
with the same arguments. shapes-video (17 frames) takes hours on a CPU: run it with --device cuda.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys

import torch

from accel.eval.harness import cli

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 20
SEEDS = 2
VIDEO_FRAMES = 17
PROMPTS = {
    "image": cli.QUICKSTART_IMAGE_PROMPTS,  # 8: every shape, every colour
    "video": ["a red circle moving left", "a blue square moving up", "a green cross moving right",
              "a yellow triangle moving down", "a magenta circle moving up", "a cyan square moving right",
              "a red triangle moving left", "a blue cross moving down"],
}


def device_name(device: str) -> str:
    """"cpu", or the GPU's model ("h100") for the results' file name."""
    if not device.startswith("cuda"):
        return device
    return torch.cuda.get_device_name(torch.device(device)).replace("NVIDIA", "").split()[0].lower()


def sweep(model: str, args) -> str:
    """Runs `accel-eval pareto` on shapes-<model> into its run folder; returns the folder."""
    run_dir = os.path.join(args.runs, f"shapes-{model}")
    os.makedirs(args.runs, exist_ok=True)
    prompts = os.path.join(args.runs, f"prompts-{model}.json")
    with open(prompts, "w") as f:
        json.dump(PROMPTS[model], f)
    frames = ["--frames", str(VIDEO_FRAMES)] if model == "video" else []
    argv = ["pareto", "--pipeline", f"shapes-{model}", "--prompts", prompts, "--seeds", str(SEEDS), "--steps",
            str(STEPS), *frames, "--device", args.device, "--repeats", str(args.repeats), "--out", run_dir]
    print("accel-eval", " ".join(argv), flush=True)
    if cli.main(argv) != 0:
        sys.exit(f"accel-eval pareto failed on shapes-{model}")
    return run_dir


def demote(markdown: str) -> str:
    """Every heading one level down: each model's pareto.md becomes a section of the results file."""
    return re.sub(r"^(#+ )", r"#\1", markdown, flags=re.MULTILINE)


def header(args, device: str) -> str:
    import diffusers

    noise = (" CPU timings are noisy: the machine's 2 cores were shared with other jobs, so speedups are indicative "
             "only (quality numbers do not depend on it)." if device == "cpu" else "")
    command = " ".join(["python benchmarks/pareto_shapes.py", *sys.argv[1:]])
    return (f"# Pareto sweeps on the shipped shapes models ({device}, {datetime.date.today().isoformat()})\n\n"
            f"`{command}` (raw numbers, every sample: `pareto_shapes_{device}.json`; plots: "
            f"`pareto_shapes_{device}_<model>_fraction.png` / `_speedup.png`). float32, {STEPS} steps, {SEEDS} seeds a "
            f"prompt, {args.repeats} timed rounds{', one thread' if device == 'cpu' else ''}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"{platform.processor() or platform.machine()}.{noise}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="image,video")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=os.path.join(HERE, os.pardir, "out", "pareto_shapes"), help="run folders "
                        "(default: the repository's out/, which git ignores)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # on a shared CPU, torch's threads wait on each other longer than one computes
    device = device_name(args.device)
    runs = {model: sweep(model, args) for model in args.models.split(",")}
    tables = [demote(open(os.path.join(d, "pareto.md")).read()) for d in runs.values()]
    out = os.path.join(HERE, "results", f"pareto_shapes_{device}")
    with open(f"{out}.md", "w") as f:
        f.write("\n\n".join([header(args, device), *tables]))
    with open(f"{out}.json", "w") as f:
        json.dump({model: json.load(open(os.path.join(d, "pareto.json"))) for model, d in runs.items()}, f, indent=1)
    for model, d in runs.items():
        for x in ("fraction", "speedup"):
            shutil.copyfile(os.path.join(d, f"pareto_{x}.png"), f"{out}_{model}_{x}.png")
    print("wrote", f"{out}.md", f"{out}.json")


if __name__ == "__main__":
    main()
