"""`accel-eval` (also `python -m accel.eval`): quality vs speed of accelerators on a diffusers pipeline.

    accel-eval quickstart [--out DIR] [--device cuda] the shipped reference pipelines (on the CPU: a few minutes)
    accel-eval run --pipeline P --prompts FILE --method cg_taylor:threshold=0.1 --method first_block_cache [...]
    accel-eval report DIR                             rebuild table and plots from a run folder
    accelerate launch -m accel.eval run ...           shard the prompts over processes / GPUs

Bad input gets a one-line message and exit code 2. A run folder resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .spec import RunSpec, SpecError, load_prompts, parse_method

QUICKSTART_METHODS = ["cg_taylor", "cg_taylor:threshold=0.1", "first_block_cache:threshold=0.05",
                      "first_block_cache:threshold=0.1", "taylorseer:cache_interval=3,disable_cache_before_step=3"]
QUICKSTART_IMAGE_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow cross", "a magenta square",
                            "a cyan circle", "a red cross", "a blue triangle"]
QUICKSTART_VIDEO_PROMPTS = ["a red circle moving left", "a blue square moving up", "a green cross moving right"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel-eval", description="Quality vs speed of diffusion accelerators.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the shipped reference pipelines, baseline and several methods, on the CPU")
    q.add_argument("--out", default="accel-quickstart")
    q.add_argument("--device", default="cpu", help="cpu (the README's first command) or cuda")
    r = sub.add_parser("run", help="evaluate methods on any diffusers pipeline")
    r.add_argument("--pipeline", required=True, help="a shipped reference name, a local folder or a locally cached id")
    r.add_argument("--prompts", required=True, help="a file: one prompt per line, or a JSON list")
    r.add_argument("--method", action="append", default=[], help="baseline | METHOD[:key=value,...]; repeatable")
    r.add_argument("--seeds", type=int, default=1, help="samples per prompt")
    r.add_argument("--steps", type=int, help="num_inference_steps")
    r.add_argument("--height", type=int)
    r.add_argument("--width", type=int)
    r.add_argument("--frames", type=int, help="num_frames (video pipelines)")
    r.add_argument("--guidance", type=float, help="guidance_scale")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    r.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration")
    r.add_argument("--out", required=True)
    rep = sub.add_parser("report", help="rebuild the table and plots of a run folder")
    rep.add_argument("dir")
    return p


def _spec_from_args(args) -> RunSpec:
    call = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
            "num_frames": args.frames, "guidance_scale": args.guidance}
    return RunSpec(pipeline=args.pipeline, configs=[parse_method(m) for m in args.method or ["cg_taylor"]],
                   prompts=load_prompts(args.prompts), seeds=args.seeds, call={k: v for k, v in call.items() if v is not None},
                   device=args.device, dtype=args.dtype, repeats=args.repeats)


def _check_configs(pipe, spec: RunSpec) -> None:
    """The call's arguments, and each configuration patched and unpatched once: bad input fails before any file is
    written."""
    from .generate import check_call_arguments, patch_config

    check_call_arguments(pipe, spec.call)
    for config in spec.configs[1:]:
        try:
            patch_config(pipe, config, spec).remove()
        except (TypeError, ValueError, NotImplementedError) as err:
            raise SpecError(f"{config.label}: {err}") from None


def execute(spec: RunSpec, run_dir: str) -> str | None:
    """Generate (sharded over accelerate processes), then, on the main process, measure and report."""
    from accelerate import PartialState

    from .generate import atomic_json, generate, load_pipeline
    from .report import evaluate, sample_grids, write_report

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"--device {spec.device}: this machine has no CUDA device (torch {torch.__version__})")
    state = PartialState(cpu=spec.device == "cpu")
    spec_path = os.path.join(run_dir, "spec.json")
    if os.path.exists(spec_path) and json.load(open(spec_path)) != json.loads(json.dumps(spec.to_json())):
        raise SpecError(f"{run_dir} holds another run (spec.json differs): pick another --out")
    pipe = load_pipeline(spec.pipeline, spec.device if spec.device != "cuda" else state.device.type, spec.dtype)
    _check_configs(pipe, spec)
    if state.is_main_process:
        atomic_json(spec_path, spec.to_json())
    with state.split_between_processes(spec.jobs()) as jobs:
        generate(pipe, spec, run_dir, jobs, time_it=state.is_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = evaluate(run_dir, spec)
    sample_grids(run_dir, spec, run_dir)
    return write_report(run_dir, results)


def report(run_dir: str) -> str:
    from .report import evaluate, sample_grids, write_report

    spec_path = os.path.join(run_dir, "spec.json")
    if not os.path.isfile(spec_path):
        raise SpecError(f"{run_dir} is not a run folder (no spec.json)")
    spec = RunSpec.from_json(json.load(open(spec_path)))
    results = evaluate(run_dir, spec)
    sample_grids(run_dir, spec, run_dir)
    return write_report(run_dir, results)


def quickstart(out: str, device: str = "cpu") -> str:
    configs = [parse_method(m) for m in QUICKSTART_METHODS]
    image = RunSpec("shapes-image", configs, QUICKSTART_IMAGE_PROMPTS, repeats=3, device=device)
    video = RunSpec("shapes-video", configs, QUICKSTART_VIDEO_PROMPTS, repeats=1, device=device)
    tables = [f"## {s.pipeline}\n\n{execute(s, os.path.join(out, s.pipeline))}" for s in (image, video)]
    return "\n\n".join(tables) + f"\n\nResults, plots and samples: {out}/"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            text = quickstart(args.out, args.device)
        elif args.command == "run":
            text = execute(_spec_from_args(args), args.out)
        else:
            text = report(args.dir)
    except (SpecError, FileNotFoundError) as err:
        print(f"accel-eval: error: {err}", file=sys.stderr)
        return 2
    if text:
        print(text)
    return 0
