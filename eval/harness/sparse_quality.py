"""Quality of sparse attention patterns against dense attention on a shipped video model (issue 25).

    accel-eval sparse-quality --out DIR [--pipeline shapes-video] [--patterns preset tiled_3d ...]
    (or python -m accel.eval.harness.sparse_quality with the same options)

Generates every (prompt, seed) once with the unpatched pipeline (dense attention, diffusers' processor) and once per
pattern under `accel.patch(pipe, method="sparse_attention", pattern=...)`, from the same generator seed, and scores
each sparse video against its dense twin: PSNR and SSIM per video (the harness's `metrics.fidelity`, per frame),
their mean, standard deviation and worst case over the videos, and the pattern's block density (the share of
(query block, key block) pairs computed, averaged over the attention layers; dense layers count as 1; for dynamic
patterns the budget's share, the mask itself being chosen per call). The preset's choice for the model's grid is
recorded. Writes DIR/sparse_quality.json and DIR/sparse_quality.md, each through a temporary file and a rename.

On the CPU, the sparse kernel's PyTorch reference runs (unless TRITON_INTERPRET=1, which runs the Triton kernel,
much slower): this measures the patterns' quality, not their speed (benchmarks/sparse_video_gpu.py times them).
Defaults: shapes-video, 3 prompts x 2 seeds, 8 steps, the patterns of DEFAULT_PATTERNS, bfloat16 (the kernel takes
half precision; the dense baseline runs in the same dtype): under 5 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

# "dense" is the control: every block pair through the sparse path, so its distance from the unpatched run is the
# numerical floor (bf16, another summation order) against which the sparse patterns' distances read.
DEFAULT_PATTERNS = ("dense", "preset", "tiled_3d", "local_3d", "dynamic(budget=0.5)", "hybrid")
DEFAULT_PROMPTS = ("a red circle moving left", "a yellow square moving right", "a cyan triangle moving up")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, shared by this module's command line and `accel-eval sparse-quality`."""
    p.add_argument("--out", required=True, help="folder for sparse_quality.json and sparse_quality.md")
    p.add_argument("--pipeline", default="shapes-video", help="a shipped video pipeline name or a local folder")
    p.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS),
                   help="sparse attention patterns (names, or names with keyword arguments)")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=8, help="denoising steps (the model's default is 20; 8 keeps the CPU "
                   "run under 5 minutes)")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: the pipeline's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_args(args) -> None:
    """A ValueError naming the first bad option: checked before the pipeline loads."""
    from accel.attention.sparse import _as_pattern

    if args.steps < 1 or (args.frames is not None and args.frames < 1):
        raise ValueError("--steps and --frames must be >= 1")
    for text in args.patterns:
        try:
            _as_pattern(text)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--patterns {text!r}: {err}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m accel.eval.harness.sparse_quality", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def _generate(pipe, prompt: str, seed: int, steps: int, frames: int | None) -> np.ndarray:
    """One video as uint8 (T, H, W, 3), as the harness stores samples."""
    kwargs = dict(prompt=prompt, num_inference_steps=steps, output_type="np",
                  generator=torch.Generator(device="cpu").manual_seed(seed))
    if frames is not None:
        kwargs["num_frames"] = frames
    out = pipe(**kwargs)
    return (np.asarray(out.frames)[0] * 255).round().clip(0, 255).astype(np.uint8)


def _latent_grid(pipe, frames: int | None) -> tuple[int, int, int]:
    """The transformer's token grid for one call: a pre-hook reads the latents at a probe call's first transformer
    input and stops it there (no step is run)."""
    cfg = pipe.transformer.config
    patch = tuple(cfg.patch_size) if isinstance(cfg.patch_size, (list, tuple)) else (
        cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
    seen = {}

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["grid"] = tuple(s // p for s, p in zip(x.shape[2:], patch))
        raise _Probed

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _generate(pipe, DEFAULT_PROMPTS[0], 0, 1, frames)
    except _Probed:
        pass
    finally:
        handle.remove()
    return seen["grid"]


class _Probed(Exception):
    pass


def pattern_density(pattern, grid, heads: int, num_layers: int) -> float:
    """Share of block pairs computed, averaged over the self-attention layers (dense layers count 1)."""
    from accel.attention.sparse import DynamicPattern, HybridPattern, PBSPattern, PresetPattern

    sparse_layers = pattern.sparse_layers(num_layers)
    inner = pattern.inner if isinstance(pattern, HybridPattern) else pattern
    built = inner.build(grid, heads, torch.device("cpu"))
    if isinstance(inner, PresetPattern):
        inner, built = built
    mk = math.ceil(math.prod(grid) / getattr(inner, "block_size", 1))
    if isinstance(inner, DynamicPattern):  # a share chosen per call: the budget's
        density = built["width"] / mk
    elif isinstance(inner, PBSPattern):
        density = built["budget"] / mk
    else:
        density = built.density()
    return (sum(sparse_layers) * density + (num_layers - sum(sparse_layers))) / num_layers


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def _fmt(x: float, digits: int) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        f"# Sparse attention vs dense: {result['pipeline']}",
        "",
        f"{len(result['prompts'])} prompts x {len(result['seeds'])} seeds, {result['steps']} steps, {result['dtype']} on "
        f"{result['device']}; latent grid {tuple(result['grid'])}, {result['heads']} heads, {result['layers']} layers. "
        f"PSNR (dB) and SSIM of each video against the dense one of the same prompt and seed: mean ± std (worst).",
        "",
        "| pattern | resolved | block density | PSNR | SSIM |",
        "|---|---|---|---|---|",
    ]
    for row in result["patterns"]:
        if "error" in row:
            lines.append(f"| `{row['pattern']}` | error: {row['error']} | | | |")
            continue
        p, s = row["psnr"], row["ssim"]
        lines.append(f"| `{row['pattern']}` | {row['resolved']} | {row['density']:.3f} | {_fmt(p['mean'], 2)} ± "
                     f"{_fmt(p['std'], 2)} ({_fmt(p['min'], 2)}) | {s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.4f}) |")
    lines += ["", f"Generated in {result['seconds']:.0f} s by `{result['command']}`.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return run(parse_args(argv), "python -m accel.eval.harness.sparse_quality " + " ".join(argv))


def run(args: argparse.Namespace, command: str) -> dict:
    """Dense, then each pattern, on every (prompt, seed); the results written to args.out and returned."""
    import accel
    from accel.attention.sparse import FAMILIES, PresetPattern, _as_pattern, _bind_family

    from .generate import atomic_json, atomic_write, load_pipeline
    from .metrics import fidelity

    start = time.perf_counter()
    say = lambda text: print(f"[sparse_quality {time.perf_counter() - start:6.1f}s] {text}", file=sys.stderr, flush=True)  # noqa: E731
    if os.environ.get("TRITON_INTERPRET") == "1" and args.device == "cpu":
        say("TRITON_INTERPRET=1: the Triton kernel runs interpreted (slow); unset it for the PyTorch reference")
    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    model = pipe.transformer
    family = FAMILIES.get(type(model).__name__)
    patterns = [_as_pattern(text) for text in args.patterns]  # each text vetted by check_args
    if family is not None:
        patterns = [_bind_family(p, family) for p in patterns]
    grid = _latent_grid(pipe, args.frames)
    heads = model.config.num_attention_heads
    layers = len(getattr(model, "blocks", None) or [*model.transformer_blocks, *model.single_transformer_blocks])
    jobs = [(prompt, seed) for prompt in args.prompts for seed in args.seeds]
    total = len(jobs) * (1 + len(patterns))
    done = 0
    say(f"{args.pipeline}: grid {grid}, {len(jobs)} videos x (dense + {len(patterns)} patterns) = {total} generations")
    dense = {}
    for job in jobs:
        dense[job] = _generate(pipe, *job, args.steps, args.frames)
        done += 1
        say(f"{done}/{total} dense {job}")
    rows = []
    for text, pattern in zip(args.patterns, patterns):
        row = {"pattern": text}
        try:
            handle = accel.patch(pipe, method="sparse_attention", pattern=pattern)
        except (NotImplementedError, ValueError, TypeError) as err:
            rows.append({**row, "error": f"{type(err).__name__}: {err}"})
            done += len(jobs)
            say(f"{done}/{total} {text}: refused ({err})")
            continue
        psnr, ssim = [], []
        try:
            for job in jobs:
                video = _generate(pipe, *job, args.steps, args.frames)
                f = fidelity(video[None], dense[job][None])
                psnr.append(f["psnr"])
                ssim.append(f["ssim"])
                done += 1
                say(f"{done}/{total} {text} {job}: PSNR {f['psnr']:.2f} SSIM {f['ssim']:.4f}")
            density = pattern_density(pattern, grid, heads, layers)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:  # found at the first forward
            rows.append({**row, "error": f"{type(err).__name__}: {err}"})
            done = len(jobs) * (len(rows) + 1)  # this pattern's remaining generations are skipped
            say(f"{done}/{total} {text}: failed ({err})")
            continue
        finally:
            handle.remove()
        probe = pattern.inner if hasattr(pattern, "dense_every") else pattern
        resolved = (probe.resolved.get(grid, "") if isinstance(probe, PresetPattern) else text)
        rows.append({**row, "resolved": resolved, "density": density,
                     "psnr": _stats(psnr), "ssim": _stats(ssim), "per_video": [
                         {"prompt": p, "seed": s, "psnr": a, "ssim": b} for (p, s), a, b in zip(jobs, psnr, ssim)]})
    result = {
        "pipeline": args.pipeline, "grid": list(grid), "heads": heads, "layers": layers, "prompts": args.prompts,
        "seeds": args.seeds, "steps": args.steps, "frames": args.frames, "dtype": args.dtype, "device": args.device,
        "torch": torch.__version__, "seconds": time.perf_counter() - start,
        "command": command,
        "patterns": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    atomic_json(os.path.join(args.out, "sparse_quality.json"), result)
    atomic_write(os.path.join(args.out, "sparse_quality.md"), lambda f: f.write(markdown(result).encode()))
    say(f"wrote {os.path.join(args.out, 'sparse_quality.json')} and sparse_quality.md")
    return result


if __name__ == "__main__":
    main()
