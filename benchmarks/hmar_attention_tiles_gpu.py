"""The block-sparse kernel's tiles at the HMAR shape: which forward and backward configurations serve short
segment masks best (the defaults were tuned on long sequences: 128 x 128 tiles, 8 warps).

    python benchmarks/hmar_attention_tiles_gpu.py [--out benchmarks/results/hmar_attention_tiles_h100.json]

Shape and inputs as `hmar_gpu.py`'s attention part (batch 64, 16 heads, 680 tokens in scales 1..16 squared, head
dim 64, bf16, q / k / v strided as the fused qkv projection leaves them). For the block-diagonal (HMAR) and
block-causal (VAR) masks on 64-token mask blocks: every forward `KernelConfig` and backward
`BackwardConfig` candidate that divides the mask block, each output checked against the float64 reference on two
batch entries, timed with `triton.testing.do_bench` (median), beside SDPA with the dense boolean mask in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hmar_gpu  # noqa: E402  (the shape, inputs and timing helpers)

from accel.eval.harness.generate import atomic_json  # noqa: E402
from accel.kernels import (  # noqa: E402
    block_causal_mask, block_diagonal_mask, block_sparse_attention, block_sparse_attention_reference,
)
from accel.kernels.block_sparse import KernelConfig  # noqa: E402
from accel.kernels.block_sparse.backward import BackwardConfig  # noqa: E402

MASK_BLOCKS = (64,)  # 128-token blocks were slower for both masks (results/hmar_h100.json)
# Few candidates, the likeliest first: the defaults were tuned on long sequences (128 x 128 tiles, 8 warps, here
# clipped to 64 x 64 with 8 warps; backward 32 / 64 / 64 / 32, 4 warps, 3 stages).
FORWARD = [KernelConfig(64, 64, 8, 2, use_tma=True), KernelConfig(64, 64, 4, 2, use_tma=True),
           KernelConfig(64, 64, 4, 3, use_tma=True), KernelConfig(64, 32, 4, 2, use_tma=True),
           KernelConfig(32, 64, 2, 2, use_tma=True), KernelConfig(64, 64, 4, 2)]
BACKWARD = [BackwardConfig(32, 64, 64, 32, num_warps=4, num_stages=3), BackwardConfig(32, 64, 64, 32, num_warps=4),
            BackwardConfig(16, 64, 64, 16, num_warps=4), BackwardConfig(32, 32, 32, 32, num_warps=4),
            BackwardConfig(64, 64, 64, 64, num_warps=8)]


def divides(config, block: int) -> bool:
    tiles = config.tiles() if isinstance(config, BackwardConfig) else (config.block_m, config.block_n)
    return all(block % t == 0 for t in tiles)


def sweep(causal: bool, block: int, q, k, v, do, reference) -> dict:
    """Forward and backward candidates on one mask; each row: its time and relative error."""
    scale = hmar_gpu.HEAD_DIM ** -0.5
    mask = (block_causal_mask if causal else block_diagonal_mask)(list(hmar_gpu.LENGTHS), block, hmar_gpu.DEV)
    ref_out, ref_grads = reference
    rows = {"forward": [], "backward": []}
    for cfg in (c for c in FORWARD if divides(c, block)):
        row = {"config": cfg.__dict__.copy()}
        try:
            with torch.no_grad():
                out = block_sparse_attention(q, k, v, mask, scale=scale, config=cfg)
                row["rel_err"] = hmar_gpu.rel_err(out[:2], ref_out)
                row["ms"] = hmar_gpu.time_ms(lambda: block_sparse_attention(q, k, v, mask, scale=scale, config=cfg))
        except Exception as error:  # noqa: BLE001 - a configuration the compiler refuses is reported
            row["error"] = repr(error)[:200]
        rows["forward"].append(row)
    best_fwd = min((r for r in rows["forward"] if "ms" in r), key=lambda r: r["ms"])
    fwd_cfg = KernelConfig(**best_fwd["config"])
    for cfg in (c for c in BACKWARD if divides(c, block)):
        row = {"config": cfg.__dict__.copy()}
        try:
            def step():
                out = block_sparse_attention(q, k, v, mask, scale=scale, config=fwd_cfg, backward_config=cfg)
                return torch.autograd.grad(out, (q, k, v), do)

            grads = step()
            row["rel_err"] = max(hmar_gpu.rel_err(g[:2], r) for g, r in zip(grads, ref_grads))
            row["fwd_bwd_ms"] = hmar_gpu.time_ms(step)
        except Exception as error:  # noqa: BLE001
            row["error"] = repr(error)[:200]
        rows["backward"].append(row)
    rows["best_forward"] = best_fwd
    rows["best_backward"] = min((r for r in rows["backward"] if "fwd_bwd_ms" in r), key=lambda r: r["fwd_bwd_ms"])
    return rows


def sdpa_baseline(causal: bool, q, k, v, do) -> dict:
    mask, scale = hmar_gpu.dense_mask(causal), hmar_gpu.HEAD_DIM ** -0.5

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    with torch.no_grad():
        fwd_ms = hmar_gpu.time_ms(fwd)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": hmar_gpu.time_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), do))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/hmar_attention_tiles_gpu.json")
    args = parser.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "shape": [hmar_gpu.BATCH, hmar_gpu.HEADS, sum(hmar_gpu.LENGTHS), hmar_gpu.HEAD_DIM], "dtype": "bfloat16"}
    hmar_gpu.log(json.dumps(env))
    results = {"env": env}
    gen = torch.Generator(hmar_gpu.DEV).manual_seed(0)
    for causal, block in itertools.product((False, True), MASK_BLOCKS):
        name = f"{'block_causal' if causal else 'block_diagonal'}_{block}"
        q, k, v = hmar_gpu.model_layout_inputs(gen)
        do = torch.randn(q.shape, device=hmar_gpu.DEV, generator=gen, dtype=torch.bfloat16)
        ref_in = [x.detach()[:2].double().requires_grad_() for x in (q, k, v)]
        mask = (block_causal_mask if causal else block_diagonal_mask)(list(hmar_gpu.LENGTHS), 64, hmar_gpu.DEV)
        ref = block_sparse_attention_reference(*ref_in, mask, scale=hmar_gpu.HEAD_DIM ** -0.5)
        reference = (ref, torch.autograd.grad(ref, ref_in, do[:2].double()))
        results[name] = {"sdpa_dense_mask": sdpa_baseline(causal, q, k, v, do),
                         **sweep(causal, block, q, k, v, do, reference)}
        base, best = results[name]["sdpa_dense_mask"], results[name]
        hmar_gpu.log(name, "sdpa", base, "best fwd", best["best_forward"], "best fwd+bwd", best["best_backward"])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_json(args.out, results)
    hmar_gpu.log("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
