"""`accel-eval` (also `python -m accel.eval`): quality vs speed of accelerators on a diffusers pipeline.

    accel-eval quickstart [--out DIR] [--device cuda] the shipped reference pipelines (on the CPU: a few minutes),
                                                      and HMAR against VAR as class-conditional image generators
    accel-eval run --pipeline P --prompts FILE --method cg_taylor:threshold=0.1 --method first_block_cache [...]
    accel-eval pareto --pipeline P --prompts FILE [--sweep cg_taylor:schedule=0.3|0.4|0.5 ...]  each method's knob swept:
                                                      quality vs computed fraction and vs speedup (pareto.md, plots)
    accel-eval report DIR                             rebuild table and plots from a run folder
    accel-eval long-video --out FILE.json [--chunks 20 --seeds 0,1,2]  the shipped long-video models side by side
    accel-eval sparse-quality --out DIR [--patterns preset tiled_3d ...]  sparse attention patterns against dense
                                                      on a shipped video model (PSNR / SSIM, block density)
    accelerate launch -m accel.eval run ...           shard the prompts over processes / GPUs

Bad input gets a one-line message and exit code 2, before anything is generated or written: the arguments, the
output folder, the pipeline, every prompt (the pipeline is run up to its first denoising step) and every method
configuration (patched and removed; a Pareto sweep's methods also run to their second step) are checked first. A run
folder resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys

import torch

from . import sparse_quality
from .spec import RunSpec, SpecError, load_prompts, parse_method, parse_sweep, read_spec

QUICKSTART_METHODS = ["cg_taylor", "cg_taylor:threshold=0.1", "first_block_cache:threshold=0.05",
                      "first_block_cache:threshold=0.1", "taylorseer:cache_interval=3,disable_cache_before_step=3"]
QUICKSTART_IMAGE_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow cross", "a magenta square",
                            "a cyan circle", "a red cross", "a blue triangle"]
QUICKSTART_VIDEO_PROMPTS = ["a red circle moving left", "a blue square moving up", "a green cross moving right"]
# Class-conditional generators, side by side (the first is the baseline): every class once per seed, at the guidance
# their cards measure (3.0). 6 seeds: 144 samples each, the fewest above the classifier's 128 feature dimensions that
# FID needs (one sample takes ~0.03 s on the CPU).
QUICKSTART_GENERATORS = ["shapes-var", "shapes-hmar"]
QUICKSTART_GENERATOR_SEEDS = 6
QUICKSTART_GENERATOR_CALL = {"guidance_scale": 3.0}


class _Parser(argparse.ArgumentParser):
    """argparse's errors as a SpecError: one line, exit code 2 (argparse itself prints the usage too)."""

    def error(self, message):
        raise SpecError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="accel-eval", description="Quality vs speed of diffusion accelerators.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the shipped reference pipelines, baseline and several methods, on the CPU; "
                                          "then HMAR against VAR as class-conditional generators")
    q.add_argument("--out", default="accel-quickstart")
    q.add_argument("--device", default="cpu", help="cpu (the README's first command) or cuda")
    r = sub.add_parser("run", help="evaluate methods on any diffusers pipeline")
    _add_run_arguments(r, seeds=1)
    r.add_argument("--method", action="append", default=[], help="baseline | METHOD[:key=value,...]; repeatable")
    pa = sub.add_parser("pareto", help="sweep each method's main knob: quality vs computed fraction and vs speedup")
    _add_run_arguments(pa, seeds=2)
    pa.add_argument("--sweep", action="append", default=[],
                    help="METHOD:KNOB=v1|v2|v3[,other=value]; repeatable, one line each (lines of one knob differ in "
                         "their fixed options; default: every method's main knob that runs on the pipeline)")
    rep = sub.add_parser("report", help="rebuild the table and plots of a run folder")
    rep.add_argument("dir")
    lv = sub.add_parser("long-video", help="chunk-by-chunk metrics of the shipped long-video models, side by side")
    lv.add_argument("--out", required=True, help="the results file (JSON)")
    lv.add_argument("--prompts", help="a file: one prompt per line, or a JSON list (default: two shapes captions)")
    lv.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    lv.add_argument("--chunks", type=int, default=20)
    lv.add_argument("--steps", type=int, default=20, help="num_inference_steps a chunk")
    lv.add_argument("--device", default="cpu")
    sq = sub.add_parser("sparse-quality", help="sparse attention patterns against dense attention on a shipped video "
                                               "model: PSNR / SSIM per pattern, block density")
    sparse_quality.add_arguments(sq)
    return p


def _add_run_arguments(p: argparse.ArgumentParser, seeds: int) -> None:
    """What `run` and `pareto` share: the pipeline, prompts, call settings, device, timing and output folder."""
    p.add_argument("--pipeline", required=True, help="a shipped reference name, a local folder or a locally cached id")
    p.add_argument("--prompts", required=True, help="a file: one prompt per line, or a JSON list")
    p.add_argument("--seeds", type=int, default=seeds, help="samples per prompt")
    p.add_argument("--steps", type=int, help="num_inference_steps")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="num_frames (video pipelines)")
    p.add_argument("--guidance", type=float, help="guidance_scale")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (all configurations, interleaved) after a warm-up")
    p.add_argument("--out", required=True)


def _spec_from_args(args, configs, sweeps=()) -> RunSpec:
    call = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
            "num_frames": args.frames, "guidance_scale": args.guidance}
    return RunSpec(pipeline=args.pipeline, configs=configs, prompts=load_prompts(args.prompts), seeds=args.seeds,
                   call={k: v for k, v in call.items() if v is not None}, device=args.device, dtype=args.dtype,
                   repeats=args.repeats, sweeps=list(sweeps))


def check_device_present(device: str) -> None:
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        index = torch.device(device).index or 0
        if index >= count:
            raise SpecError(f"--device {device}: this machine has {count} CUDA device(s) (torch {torch.__version__}); "
                            f"allowed: cpu{', cuda' if count else ''}{f', cuda:0..{count - 1}' if count > 1 else ''}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SpecError(f"--device {device}: MPS is not available on this machine; allowed: cpu")


def _has_results(run_dir: str) -> bool:
    """Whether the folder holds samples or timings that a changed spec would leave unexplained."""
    return bool(glob.glob(os.path.join(run_dir, "samples", "*", "*.npy"))) or os.path.exists(os.path.join(run_dir, "timing.json"))


def _spec_differences(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable"
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def _check_out(run_dir: str, spec: RunSpec | None) -> None:
    """--out: a new folder that can be created, an empty one, or a run folder of this spec (resumed), or one of
    another spec that holds no samples yet (a run refused or stopped before generating: taken over). With no spec
    (not known yet), the folder only."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise SpecError(f"--out {run_dir}: exists and is not a folder; allowed: a new, empty or run folder")
    if not os.path.isdir(run_dir):
        parent = os.path.dirname(os.path.abspath(run_dir))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise SpecError(f"--out {run_dir}: cannot be created ({parent} is not a writable folder)")
        return
    spec_path = os.path.join(run_dir, "spec.json")
    if not os.path.exists(spec_path):
        if os.listdir(run_dir):
            raise SpecError(f"--out {run_dir}: holds other files and no spec.json; allowed: a new, empty or run folder")
    elif spec is not None and _has_results(run_dir):
        try:
            old = json.load(open(spec_path, encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if old != spec.to_json():
            raise SpecError(f"--out {run_dir}: holds the samples of another run ({_spec_differences(old, spec.to_json())}); "
                            "pick another --out, or give that run's arguments to resume it")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise SpecError(f"--out {run_dir}: the folder is not writable")


def _check_configs(pipe, spec: RunSpec) -> None:
    """Each configuration patched and unpatched once on the loaded pipeline (options that only the model can judge,
    models a method does not support)."""
    from .generate import patch_config

    flag = "--sweep" if spec.sweeps else "--method"
    for config in spec.configs[1:]:
        try:
            patch_config(pipe, config, spec).remove()
        except (TypeError, ValueError, NotImplementedError) as err:
            raise SpecError(f"{flag} {config.label!r}: {err}") from None


def prepare(spec: RunSpec, run_dir: str, narrow=None):
    """Every check of the run, before anything is generated or written; returns the loaded pipeline and the spec.
    `narrow(pipe, spec)`: the spec cut down to what the loaded pipeline runs (a Pareto sweep's methods); the output
    folder is then checked against the narrowed spec."""
    from accelerate import PartialState

    from .generate import check_inputs, load_pipeline

    check_device_present(spec.device)
    _check_out(run_dir, None if narrow else spec)
    device = PartialState(cpu=spec.device == "cpu").device.type if spec.device == "cuda" else spec.device
    pipe = load_pipeline(spec.pipeline, device, spec.dtype)
    check_inputs(pipe, spec)
    if narrow:
        spec = narrow(pipe, spec)
        _check_out(run_dir, spec)
    _check_configs(pipe, spec)
    return pipe, spec


def execute(pipe, spec: RunSpec, run_dir: str) -> str | None:
    """Generate (sharded over accelerate processes), then, on the main process, time, measure and report."""
    from accelerate import PartialState

    from .generate import atomic_json, generate, time_configs

    state = PartialState(cpu=spec.device == "cpu")
    if state.is_main_process:
        atomic_json(os.path.join(run_dir, "spec.json"), spec.to_json())  # all checks passed: the folder is this run's
    with state.split_between_processes(spec.jobs()) as jobs:
        generate(pipe, spec, run_dir, jobs)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    time_configs(pipe, spec, run_dir)  # alone on the machine: the other processes are done
    return report(run_dir, spec)


def report(run_dir: str, spec: RunSpec | None = None) -> str:
    """The table, plots and sample grids of a run folder (a Pareto run's too: its table is the one returned)."""
    from .pareto import write_pareto
    from .report import evaluate, sample_grids, write_report

    spec = spec or read_spec(run_dir)
    results = evaluate(run_dir, spec)
    sample_grids(run_dir, spec, run_dir)
    table = write_report(run_dir, results)
    return write_pareto(run_dir, spec) if spec.sweeps else table


def _saved_mag_ratios(run_dir: str) -> list[float] | None:
    """The MagCache ratios a run folder's spec.json holds: a resumed sweep reuses them rather than measuring again
    (another measurement may differ in the last bits, and the folder would then read as another run's)."""
    try:
        return json.load(open(os.path.join(run_dir, "spec.json"), encoding="utf-8")).get("mag_ratios")
    except (OSError, ValueError, AttributeError):
        return None  # no run there yet (or a damaged spec.json, which _check_out reports)


def pareto(args) -> str | None:
    """The sweeps given, or every default one whose method runs on the pipeline, as one run."""
    from .pareto import DEFAULT_SWEEPS, applicable

    sweeps = [parse_sweep(s) for s in args.sweep or DEFAULT_SWEEPS]
    spec = _spec_from_args(args, [c for s in sweeps for c in s.configs()], sweeps)
    spec = dataclasses.replace(spec, mag_ratios=_saved_mag_ratios(args.out))
    pipe, spec = prepare(spec, args.out, narrow=lambda pipe, spec: applicable(pipe, spec, strict=bool(args.sweep)))
    return execute(pipe, spec, args.out)


def _sample_labels(spec, run_dir: str) -> list[int]:
    """The class id of each sample of a class-conditional baseline run, as recorded at generation."""
    from .class_conditional import sample_labels
    from .generate import load_samples

    labels = sample_labels(load_samples(run_dir, spec, spec.configs[0])[1])
    if labels is None:  # samples written before their class was recorded
        raise SpecError(f"{run_dir}: its samples do not record their class ids; move the folder away and run again")
    return labels


def compare_generators(prepared: list[tuple], out: str) -> str:
    """Class-conditional generators side by side, the first the baseline: each a baseline-only run in its own folder
    (samples, results.md), all timed in the same interleaved rounds, then one table with their peak memory and, for
    the shapes generators, real images' figures as a reference: generators.md / .json in out."""
    from .class_conditional import comparison, peak_memory_gb, real_figures
    from .generate import atomic_json, atomic_write, generate, time_runs, timing_path
    from .metrics import is_shapes_pipeline

    runs = [(pipe, spec, os.path.join(out, name)) for pipe, spec, name in prepared]
    for pipe, spec, run_dir in runs:
        atomic_json(os.path.join(run_dir, "spec.json"), spec.to_json())
        generate(pipe, spec, run_dir, spec.jobs())
    time_runs(runs)
    peaks = {spec.pipeline: peak_memory_gb(pipe, spec) for pipe, spec, _ in runs}
    results, timings = {}, {}
    for _, spec, run_dir in runs:
        report(run_dir, spec)
        results[spec.pipeline] = json.load(open(os.path.join(run_dir, "results.json")))
        timings[spec.pipeline] = json.load(open(timing_path(run_dir)))
    shapes = all(is_shapes_pipeline(spec.pipeline) for _, spec, _ in runs)
    real = real_figures(_sample_labels(*runs[0][1:])) if shapes else None
    table, data = comparison(results, timings, peaks, real)
    atomic_write(os.path.join(out, "generators.md"), lambda f: f.write(f"{table}\n".encode()))
    atomic_json(os.path.join(out, "generators.json"), data)
    return table


def quickstart(out: str, device: str = "cpu") -> str:
    """The shipped prompted pipelines under each quickstart method, then the shipped class-conditional generators
    side by side; every run checked before any generates."""
    from accel.pipelines.hmar.train import CLASS_NAMES

    configs = [parse_method(m) for m in QUICKSTART_METHODS]
    runs = [(RunSpec("shapes-image", configs, QUICKSTART_IMAGE_PROMPTS, repeats=3, device=device), "shapes-image"),
            (RunSpec("shapes-video", configs, QUICKSTART_VIDEO_PROMPTS, repeats=2, device=device), "shapes-video")]
    generators = [(RunSpec(name, [], list(CLASS_NAMES), seeds=QUICKSTART_GENERATOR_SEEDS,
                           call=QUICKSTART_GENERATOR_CALL, repeats=3, device=device), name)
                  for name in QUICKSTART_GENERATORS]
    prepared = [(*prepare(spec, os.path.join(out, name)), name) for spec, name in runs + generators]
    tables = [f"## {name}\n\n{execute(pipe, spec, os.path.join(out, name))}"
              for pipe, spec, name in prepared[:len(runs)]]
    tables.append(f"## HMAR vs VAR: {' against '.join(QUICKSTART_GENERATORS[::-1])}, class-conditional generators\n\n"
                  f"{compare_generators(prepared[len(runs):], out)}")
    return "\n\n".join(tables) + f"\n\nResults, plots and samples: {out}/"


def long_video(args) -> str:
    from .long_video import run_shipped

    prompts = load_prompts(args.prompts) if args.prompts else QUICKSTART_VIDEO_PROMPTS[:2]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SpecError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    for name in ("chunks", "steps"):
        if getattr(args, name) < 1:
            raise SpecError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_device_present(args.device)
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpecError(f"--out {args.out}: {parent} is not a writable folder")
    return run_shipped(args.out, prompts, seeds, args.chunks, args.steps, args.device)


def sparse_quality_table(args, argv) -> str:
    try:
        sparse_quality.check_args(args)
    except ValueError as err:
        raise SpecError(str(err)) from None
    check_device_present(args.device)
    argv = sys.argv[1:] if argv is None else argv
    return sparse_quality.markdown(sparse_quality.run(args, "accel-eval " + " ".join(argv)))


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "quickstart":
            text = quickstart(args.out, args.device)
        elif args.command == "run":
            spec = _spec_from_args(args, [parse_method(m) for m in args.method or ["cg_taylor"]])
            text = execute(*prepare(spec, args.out), args.out)
        elif args.command == "pareto":
            text = pareto(args)
        elif args.command == "long-video":
            text = long_video(args)
        elif args.command == "sparse-quality":
            text = sparse_quality_table(args, argv)
        else:
            text = report(args.dir)
    except SpecError as err:
        print(f"accel-eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if text:
        print(text)
    return 0
