"""Block-sparse attention's backward on the GPU at the HMAR shape, beside SDPA with the dense boolean mask and
FlexAttention (compiled), each differentiated by autograd; plus the gradients' correctness on the GPU.

    python benchmarks/block_sparse_backward_gpu.py [--out benchmarks/results/block_sparse_backward_h100.json]
        [--deadline 300]

Shape: batch 64, 16 heads, 680 tokens (VAR / HMAR scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)^2), head dim 64, bf16.
Masks: block-diagonal (HMAR: each scale sees itself) and block-causal (VAR: each scale sees itself and earlier ones)
over the scale segments, built with mask blocks of 128, 64 and 32 tokens (the token rule makes every block size
exact). Timed: the backward alone, `torch.autograd.grad(out, (q, k, v), dO)` on a retained graph, for ours (tuned over
a few `BackwardConfig`s per mask block size; the library's default counts as a candidate), SDPA with the dense
(N x N) boolean mask (default dispatch, and each backend that takes the call), and FlexAttention with the same
segments as mask_mod (compiled, 128-blocks); forward and forward + backward for context. Times are
`triton.testing.do_bench` medians (L2 flushed before every call). TFLOP/s count 10 * D FLOPs per computed (query,
key) pair for a backward (the five matrix products of FlashAttention-2's accounting; our kernels do seven, the scores
and dP recomputed in both).
Correctness on the GPU: at the benchmark shape, the gradients of the first two batch entries against autograd
through the float64 reference (batch entries are independent); at small sizes, every mask kind (random ragged
tables with empty rows, segments, 3-D windows with global tokens, per-head shards), head dims 64 / 112 / 128,
bf16 and fp16, (B, N, H, D)-strided inputs, gradients into NaN-poisoned buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types

import torch
import torch.nn.functional as F
import triton
import triton.testing

try:
    from accel.kernels import block_sparse as bsa
except ImportError:  # run from a bare checkout (no editable install, no diffusers): load the package by path
    for parent in ("accel", "accel.kernels"):  # empty parents, so that imports inside it never run accel/__init__
        sys.modules[parent] = types.ModuleType(parent)
        sys.modules[parent].__path__ = []
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "block_sparse")
    spec = importlib.util.spec_from_file_location(
        "accel.kernels.block_sparse", os.path.join(root, "__init__.py"), submodule_search_locations=[root]
    )
    bsa = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bsa
    spec.loader.exec_module(bsa)

BackwardConfig = bsa.BackwardConfig
DEV = "cuda"
SCALES = [s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]  # 680 tokens
BATCH, HEADS, HEAD_DIM = 64, 16, 64
MASK_BLOCKS = (128, 64, 32)
CANDIDATES = [  # (dkdv_block_m, dkdv_block_n, dq_block_m, dq_block_n, warps, stages), clipped to the mask block
    BackwardConfig(32, 128, 128, 32, 4, 3), BackwardConfig(64, 64, 64, 64, 4, 2), BackwardConfig(32, 64, 64, 32, 4, 3),
    BackwardConfig(64, 128, 128, 64, 8, 2), BackwardConfig(16, 32, 32, 16, 2, 3),
]
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def time_ms(fn) -> float:
    """do_bench median with warm-up and repeat scaled to the call (at least 5 timed calls)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=max(25.0, est), rep=max(100.0, 5 * est), return_mode="median"))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("nan")
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def cfg_name(c: BackwardConfig) -> str:
    return f"dkdv{c.dkdv_block_m}x{c.dkdv_block_n}_dq{c.dq_block_m}x{c.dq_block_n}_w{c.num_warps}_s{c.num_stages}"


def clip(c: BackwardConfig, bs: int) -> BackwardConfig:
    return dataclasses.replace(c, **{f: min(getattr(c, f), bs) for f in ("dkdv_block_m", "dkdv_block_n", "dq_block_m",
                                                                          "dq_block_n")})


def reference_grads(q, k, v, do, mask):
    """Output and (dq, dk, dv) by autograd through the float64 reference."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = bsa.block_sparse_attention_reference(*leaves, mask, rows_per_chunk=256)
    out.backward(do.double())
    return out.detach(), [x.grad for x in leaves]


def backward_fn(out, inputs, do):
    return lambda: torch.autograd.grad(out, inputs, do, retain_graph=True)


def segments() -> torch.Tensor:
    """The scale index of each token."""
    return torch.repeat_interleave(torch.arange(len(SCALES), device=DEV), torch.tensor(SCALES, device=DEV))


# ------------------------------------------------------------------------------------------------- correctness


def small_cases(gen) -> dict:
    table = torch.rand(2, 3, 8, 7, generator=gen, device=DEV) < 0.5
    table[:, :, 2] = False  # query blocks that see nothing
    table[1, :, :, 4] = False  # a key block no query sees
    lo = torch.randint(0, 700, (640,), generator=gen, device=DEV)
    return {
        "hmar_block_diagonal_bf16_d64_block128": (bsa.block_diagonal_mask(SCALES, 128, DEV), 2, 4, 64, torch.bfloat16),
        "hmar_block_diagonal_fp16_d64_block64": (bsa.block_diagonal_mask(SCALES, 64, DEV), 2, 4, 64, torch.float16),
        "var_block_causal_bf16_d64_block32": (bsa.block_causal_mask(SCALES, 32, DEV), 2, 4, 64, torch.bfloat16),
        "var_block_causal_fp16_d128_block128": (bsa.block_causal_mask(SCALES, 128, DEV), 1, 4, 128, torch.float16),
        "random_table_ragged_empty_rows_bf16_d128": (bsa.table_mask(table, 1000, 777, 128), 2, 3, 128, torch.bfloat16),
        "interval_empty_rows_fp16_d64": (bsa.interval_mask(lo, lo + torch.randint(0, 90, (640,), generator=gen,
                                                                                    device=DEV) * (lo % 5 > 0), 720, 64),
                                         1, 2, 64, torch.float16),
        "local3d_global_bf16_d112": (bsa.local_3d_mask((3, 12, 16), (1, 3, 4), 64, num_global=77, device=DEV), 1, 4,
                                     112, torch.bfloat16),
        "s2_shards_fp16_d128": (bsa.strided_shards_mask(6, 900, 3, 1, 128, DEV), 1, 6, 128, torch.float16),
    }


def check_small(gen, only=None) -> dict:
    out = {}
    for name, (mask, b, h, d, dtype) in small_cases(gen).items():
        if only and name not in only:
            continue
        strided = name.startswith("hmar")  # (B, N, H, D) memory viewed as (B, H, N, D)
        shapes = [(b, h, n, d) for n in (mask.q_len, mask.kv_len, mask.kv_len, mask.q_len)]
        q, k, v, do = (torch.randn(s, device=DEV, generator=gen).to(dtype) for s in shapes)
        if strided:
            q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
        out_ref, grads_ref = reference_grads(q, k, v, do, mask)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = bsa.block_sparse_attention(*leaves, mask)
        grads = torch.autograd.grad(o, leaves, do)
        with torch.no_grad():  # the forward without the log-sum-exp (the inference path)
            o_inference = bsa.block_sparse_attention(q, k, v, mask)
        r = {"n_q": mask.q_len, "n_k": mask.kv_len, "block": mask.block_size, "rule": mask.rule,
             "rel_err_out": rel_err(o, out_ref), "rel_err_out_no_grad": rel_err(o_inference, out_ref)}
        r.update({f"rel_err_d{x}": rel_err(g, ref) for x, g, ref in zip("qkv", grads, grads_ref)})
        # The kernels alone, into NaN-poisoned buffers
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=DEV)
        o2 = torch.empty_like(q)
        scale = 1 / math.sqrt(d)
        bsa.attention._launch(q, k, v, o2, mask, scale, bsa.default_config(q, mask.block_size), lse=lse)
        bufs = [torch.full_like(x, float("nan")) for x in (q, k, v)]
        bsa.block_sparse_attention_backward(do, q, k, v, o2, lse, mask, scale, dq=bufs[0], dk=bufs[1], dv=bufs[2])
        r.update({f"poisoned_rel_err_d{x}": rel_err(g, ref) for x, g, ref in zip("qkv", bufs, grads_ref)})
        tol = 3e-3 if dtype == torch.float16 else 2e-2
        r["ok"] = all(r[key] < tol for key in r if key.startswith(("rel_err", "poisoned")))  # NaN fails
        out[name] = r
        log("correctness", name, json.dumps({key: (round(x, 6) if isinstance(x, float) else x) for key, x in r.items()}))
    return out


# ------------------------------------------------------------------------------------------------------- timing


def flex_setup():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return create_block_mask, torch.compile(flex_attention, dynamic=False)


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}  # math: N x N, slow


def bench_flex(name, res, causal, seg, q, k, v, do, flex, sdpa_grads) -> None:
    """FlexAttention's forward and backward with the segments as mask_mod (compiled), into res."""
    inputs, n = (q, k, v), q.shape[2]
    create_block_mask, flex_fn = flex
    if causal:
        def mod(b, h, qi, ki):
            return seg[ki] <= seg[qi]
    else:
        def mod(b, h, qi, ki):
            return seg[qi] == seg[ki]
    try:
        bm = create_block_mask(mod, None, None, n, n, device=DEV)
        fl_out = flex_fn(q, k, v, block_mask=bm)
        res["flex_fwd_ms"] = time_ms(lambda: flex_fn(q, k, v, block_mask=bm))
        res["flex_bwd_ms"] = time_ms(backward_fn(fl_out, inputs, do))
        res["flex_fwd_bwd_ms"] = time_ms(lambda: torch.autograd.grad(flex_fn(q, k, v, block_mask=bm), inputs, do))
        flex_grads = torch.autograd.grad(fl_out, inputs, do, retain_graph=True)
        res["flex_grad_rel_err_vs_sdpa"] = {f"d{x}": rel_err(g, s) for x, g, s in zip("qkv", flex_grads, sdpa_grads)}
        del fl_out, flex_grads
    except Exception as e:
        res["flex"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    log(name, "flex", json.dumps({k_: res.get(k_) for k_ in ("flex_fwd_ms", "flex_bwd_ms", "flex")}))


def bench_mask(name: str, causal: bool, q, k, v, do, flex, deadline: float, mask_blocks, candidates) -> dict:
    inputs = (q, k, v)
    n = q.shape[2]
    seg = segments()
    res = {"per_block_size": {}}
    dense_mask = (seg[None, :] <= seg[:, None]) if causal else (seg[:, None] == seg[None, :])
    pairs = int(dense_mask.sum())
    res["allowed_pairs"] = pairs
    res["token_density"] = pairs / n**2
    bwd_flops = 10.0 * HEAD_DIM * BATCH * HEADS

    # SDPA with the dense boolean mask: default dispatch, then each backend that takes it.
    attn_mask = dense_mask[None, None]
    sd_out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    res["sdpa_fwd_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
    res["sdpa_bwd_ms"] = time_ms(backward_fn(sd_out, inputs, do))
    res["sdpa_fwd_bwd_ms"] = time_ms(lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), inputs, do))
    res["sdpa_bwd_tflops_dense"] = bwd_flops * n * n / res["sdpa_bwd_ms"] / 1e9
    sdpa_grads = torch.autograd.grad(sd_out, inputs, do, retain_graph=True)
    res["sdpa_backends_bwd_ms"] = {}
    from torch.nn.attention import sdpa_kernel

    for bname, backend in sdpa_backends().items():
        try:
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
                res["sdpa_backends_bwd_ms"][bname] = time_ms(backward_fn(o, inputs, do))
            del o
        except Exception as e:  # a backend that does not take a boolean mask with gradients here
            res["sdpa_backends_bwd_ms"][bname] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    log(name, "sdpa", json.dumps({k_: res[k_] for k_ in ("sdpa_fwd_ms", "sdpa_bwd_ms", "sdpa_backends_bwd_ms")}))

    # Ours, per mask block size, tuned over the candidates (and the library's default).
    best = None
    for bs in mask_blocks:
        if time.perf_counter() - T0 > deadline:
            res["per_block_size"][bs] = "skipped: deadline"
            continue
        mask = (bsa.block_causal_mask if causal else bsa.block_diagonal_mask)(SCALES, bs, DEV)
        full_pairs = mask.computed_pairs()
        r = {"block_density": mask.density(), "computed_pairs": full_pairs,
             "full_blocks": int(mask.full_counts.sum()), "partial_blocks": int(mask.partial_counts.sum())}
        default = bsa.default_backward_config(q, bs)
        configs = list(dict.fromkeys([default] + [clip(c, bs) for c in candidates]))
        tuning = {}
        for c in configs:
            try:
                out = bsa.block_sparse_attention(q, k, v, mask, backward_config=c)
                tuning[cfg_name(c)] = time_ms(backward_fn(out, inputs, do))
                del out
            except Exception as e:  # a config that does not compile or launch here is reported, not fatal
                tuning[cfg_name(c)] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        ok = [c for c in configs if isinstance(tuning[cfg_name(c)], float)]
        if not ok:
            r["tuning"] = tuning
            res["per_block_size"][bs] = r
            continue
        c_best = min(ok, key=lambda c: tuning[cfg_name(c)])
        r.update(config=cfg_name(c_best), bwd_ms=tuning[cfg_name(c_best)], default_config=cfg_name(default),
                 default_bwd_ms=tuning[cfg_name(default)], tuning=tuning)
        r["fwd_ms"] = time_ms(lambda: bsa.block_sparse_attention(q, k, v, mask))
        r["fwd_with_lse_ms"] = time_ms(lambda: bsa.block_sparse_attention(q, k, v, mask, backward_config=c_best))
        r["fwd_bwd_ms"] = time_ms(lambda: torch.autograd.grad(
            bsa.block_sparse_attention(q, k, v, mask, backward_config=c_best), inputs, do))
        r["bwd_tflops_computed_pairs"] = bwd_flops * full_pairs / r["bwd_ms"] / 1e9
        r["bwd_speedup_vs_sdpa"] = res["sdpa_bwd_ms"] / r["bwd_ms"]
        # Correctness at this shape: the first two batch entries against the float64 reference; all vs SDPA's.
        out = bsa.block_sparse_attention(q, k, v, mask, backward_config=c_best)
        grads = torch.autograd.grad(out, inputs, do)
        _, refs = reference_grads(q[:2], k[:2], v[:2], do[:2], mask)
        r["grad_rel_err_vs_fp64_reference_batch0_1"] = {f"d{x}": rel_err(g[:2], ref) for x, g, ref in zip("qkv", grads, refs)}
        r["grad_rel_err_vs_sdpa"] = {f"d{x}": rel_err(g, s) for x, g, s in zip("qkv", grads, sdpa_grads)}
        r["all_finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
        del out, grads, refs
        res["per_block_size"][bs] = r
        log(name, f"block{bs}", json.dumps({k_: (round(x, 4) if isinstance(x, float) else x) for k_, x in r.items()
                                            if k_ != "tuning"}))
        if best is None or r["bwd_ms"] < res["per_block_size"][best]["bwd_ms"]:
            best = bs
    # FlexAttention, the same segments as mask_mod, 128-blocks (its default), compiled (skipped past the deadline).
    if time.perf_counter() - T0 > deadline:
        res["flex"] = "skipped: deadline"
    else:
        bench_flex(name, res, causal, seg, q, k, v, do, flex, sdpa_grads)
    for r in res["per_block_size"].values():
        if isinstance(r, dict) and "bwd_ms" in r and "flex_bwd_ms" in res:
            r["bwd_speedup_vs_flex"] = res["flex_bwd_ms"] / r["bwd_ms"]

    if best is not None:
        b = res["per_block_size"][best]
        res["best"] = {"block_size": best, "config": b["config"], "bwd_ms": b["bwd_ms"],
                       "bwd_speedup_vs_sdpa": b["bwd_speedup_vs_sdpa"], "bwd_speedup_vs_flex": b.get("bwd_speedup_vs_flex"),
                       "fwd_bwd_speedup_vs_sdpa": res["sdpa_fwd_bwd_ms"] / b["fwd_bwd_ms"]}
        fastest_sdpa = min([res["sdpa_bwd_ms"]] + [x for x in res["sdpa_backends_bwd_ms"].values() if isinstance(x, float)])
        res["best"]["bwd_speedup_vs_fastest_sdpa_backend"] = fastest_sdpa / b["bwd_ms"]
    del sd_out, sdpa_grads
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="default: benchmarks/results/block_sparse_backward_<gpu>.json")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds after which remaining work is skipped")
    p.add_argument("--mask-blocks", default=",".join(map(str, MASK_BLOCKS)), help="mask block sizes to time")
    p.add_argument("--candidates", type=int, default=len(CANDIDATES), help="the first N backward configs to tune over")
    p.add_argument("--cases", default="", help="correctness cases to run, comma-separated (default: all)")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name()
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.split()[-1].lower()
    out_path = args.out or f"benchmarks/results/block_sparse_backward_{tag}.json"
    res = {
        "env": {"gpu": gpu, "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
                "triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "python": platform.python_version(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "dtype": "bfloat16",
                "shape": [BATCH, HEADS, sum(SCALES), HEAD_DIM], "scales": SCALES},
        "candidates": [cfg_name(c) for c in CANDIDATES[: args.candidates]],
    }

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        json.dump(res, open(out_path + ".tmp", "w"), indent=1)
        os.replace(out_path + ".tmp", out_path)

    gen = torch.Generator(device=DEV).manual_seed(0)
    res["correctness"] = check_small(gen, [c for c in args.cases.split(",") if c])
    res["correctness_all_ok"] = all(r["ok"] for r in res["correctness"].values())
    save()
    shape = (BATCH, HEADS, sum(SCALES), HEAD_DIM)
    q, k, v, do = (torch.randn(shape, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    flex = flex_setup()
    res["masks"] = {}
    for name, causal in (("block_diagonal", False), ("block_causal", True)):
        res["masks"][name] = bench_mask(name, causal, q, k, v, do, flex, args.deadline,
                                        [int(b) for b in args.mask_blocks.split(",")], CANDIDATES[: args.candidates])
        save()
        torch.cuda.empty_cache()
    res["targets"] = {"bwd_ge_1.5x_sdpa_with_mask": {
        name: round(r["best"]["bwd_speedup_vs_sdpa"], 3) for name, r in res["masks"].items() if "best" in r}}
    save()
    log("targets", json.dumps(res["targets"]))
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}; correctness all ok: {res['correctness_all_ok']}")
    for name, r in res["masks"].items():
        print(f"{name}: sdpa+mask bwd {r['sdpa_bwd_ms']:.3f} ms (backends {r['sdpa_backends_bwd_ms']}), "
              f"flex bwd {r.get('flex_bwd_ms', float('nan')):.3f} ms")
        for bs, x in r["per_block_size"].items():
            if isinstance(x, dict) and "bwd_ms" in x:
                print(f"  block {bs:3d}: ours bwd {x['bwd_ms']:.3f} ms ({x['config']}, default {x['default_bwd_ms']:.3f}) "
                      f"x{x['bwd_speedup_vs_sdpa']:.2f} sdpa x{x.get('bwd_speedup_vs_flex', float('nan')):.2f} flex; "
                      f"fwd+bwd {x['fwd_bwd_ms']:.3f} vs sdpa {r['sdpa_fwd_bwd_ms']:.3f}; "
                      f"err vs fp64 {x['grad_rel_err_vs_fp64_reference_batch0_1']}")


if __name__ == "__main__":
    main()
