"""Pareto sweeps on the shipped shapes models: `accel-eval pareto` with its default sweeps (each method's knob:
cg_taylor's computed fraction, first_block_cache's threshold, taylorseer's interval, ...; methods that cannot run on
a model are left out, with the reason in the notes), 20 steps, 8 prompts x 2 seeds; its tables copied to
benchmarks/results/pareto_shapes_<device>[_<models>].md and its numbers (every sample's) to .json, its plots to
_<model>_fraction.png / _speedup.png.

    python benchmarks/pareto_shapes.py [--models image,video] [--seeds 2] [--device cuda] [--repeats 3] [--threads 1]
        [--runs DIR]

Models: image, video (17 frames), long-video (4 chunks of 4 frames; the SANA-Video family). Each model is one run
folder under --runs (samples, timing, plots): an interrupted benchmark resumes when run again with the same
arguments. shapes-video takes about half an hour on a 2-core CPU.
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
from accel.eval.harness.generate import atomic_json, atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 20
FRAMES = {"video": 17, "long-video": 16}
DEFAULT_MODELS = "image,video"
PROMPTS = {
    "image": cli.QUICKSTART_IMAGE_PROMPTS,  # 8: every shape, every colour
    "video": ["a red circle moving left", "a blue square moving up", "a green cross moving right",
              "a yellow triangle moving down", "a magenta circle moving up", "a cyan square moving right",
              "a red triangle moving left", "a blue cross moving down"],
}
PROMPTS["long-video"] = PROMPTS["video"]


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
    frames = ["--frames", str(FRAMES[model])] if model in FRAMES else []
    argv = ["pareto", "--pipeline", f"shapes-{model}", "--prompts", prompts, "--seeds", str(args.seeds), "--steps",
            str(STEPS), *frames, "--device", args.device, "--repeats", str(args.repeats), "--out", run_dir]
    print("accel-eval", " ".join(argv), flush=True)
    if cli.main(argv) != 0:
        sys.exit(f"accel-eval pareto failed on shapes-{model}")
    return run_dir


def demote(markdown: str) -> str:
    """Every heading one level down: each model's pareto.md becomes a section of the results file."""
    return re.sub(r"^(#+ )", r"#\1", markdown, flags=re.MULTILINE)


def header(args, device: str, name: str) -> str:
    import diffusers

    noise = (" CPU timings are noisy: the machine's 2 cores were shared with other jobs, so speedups are indicative "
             "only (quality numbers do not depend on it)." if device == "cpu" else "")
    argv = sys.argv[1:]
    if "--runs" in argv:  # where this machine kept the run folders says nothing about the results
        del argv[argv.index("--runs"):argv.index("--runs") + 2]
    command = " ".join(["python benchmarks/pareto_shapes.py", *argv])
    return (f"# Pareto sweeps on the shipped shapes models ({device}, {datetime.date.today().isoformat()})\n\n"
            f"`{command}` (raw numbers, every sample: `{name}.json`; plots: `pareto_shapes_{device}_<model>_fraction.png` "
            f"/ `_speedup.png`). float32, {STEPS} steps, {args.seeds} seeds a prompt, {args.repeats} timed rounds"
            f"{f', {args.threads} CPU thread(s)' if device == 'cpu' else ''}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"{platform.processor() or platform.machine()}.{noise}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="image, video, long-video, comma-separated")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--runs", default=os.path.join(HERE, os.pardir, "out", "pareto_shapes"), help="run folders "
                        "(default: the repository's out/, which git ignores)")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(PROMPTS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(PROMPTS)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # on a shared CPU, torch's threads wait on each other longer than one computes
    device = device_name(args.device)
    runs = {model: sweep(model, args) for model in args.models.split(",")}
    tables = [demote(open(os.path.join(d, "pareto.md")).read()) for d in runs.values()]
    name = f"pareto_shapes_{device}" + ("" if args.models == DEFAULT_MODELS else "_" + args.models.replace(",", "_"))
    out = os.path.join(HERE, "results", name)
    atomic_write(f"{out}.md", lambda f: f.write("\n\n".join([header(args, device, name), *tables]).encode()))
    atomic_json(f"{out}.json", {model: json.load(open(os.path.join(d, "pareto.json"))) for model, d in runs.items()})
    for model, d in runs.items():
        for x in ("fraction", "speedup"):
            shutil.copyfile(os.path.join(d, f"pareto_{x}.png"), os.path.join(HERE, "results", f"pareto_shapes_{device}_{model}_{x}.png"))
    print("wrote", f"{out}.md", f"{out}.json")


if __name__ == "__main__":
    main()
