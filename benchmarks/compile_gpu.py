"""CG-Taylor and diffusers' FirstBlockCache under `torch.compile(transformer)`, beside the same methods eager.

    python benchmarks/compile_gpu.py [--models wan,flux] [--deadline 540] [--out benchmarks/results/compile_<gpu>.json]

Random-init bf16 transformers with the real shapes (`cg_taylor_gpu.build`), a denoising loop of 20 (Wan) / 28 (FLUX)
steps with one cache context per step. Per configuration: two warm-up generations (compilation, recompilations),
then one timed generation; per-step times between device synchronisations; the graph breaks Dynamo reported (by
reason) and the frames it compiled. "always" predicts / caches every step the method allows; "nothing" never does
(the method's overhead). Both methods are compiled the same way: `torch.compile(model)` after `accel.patch`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
from torch._dynamo.utils import counters

import accel
from cg_taylor_gpu import build, run_loop

STEPS = {"wan": 20, "flux": 28}
CONFIGS = {  # name -> (compiled, method, options)
    "eager": (False, None, {}),
    "eager_cg_taylor_always": (False, "cg_taylor", {"threshold": 1e9, "max_consecutive_predicted": 10**6}),
    "eager_fbc_always": (False, "first_block_cache", {"threshold": 1e9}),
    "compiled": (True, None, {}),
    "compiled_cg_taylor_nothing": (True, "cg_taylor", {"threshold": 0.0}),
    "compiled_cg_taylor_always": (True, "cg_taylor", {"threshold": 1e9, "max_consecutive_predicted": 10**6}),
    "compiled_fbc_nothing": (True, "first_block_cache", {"threshold": 0.0}),
    "compiled_fbc_always": (True, "first_block_cache", {"threshold": 1e9}),
    # diffusers' own enable_cache, without accel's step hook and counter: what a diffusers user compiles
    "compiled_fbc_native_always": (True, "native_first_block_cache", {"threshold": 1e9}),
}


def measure(model, x, name: str, compiled: bool, method: str | None, options: dict) -> dict:
    steps = STEPS[name]
    torch._dynamo.reset()
    counters.clear()
    native = method == "native_first_block_cache"
    if native:
        from diffusers.hooks import FirstBlockCacheConfig

        model.enable_cache(FirstBlockCacheConfig(**options))
    handle = accel.patch(model, method=method, num_inference_steps=steps, **options) if method and not native else None
    target = torch.compile(model) if compiled else model
    try:
        start = time.perf_counter()
        for _ in range(2):
            run_loop(target, x, steps, name)
        warmup_s = time.perf_counter() - start
        per, _ = run_loop(target, x, steps, name)
        stats = handle.stats() if handle else {"computed": None if native else steps, "predicted": None, "predicted_steps": []}
    finally:
        if handle:
            handle.remove()
        if native:
            model.disable_cache()
    predicted = set(stats["predicted_steps"])
    full = [p for i, p in enumerate(per) if i not in predicted]
    skipped = [p for i, p in enumerate(per) if i in predicted]
    return {
        "total_s": sum(per), "warmup_s": warmup_s, "computed": stats["computed"], "predicted": stats["predicted"],
        "median_full_step_ms": 1e3 * statistics.median(full) if full else None,
        "median_predicted_step_ms": 1e3 * statistics.median(skipped) if skipped else None,
        "graph_breaks": {reason.split("\n")[0] + " | " + _where(reason): n for reason, n in counters["graph_break"].items()},
        "frames_compiled": dict(counters["stats"]),
    }


def _where(reason: str) -> str:
    """The function a graph break names (Dynamo's messages carry it in their explanation line)."""
    line = next((ln for ln in reason.splitlines() if "function" in ln), "")
    return line.strip()[:160]


def bench(name: str, deadline: float, configs: list[str]) -> dict:
    model, x, _, _ = build(name)
    out = {"steps": STEPS[name]}
    for config in configs:
        compiled, method, options = CONFIGS[config]
        if time.perf_counter() > deadline:
            out[config] = "skipped: deadline"
            continue
        out[config] = measure(model, x, name, compiled, method, options)
        print(name, config, {k: v for k, v in out[config].items() if k not in ("graph_breaks", "frames_compiled")}, flush=True)
    ok = [c for c in configs if isinstance(out.get(c), dict)]
    base = out["eager"]["total_s"]
    out["summary"] = {c: {"speedup_vs_eager": base / out[c]["total_s"], "computed": out[c]["computed"],
                          "graph_break_kinds": len(out[c]["graph_breaks"])} for c in ok}
    del model
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="wan,flux")
    p.add_argument("--deadline", type=float, default=540, help="seconds; later configurations are skipped")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {','.join(CONFIGS)} (eager first)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import diffusers
    import triton

    gpu = torch.cuda.get_device_name()
    out = args.out or f"benchmarks/results/compile_{gpu.split()[-1].lower()}.json"
    deadline = time.perf_counter() + args.deadline
    res = {"env": {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
                   "python": platform.python_version(), "date": datetime.date.today().isoformat(), "dtype": "bfloat16"},
           "models": {}}
    for name in args.models.split(","):
        res["models"][name] = bench(name, deadline, args.configs.split(","))
        print(name, json.dumps(res["models"][name]["summary"], indent=1), flush=True)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        json.dump(res, open(out + ".tmp", "w"), indent=1)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
