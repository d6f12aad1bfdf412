"""HMAR against VAR on the GPU: segment attention, the d16 training step, and sampling (time and peak memory).

    python benchmarks/hmar_gpu.py [--out benchmarks/results/hmar_h100.json] [--parts attention,training,sampling]

1. Segment attention at the HMAR shape (batch 64, 16 heads, 680 tokens of scales (1, 2, 3, 4, 5, 6, 8, 10, 13,
   16)^2, head dim 64, bf16; q, k, v strided as the model's fused qkv leaves them), block-diagonal (HMAR) and
   block-causal (VAR): forward and forward + backward of every segment backend (attention.py: the block-sparse
   kernel on 128- and 64-token mask blocks, one SDPA call per segment, varlen flash for block-diagonal) against SDPA
   with the dense boolean mask and FlexAttention (compiled) with the segments as mask_mod; each output and gradient
   checked against autograd through the float64 reference on two batch entries.
2. The training step of d16-shaped models (depth 16, width 1024, 16 heads; random init, bf16 weights, AdamW):
   HMAR's next-scale step and VAR's, batch 64, on each backend and on dense masked SDPA (the baseline the issue
   names), `next_scale_loss` + backward + optimizer step.
3. Sampling at batch 64 (VAR's KV-cached sampler, HMAR with its default refinement schedule), CFG 1.5, top-k 900,
   top-p 0.96, VAR's tokenizer config (random init), output_type "pt": wall time and peak memory
   (torch.cuda.max_memory_allocated over the call), with the tokenizer's decode (common to both), with it
   swapped for a no-op ("tokens_only"), with it sliced 8 images at a time ("sliced_decode", `enable_slicing(8)`),
   and the decode alone.
Times: `triton.testing.do_bench` medians for the attention ops; CUDA-event means of timed repeats after warm-up for
the training step and sampling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from accel.kernels import block_causal_mask, block_diagonal_mask, block_sparse_attention, block_sparse_attention_reference
from accel.pipelines.hmar import HMARPipeline, HMARTransformer, VARPipeline, VARTokenizer, VARTransformer
from accel.pipelines.hmar import attention as hmar_attention
from accel.pipelines.hmar.scales import VAR_SCALES, SegmentMask
from accel.pipelines.hmar.training import next_scale_loss

DEV = "cuda"
LENGTHS = tuple(s * s for s in VAR_SCALES)
BATCH, HEADS, HEAD_DIM, DEPTH = 64, 16, 64, 16
DECODE_SLICE = 8  # images per decoder call in the "_sliced_decode" runs
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def time_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def event_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30)) if torch.isfinite(got).all() else float("nan")


# ------------------------------------------------------------------------------------------------ attention


def dense_mask(causal: bool) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEV), torch.tensor(LENGTHS, device=DEV))
    return seg[None, :] <= seg[:, None] if causal else seg[None, :] == seg[:, None]


def implementations(causal: bool, flex) -> dict:
    """name -> f(q, k, v) over the (B, H, N, D) inputs, scale 1/8."""
    scale, mask = HEAD_DIM**-0.5, dense_mask(causal)
    impls = {"sdpa_dense_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)}
    for block in (128, 64):
        bm = (block_causal_mask if causal else block_diagonal_mask)(list(LENGTHS), block, DEV)
        impls[f"block_sparse_{block}"] = lambda q, k, v, bm=bm: block_sparse_attention(q, k, v, bm, scale=scale)
    for backend in ("sdpa", "varlen") if not causal else ("sdpa",):
        segments = SegmentMask(LENGTHS, causal, backend)
        impls[f"segments_{backend}"] = lambda q, k, v, s=segments: hmar_attention.segment_attention(q, k, v, s, scale)
    if flex is not None:
        create_block_mask, flex_fn = flex
        seg = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEV), torch.tensor(LENGTHS, device=DEV))

        def mod(b, h, qi, ki):
            return (seg[ki] <= seg[qi]) if causal else (seg[ki] == seg[qi])

        n = sum(LENGTHS)
        block_mask = create_block_mask(mod, None, None, n, n, device=DEV)
        impls["flex_attention"] = lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask, scale=scale)
    return impls


def model_layout_inputs(gen) -> list[torch.Tensor]:
    """q, k, v (B, H, N, D) as views of one (B, N, 3, H, D) tensor, the fused qkv projection's layout."""
    qkv = torch.randn(BATCH, sum(LENGTHS), 3, HEADS, HEAD_DIM, device=DEV, generator=gen, dtype=torch.bfloat16)
    return [x.requires_grad_() for x in qkv.permute(2, 0, 3, 1, 4).unbind(0)]


def bench_attention(gen) -> dict:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = (create_block_mask, torch.compile(flex_attention, dynamic=False))
    except Exception as error:  # noqa: BLE001 - reported in the results
        flex, log_flex = None, repr(error)
    results = {}
    for causal in (False, True):
        name = "block_causal" if causal else "block_diagonal"
        q, k, v = (x.detach().requires_grad_() for x in model_layout_inputs(gen))
        do = torch.randn(q.shape, device=DEV, generator=gen, dtype=torch.bfloat16)
        ref_in = [x.detach()[:2].double().requires_grad_() for x in (q, k, v)]
        bm = (block_causal_mask if causal else block_diagonal_mask)(list(LENGTHS), 64, DEV)
        ref = block_sparse_attention_reference(*ref_in, bm, scale=HEAD_DIM**-0.5)
        ref_grads = torch.autograd.grad(ref, ref_in, do[:2].double())
        rows = {}
        for impl, fn in implementations(causal, flex).items():
            row = {}
            try:
                out = fn(q, k, v)
                grads = torch.autograd.grad(out, (q, k, v), do)
                row["rel_err_out"] = rel_err(out[:2], ref)
                row.update({f"rel_err_d{x}": rel_err(g[:2], r) for x, g, r in zip("qkv", grads, ref_grads)})
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(lambda: fn(q, k, v))
                row["fwd_bwd_ms"] = time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
                row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            except Exception as error:  # noqa: BLE001 - an implementation that cannot take the call is reported
                row["error"] = repr(error)[:300]
            rows[impl] = row
            log(name, impl, json.dumps({a: round(b, 5) if isinstance(b, float) else b for a, b in row.items()}))
        base = rows["sdpa_dense_mask"]
        for row in rows.values():
            if "fwd_ms" in row and "fwd_ms" in base:
                row["fwd_speedup_vs_sdpa_mask"] = base["fwd_ms"] / row["fwd_ms"]
                row["bwd_speedup_vs_sdpa_mask"] = base["bwd_ms"] / row["bwd_ms"]
                if "fwd_ms" in rows.get("flex_attention", {}):
                    row["fwd_speedup_vs_flex"] = rows["flex_attention"]["fwd_ms"] / row["fwd_ms"]
        results[name] = rows
    return results


# ------------------------------------------------------------------------------------------ model-level parts


def dense_masked_sdpa(q, k, v, segments: SegmentMask, scale: float) -> torch.Tensor:
    """The baseline: SDPA with the dense boolean (N x N) segment mask."""
    seg = torch.repeat_interleave(torch.arange(len(segments.lengths), device=q.device),
                                  torch.tensor(segments.lengths, device=q.device))
    mask = seg[None, :] <= seg[:, None] if segments.causal else seg[None, :] == seg[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def with_backend(model, backend: str):
    """Run `model` with a segment backend; "dense_mask" swaps in the baseline for the duration."""
    original = hmar_attention.segment_attention

    class Ctx:
        def __enter__(self):
            if backend == "dense_mask":
                hmar_attention.segment_attention = dense_masked_sdpa
            else:
                model.set_segment_attention(backend)

        def __exit__(self, *exc):
            hmar_attention.segment_attention = original
            model.set_segment_attention("auto")

    return Ctx()


def d16(cls, **extra):
    torch.manual_seed(0)
    return cls(num_classes=1000, depth=DEPTH, **extra).to(DEV, torch.bfloat16)


def bench_training(gen) -> dict:
    tokenizer = VARTokenizer().to(DEV).eval()
    indices = [torch.randint(0, 4096, (BATCH, n), device=DEV, generator=gen) for n in LENGTHS]
    labels = torch.randint(0, 1000, (BATCH,), device=DEV, generator=gen)
    results = {}
    for name, cls, backends in (("hmar", HMARTransformer, ("dense_mask", "block_sparse", "sdpa", "varlen", "auto")),
                                ("var", VARTransformer, ("dense_mask", "block_sparse", "sdpa", "auto"))):
        model = d16(cls)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            next_scale_loss(model, tokenizer, indices, labels).backward()
            opt.step()

        rows = {}
        for backend in backends:
            try:
                with with_backend(model, backend):
                    times = event_ms(step, repeats=5)
                rows[backend] = {"step_ms": sum(times) / len(times), "step_ms_min": min(times), "step_ms_max": max(times)}
            except Exception as error:  # noqa: BLE001
                rows[backend] = {"error": repr(error)[:300]}
            log("training", name, backend, json.dumps(rows[backend]))
        base = rows["dense_mask"].get("step_ms")
        for row in rows.values():
            if base and "step_ms" in row:
                row["speedup_vs_dense_mask"] = base / row["step_ms"]
        results[name] = rows
        del model, opt
        torch.cuda.empty_cache()
    return results


def measure(fn, repeats: int = 3) -> dict:
    """Mean and min seconds over timed repeats after a warm-up, and the peak memory the call adds."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = event_ms(fn, repeats=repeats, warmup=0)
    return {"seconds": sum(times) / len(times) / 1e3, "seconds_min": min(times) / 1e3,
            "peak_extra_memory_gib": (torch.cuda.max_memory_allocated() - before) / 2**30}


def bench_sampling(gen) -> dict:
    tokenizer = VARTokenizer().to(DEV, torch.bfloat16).eval()
    labels = torch.randint(0, 1000, (BATCH,), device=DEV, generator=gen).tolist()
    no_refinement = [[n * n] for n in VAR_SCALES]
    results = {}
    runs = (("var", VARPipeline(d16(VARTransformer).eval(), tokenizer), {}),
            ("hmar", HMARPipeline(d16(HMARTransformer).eval(), tokenizer), {}),
            ("hmar_no_refinement", None, {"mask_schedule": no_refinement}))
    decode = tokenizer.decode_latents
    pipes = {}
    for name, pipe, call in runs:
        pipe = pipes[name] = pipe or previous
        pipe.set_progress_bar_config(disable=True)
        # With the tokenizer's decode, with it swapped for a no-op, and with it sliced (`enable_slicing`).
        for suffix in ("", "_tokens_only", "_sliced_decode"):
            tokenizer.decode_latents = decode if suffix != "_tokens_only" else (lambda f: f[:, :3])
            if suffix == "_sliced_decode":
                tokenizer.enable_slicing(DECODE_SLICE)
            with torch.no_grad():
                results[name + suffix] = measure(lambda: pipe(labels, generator=torch.Generator(DEV).manual_seed(0),
                                                              output_type="pt", **call))
            tokenizer.disable_slicing()
            log("sampling", name + suffix, json.dumps(results[name + suffix]))
        tokenizer.decode_latents = decode
        previous = pipe
    # The tokenizer's decode of the final latents is common to both: its share of time and memory.
    f_hat = torch.zeros(BATCH, tokenizer.config.codebook_dim, 16, 16, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        results["decode_only"] = measure(lambda: tokenizer.decode_latents(f_hat))
    log("sampling decode_only", json.dumps(results["decode_only"]))
    del previous
    torch.cuda.empty_cache()
    var, hmar = results["var"], results["hmar"]
    results["hmar_speedup_vs_var"] = var["seconds"] / hmar["seconds"]
    results["hmar_memory_reduction_vs_var"] = var["peak_extra_memory_gib"] / hmar["peak_extra_memory_gib"]
    var, hmar = results["var_tokens_only"], results["hmar_tokens_only"]
    results["hmar_speedup_vs_var_tokens_only"] = var["seconds"] / hmar["seconds"]
    results["hmar_memory_reduction_vs_var_tokens_only"] = var["peak_extra_memory_gib"] / hmar["peak_extra_memory_gib"]
    var, hmar = results["var_sliced_decode"], results["hmar_sliced_decode"]
    results["hmar_speedup_vs_var_sliced_decode"] = var["seconds"] / hmar["seconds"]
    results["hmar_memory_reduction_vs_var_sliced_decode"] = var["peak_extra_memory_gib"] / hmar["peak_extra_memory_gib"]
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/hmar_gpu.json")
    parser.add_argument("--parts", default="attention,training,sampling")
    args = parser.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "varlen_attn_available": hmar_attention.varlen_attn is not None, "batch": BATCH, "depth": DEPTH,
           "shape": [BATCH, HEADS, sum(LENGTHS), HEAD_DIM], "dtype": "bfloat16"}
    log(json.dumps(env))
    results = {"env": env}
    gen = torch.Generator(DEV).manual_seed(0)
    for part, fn in (("attention", bench_attention), ("training", bench_training), ("sampling", bench_sampling)):
        if part in args.parts.split(","):
            try:
                results[part] = fn(gen)
            except Exception as error:  # noqa: BLE001 - keep the other parts' results
                results[part] = {"error": repr(error)[:500]}
                log(part, "failed", repr(error))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
    log("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
