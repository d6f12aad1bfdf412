"""ReLU linear-attention kernels on the GPU, beside diffusers' SANA processors, plain PyTorch and fla.

    python benchmarks/linear_attention_gpu.py [--out benchmarks/results/linear_attention_h200.json] [--fla-shapes ...]
        [--shapes name,...]

Shapes: 1x16x32768x128, SANA-Video 2B at 480p, 81 frames (1x20x32760x112, 3D RoPE from diffusers' WanRotaryPosEmbed),
and one block-causal chunk of SANA-Video's size at head dim 112 (1x20x8190x112: 21 latent frames of 15 x 26 tokens,
the size at which the chunk step was once measured at 2.44x the non-causal call), bf16. Per shape, every timing a
median of triton.testing.do_bench (L2 flushed between runs):
- accel non-causal (plain and RoPE), its two kernels apart, and a block-causal chunk step over the same tokens,
  each the median of 3 rounds in rotating order, with the host's time per call and the time of the call replayed
  from a CUDA graph (the GPU's time alone: what is left when Python and launch gaps are taken away);
- plain PyTorch (float32 matmuls, unchunked);
- diffusers' SanaLinearAttnProcessor3_0 (RoPE) and 2_0 (plain) against accel's processors on the attention alone
  (projections replaced by the prepared q, k, v), and on a whole SANA-Video self-attention layer with projections;
- fla's chunk_linear_attn (token-causal, normalised, phi applied beforehand, scale 1): not the same attention, so
  only its time, its final state (= accel's state) and its last token's output (= the non-causal output) compare.
  By default only at the first shape: its autotuning takes about a minute a shape.
The kernels' configurations are autotuned on first use (included in no timing); the chosen ones are in the results.
GB/s counts the bytes of q, k, v and o once (the floor), against a device-to-device copy measured in the same run.
Correctness: accel against a float32 chunked reference (accel.kernels.linear_attention.naive, TF32 off).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import triton
from triton.testing import do_bench
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.transformer_sana_video import (
    SanaLinearAttnProcessor3_0,
    WanRotaryPosEmbed,
)

from accel.attention.linear import SanaLinearAttnKernelProcessor, SanaVideoLinearAttnKernelProcessor
from accel.kernels.linear_attention import (
    RotaryTables,
    block_causal_linear_attention,
    linear_attention,
    naive,
)
from accel.kernels.linear_attention import fused as fused_module
from accel.kernels.linear_attention import state as state_module
from accel.kernels.linear_attention.rotary import rotate_pairs_reference

DEV = "cuda"
BF16 = torch.bfloat16
# name: (B, H, latent frames, latent height, latent width, D); tokens = frames * (height/2) * (width/2), patch (1, 2, 2)
SHAPES = {
    "1x16x32768x128": (1, 16, 8, 128, 128, 128),
    "sana_video_2b_480p_1x20x32760x112": (1, 20, 21, 60, 104, 112),
    "sana_video_2b_chunk_1x20x8190x112": (1, 20, 21, 30, 52, 112),
}


ROUNDS = 3  # the accel ops are timed in rounds, in a rotating order: no case is always the first one after a pause


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_rounds(cases: dict) -> dict[str, list[float]]:
    """Each case timed ROUNDS times, the order rotating from round to round."""
    names, times = list(cases), {name: [] for name in cases}
    for i in range(ROUNDS):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(bench(cases[name]))
    return times


def host_us_per_call(fn, calls: int = 200) -> float:
    """Python and launch time per call on the CPU (the GPU runs behind): above the GPU time, the host is the limit."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def graph_ms(fn) -> float:
    """GPU time alone: the call captured once in a CUDA graph and replayed (no Python, no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # allocator warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def plain_torch(q, k, v, tables):
    """What one writes without a kernel: float32 throughout, whole sequence at once."""
    fq, fk = torch.relu(q).float(), torch.relu(k).float()
    rq, rk = (fq, fk) if tables is None else (rotate_pairs_reference(fq, tables), rotate_pairs_reference(fk, tables))
    kv = rk.transpose(-1, -2) @ v.float()
    return ((rq @ kv) / (fq @ fk.sum(-2).unsqueeze(-1) + 1e-15)).to(q.dtype)


class Given(torch.nn.Module):
    """Stands in for a projection: returns a prepared tensor, so a processor times its attention alone."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.tensor = tensor

    def forward(self, x):
        return self.tensor


def attention_layer(h: int, d: int) -> Attention:
    """A SANA-Video self-attention layer (qk RMSNorm across heads), random weights, bf16."""
    return Attention(
        query_dim=h * d, heads=h, dim_head=d, kv_heads=h, qk_norm="rms_norm_across_heads", bias=True,
        cross_attention_dim=None, processor=SanaLinearAttnProcessor3_0(),
    ).to(DEV, BF16).eval()


def attention_only(layer: Attention, q, k, v) -> Attention:
    layer.to_q, layer.to_k, layer.to_v = Given(q), Given(k), Given(v)
    layer.norm_q = layer.norm_k = None
    layer.to_out[0] = torch.nn.Identity()
    return layer


def copy_bandwidth() -> float:
    x = torch.randn(2**30, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * 2**30 * 4 / ms / 1e6


def check(out, state, q, k, v, tables, prior=None) -> dict:
    exp_out, exp_state = naive.block_causal_linear_attention(q, k, v, prior, rotary=tables)
    r = {"out_rel_err": rel_err(out, exp_out), "out_finite": bool(torch.isfinite(out).all())}
    if state is not None:
        r["state_kv_rel_err"] = rel_err(state.kv, exp_state.kv)
        r["state_k_sum_rel_err"] = rel_err(state.k_sum, exp_state.k_sum)
    return r


def bench_shape(name: str, copy_gbps: float) -> dict:
    b, h, frames, height, width, d = SHAPES[name]
    latent = torch.empty(b, 16, frames, height, width, device=DEV)
    rope = WanRotaryPosEmbed(d, (1, 2, 2), 1024).to(DEV)
    freqs = tuple(t.to(BF16) for t in rope(latent))  # (1, N, 1, D) each, as a bf16 model hands them to its layers
    n = freqs[0].shape[1]
    tables = RotaryTables.from_diffusers(*freqs, n, d)
    torch.manual_seed(0)
    proj = [torch.randn(b, n, h * d, device=DEV, dtype=BF16) for _ in range(3)]  # what to_q/to_k/to_v return
    q, k, v = (t.unflatten(2, (h, d)).transpose(1, 2).contiguous() for t in proj)  # (B, H, N, D)
    floor_bytes = 4 * q.numel() * q.element_size()
    prior = naive.summarise(*(torch.randn_like(t) for t in (k[:, :, : n // 3], v[:, :, : n // 3])))
    r = {"B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16", "floor_ms_at_copy_bw": floor_bytes / copy_gbps / 1e6}

    def timed(key, fn, nbytes=floor_bytes):
        ms = bench(fn)
        r[key] = {"ms": ms, "GBps": nbytes / ms / 1e6, "fraction_of_copy_bw": nbytes / ms / 1e6 / copy_gbps}
        print(f"  {key:60s} {ms:8.3f} ms  {r[key]['GBps']:7.0f} GB/s", flush=True)

    for rope_on in (False, True):
        tag, tb = ("rope", tables) if rope_on else ("plain", None)
        out = torch.full_like(q, float("nan"))
        linear_attention(q, k, v, rotary=tb, out=out)
        r[f"check_accel_non_causal_{tag}"] = check(out, None, q, k, v, tb)
        out, new_state = block_causal_linear_attention(q, k, v, prior, rotary=tb)
        r[f"check_accel_block_causal_{tag}"] = check(out, new_state, q, k, v, tb, prior)
        state = state_module.chunk_state(k, v, tb)
        # Each kernel alone moves half the floor's bytes: k and v in, or q in and o out.
        cases = {
            f"accel_non_causal_{tag}": (lambda: linear_attention(q, k, v, rotary=tb), floor_bytes),
            f"accel_block_causal_step_{tag}": (lambda: block_causal_linear_attention(q, k, v, prior, rotary=tb), floor_bytes),
            f"accel_kernel1_state_{tag}": (lambda: state_module.chunk_state(k, v, tb), floor_bytes / 2),
            f"accel_kernel2_query_{tag}": (lambda: fused_module.fused_query(q, state, tb, 1e-15, out), floor_bytes / 2),
        }
        rounds = bench_rounds({key: fn for key, (fn, _) in cases.items()})
        for key, (fn, nbytes) in cases.items():
            ms = sorted(rounds[key])[ROUNDS // 2]
            r[key] = {"ms": ms, "rounds_ms": rounds[key], "GBps": nbytes / ms / 1e6,
                      "fraction_of_copy_bw": nbytes / ms / 1e6 / copy_gbps,
                      "host_us_per_call": host_us_per_call(fn), "cuda_graph_ms": graph_ms(fn)}
            print(f"  {key:60s} {ms:8.3f} ms  {r[key]['GBps']:7.0f} GB/s  rounds {[round(t, 3) for t in rounds[key]]}  "
                  f"host {r[key]['host_us_per_call']:.0f} us  graph {r[key]['cuda_graph_ms']:.3f} ms", flush=True)
        timed(f"plain_torch_fp32_{tag}", lambda: plain_torch(q, k, v, tb))
        r[f"check_plain_torch_{tag}"] = check(plain_torch(q, k, v, tb), None, q, k, v, tb)
        causal, non_causal = r[f"accel_block_causal_step_{tag}"], r[f"accel_non_causal_{tag}"]
        r[f"ratio_block_causal_over_non_causal_{tag}"] = causal["ms"] / non_causal["ms"]
        # The GPU's time alone: at small sizes the host's time per call can be the larger one.
        r[f"ratio_block_causal_over_non_causal_{tag}_cuda_graph"] = causal["cuda_graph_ms"] / non_causal["cuda_graph_ms"]
    del out

    # Processors on the attention alone: diffusers' own math against accel's, same q, k, v and rotary tables.
    x = torch.empty(b, n, h * d, device=DEV, dtype=BF16)
    layer = attention_only(attention_layer(h, d), *proj)
    with torch.no_grad():
        for tag, theirs, ours, kwargs in (
            ("rope", SanaLinearAttnProcessor3_0(), SanaVideoLinearAttnKernelProcessor(), {"rotary_emb": freqs}),
            ("plain", SanaLinearAttnProcessor2_0(), SanaLinearAttnKernelProcessor(), {}),
        ):
            reference = naive.linear_attention(q, k, v, rotary=tables if tag == "rope" else None)
            expected = reference.transpose(1, 2).flatten(2)
            for who, processor in (("diffusers", theirs), ("accel", ours)):
                key = f"processor_attention_only_{who}_{type(theirs).__name__}"
                timed(key, lambda: processor(layer, x, **kwargs))
                r[key]["rel_err_vs_fp32_reference"] = rel_err(processor(layer, x, **kwargs), expected)
            r[f"speedup_attention_only_{tag}_vs_diffusers"] = (
                r[f"processor_attention_only_diffusers_{type(theirs).__name__}"]["ms"]
                / r[f"processor_attention_only_accel_{type(theirs).__name__}"]["ms"]
            )
        del layer
        # A whole SANA-Video self-attention layer: projections, RMSNorm, attention, output projection.
        layer = attention_layer(h, d)
        hidden = torch.randn(b, n, h * d, device=DEV, dtype=BF16)
        processors = (("diffusers", SanaLinearAttnProcessor3_0()), ("accel", SanaVideoLinearAttnKernelProcessor()))
        for who, processor in processors:
            layer.set_processor(processor)
            r[f"layer_{who}_ms"] = bench(lambda: layer(hidden, rotary_emb=freqs))
        layer.set_processor(SanaLinearAttnProcessor3_0())
        ref_layer = layer(hidden, rotary_emb=freqs)
        layer.set_processor(SanaVideoLinearAttnKernelProcessor())
        r["layer_accel_rel_err_vs_diffusers"] = rel_err(layer(hidden, rotary_emb=freqs), ref_layer)
        r["speedup_layer_vs_diffusers"] = r["layer_diffusers_ms"] / r["layer_accel_ms"]
        print(f"  layer: diffusers {r['layer_diffusers_ms']:.3f} ms, accel {r['layer_accel_ms']:.3f} ms", flush=True)
    return r


def bench_fla(name: str, copy_gbps: float) -> dict:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # noqa: BLE001 - reported in the results, not fatal
        return {"error": repr(e)[:300]}
    b, h, frames, height, width, d = SHAPES[name]
    n = frames * height * width // 4
    q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=BF16) for _ in range(3))
    floor_bytes = 4 * q.numel() * q.element_size()
    try:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (torch.relu(q), torch.relu(k), v))  # (B, T, H, D)
        o, (kv, z) = chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=True, output_final_state=True)
        ms = bench(lambda: chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=True))
        ours = state_module.chunk_state(k, v)
        last = linear_attention(q, k, v)[:, :, -1]
        r = {
            "chunk_linear_attn_causal_ms": ms, "GBps": floor_bytes / ms / 1e6,
            "fraction_of_copy_bw": floor_bytes / ms / 1e6 / copy_gbps,
            "final_state_kv_rel_diff_vs_accel_state": rel_err(kv, ours.kv),
            "final_state_z_rel_diff_vs_accel_k_sum": rel_err(z.reshape(ours.k_sum.shape), ours.k_sum),
            "last_token_out_rel_diff_vs_accel_non_causal": rel_err(o[:, -1], last),
        }
        print(f"  fla chunk_linear_attn (causal)              {ms:8.3f} ms", flush=True)
        return r
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)[:300]}


def tuned_configs() -> dict:
    """What the autotuner chose per (D_PAD, RoPE, input dtype)."""
    tuners = {"state": state_module._tuned_chunk_state_kernel, "query": fused_module._tuned_fused_query_kernel}
    return {name: {str(key[:3]): str(config) for key, config in t.cache.items()} for name, t in tuners.items()}


def dtype_checks() -> dict:
    """fp16 and fp32 (the other dot paths) against the float32 reference, plain and RoPE, chunk step with a prior."""
    b, h, n, d = 1, 4, 5000, 112
    angles = torch.rand(n, d // 2, device=DEV) * 6.3
    tables = RotaryTables(angles.cos().contiguous(), angles.sin().contiguous())
    r = {}
    for dtype in (torch.float16, torch.float32):
        q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=dtype) for _ in range(3))
        prior = naive.summarise(*(torch.randn_like(t) for t in (k, v)))
        for tag, tb in (("plain", None), ("rope", tables)):
            out, state = block_causal_linear_attention(q, k, v, prior, rotary=tb)
            r[f"{str(dtype)[6:]}_{tag}"] = check(out, state, q, k, v, tb, prior)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/linear_attention_h200.json")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES to run")
    p.add_argument("--fla-shapes", default="1x16x32768x128", help="comma-separated shapes to run fla on ('' for none)")
    p.add_argument("--fla-deadline-s", type=float, default=float("inf"),
                   help="skip fla when the run has already taken this long (a device-time budget)")
    args = p.parse_args()
    started = time.time()
    import diffusers

    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references stay float32
    res = {
        "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "diffusers": diffusers.__version__, "python": platform.python_version(),
                "date": datetime.date.today().isoformat(), "timing": "triton.testing.do_bench median, L2 flushed"},
        "copy_GBps": copy_bandwidth(),
        "shapes": {},
    }

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    print(res["env"], f"copy {res['copy_GBps']:.0f} GB/s", flush=True)
    names = [name for name in args.shapes.split(",") if name]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    for name in names:
        t = time.time()
        print(name, flush=True)
        res["shapes"][name] = bench_shape(name, res["copy_GBps"])
        print(f"  ({time.time() - t:.0f} s)", flush=True)
        save()
    a, s = res["shapes"].get("1x16x32768x128"), res["shapes"].get("sana_video_2b_480p_1x20x32760x112")
    res["targets"] = {
        "block_causal_step_over_non_causal (<= 1.3)": {
            f"{name}_{tag}": res["shapes"][name][f"ratio_block_causal_over_non_causal_{tag}"]
            for name in names for tag in ("plain", "rope")
        },
    }
    if a:
        res["targets"]["non_causal_1x16x32768x128_ms (<= 0.25)"] = a["accel_non_causal_plain"]["ms"]
    if s:
        res["targets"].update({
            "speedup_vs_SanaLinearAttnProcessor3_0_attention_only_sana_video (>= 5)":
                s["speedup_attention_only_rope_vs_diffusers"],
            "speedup_vs_SanaLinearAttnProcessor3_0_whole_layer_sana_video": s["speedup_layer_vs_diffusers"],
        })
    print(json.dumps(res["targets"], indent=1), flush=True)
    res["other_dtypes_check"] = dtype_checks()
    print(res["other_dtypes_check"], flush=True)
    save()
    res["autotuned_configs"] = tuned_configs()
    save()
    res["fla"] = {}
    for name in filter(None, args.fla_shapes.split(",")):
        in_time = time.time() - started < args.fla_deadline_s
        res["fla"][name] = bench_fla(name, res["copy_GBps"]) if in_time else {"skipped": "deadline"}
    save()


if __name__ == "__main__":
    main()
