"""The pooling stage of dynamic block masks (block_pool.py) across its tile rows (CHUNK) and warps, on the GPU.

    python benchmarks/block_pool_gpu.py [--out benchmarks/results/block_pool_<card>.json]

bf16 q and k (1, H, N, 128), 128-token blocks, at FLUX (24 x 4608), Wan-1.3B (12 x 32,760) and Wan-14B
(40 x 75,600) shapes; `triton.testing.do_bench` medians; bandwidth counts the bytes of q and k read once.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform

import torch
import triton
import triton.testing

from accel.eval.harness.generate import atomic_json

SHAPES = {"flux": (24, 4608), "wan1.3b": (12, 32760), "wan14b": (40, 75600)}
BLOCK, D = 128, 128


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    pool = importlib.import_module("accel.kernels.block_sparse.block_pool")
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "dtype": "bfloat16", "block_size": BLOCK, "head_dim": D}, "shapes": {}}
    for name, (heads, n) in SHAPES.items():
        q = torch.randn(1, heads, n, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        m = triton.cdiv(n, BLOCK)
        qp, kp = (torch.empty(1, heads, m, D, device="cuda") for _ in range(2))
        rows = res["shapes"][name] = {}
        for chunk in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                def launch():
                    pool._block_pool_kernel[(2 * m, heads)](
                        q, k, qp, kp, *q.stride(), *k.stride(), n, n, m, m, D, heads,
                        BLOCK_SIZE=BLOCK, CHUNK=chunk, BLOCK_D=D, num_warps=warps)
                launch()
                ms = float(triton.testing.do_bench(launch, return_mode="median"))
                rows[f"chunk{chunk}_warps{warps}"] = {"ms": ms, "tb_per_s": 2 * q.numel() * 2 / ms / 1e9}
                print(name, chunk, warps, f"{ms:.4f} ms", f"{rows[f'chunk{chunk}_warps{warps}']['tb_per_s']:.2f} TB/s",
                      flush=True)
        rows["as_called_ms"] = float(triton.testing.do_bench(lambda: pool.block_pool(q, k, BLOCK), return_mode="median"))
        print(name, "as called", f"{rows['as_called_ms']:.4f} ms", flush=True)
    if args.out:
        atomic_json(args.out, res)


if __name__ == "__main__":
    main()
