"""Where a non-causal linear-attention call spends its time besides the GPU's work (issue 4's 0.25 ms target).

    python benchmarks/linear_attention_host_gpu.py [--out benchmarks/results/linear_attention_host_h200.json]

1x16x32768x128 bf16, no RoPE (the case whose GPU work, 0.24 ms from a CUDA graph, is under the target but whose
do_bench time was 0.31 ms on 2026-11-28 and 0.24-0.25 ms since). Reports:
- per call: do_bench (L2 flushed), CUDA-graph replay, and host time per call with and without waiting for the GPU;
- the GPU timeline of 20 back-to-back calls (torch.profiler): kernel time, and idle time between kernels;
- the host's Python time by function over 500 calls (cProfile, cumulative): our checks, the autotuner, the launcher.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import platform
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linear_attention_gpu import graph_ms  # noqa: E402  (also maps accel.kernels without an install)

from accel.kernels.linear_attention import linear_attention  # noqa: E402


def host_us(fn, calls: int, sync_each: bool) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if sync_each:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def gpu_timeline(fn, calls: int = 20) -> dict:
    """Kernel time and the gaps between consecutive kernels, per call, from the profiler's GPU events."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    names = {}
    for e in kernels:
        names[e.name[:60]] = names.get(e.name[:60], 0) + e.time_range.elapsed_us() / calls
    return {"kernels_per_call": len(kernels) / calls, "gpu_busy_us_per_call": busy / calls,
            "gpu_idle_us_per_call": (span - busy) / calls, "kernel_us_per_call": names}


def python_profile(fn, calls: int = 500, rows: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/linear_attention_host_h200.json")
    args = p.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 32768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    calls = {"new_output": lambda: linear_attention(q, k, v), "given_output": lambda: linear_attention(q, k, v, out=out)}
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "date": datetime.date.today().isoformat()},
           "shape": "1x16x32768x128 bf16, no RoPE"}
    for name, fn in calls.items():
        fn()  # autotune outside every timing
        r = res[name] = {
            "do_bench_ms": do_bench(fn, warmup=25, rep=200, return_mode="median"),
            "cuda_graph_ms": graph_ms(fn),
            "host_us_per_call_queued": host_us(fn, 200, sync_each=False),
            "host_us_per_call_synchronised": host_us(fn, 200, sync_each=True),
            "gpu_timeline": gpu_timeline(fn),
        }
        print(name, json.dumps(r, indent=1), flush=True)
    res["python_profile_new_output"] = python_profile(calls["new_output"])
    print(res["python_profile_new_output"])
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
