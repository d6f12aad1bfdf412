"""CG-Taylor step costs on random-init bf16 transformers with real shapes, beside diffusers' caches.

    python benchmarks/cg_taylor_gpu.py [--models wan,flux,dit] [--out benchmarks/results/cg_taylor_h200.json]

Per model: the time of a full step, of a patched step that predicts nothing (threshold 0), of a predicted step
(threshold huge), and of block 0 plus the output head (the floor for any first-block gate); the same loop under
diffusers' FirstBlockCache and TaylorSeer through `accel.patch`; extra GPU memory of each method in units of one
hidden state. Random weights say nothing about quality: the gate's decisions at the paper's thresholds are
reported but are not evidence. Every step is timed between device synchronisations; medians are reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch

import accel

DEV = "cuda"


def build(name: str):
    """Model, per-step inputs, hidden-state size in bytes, and a function keeping only block 0."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    with torch.device(DEV):
        if name == "wan":  # Wan 2.1 1.3B, 480p, 81 frames -> 21 x 30 x 52 = 32,760 tokens
            m = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
            x = {"hidden_states": torch.randn(1, 16, 21, 60, 104, **bf), "encoder_hidden_states": torch.randn(1, 512, 4096, **bf)}
            hidden_bytes, lists = 32760 * 1536 * 2, ("blocks",)
        elif name == "flux":  # FLUX.1-dev, 1024 px -> 4096 image + 512 text tokens
            m = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
            ii = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(64.0), torch.arange(64.0), indexing="ij"), -1)
            x = {"hidden_states": torch.randn(1, 4096, 64, **bf), "encoder_hidden_states": torch.randn(1, 512, 4096, **bf),
                 "pooled_projections": torch.randn(1, 768, **bf), "img_ids": ii.reshape(-1, 3).to(DEV),
                 "txt_ids": torch.zeros(512, 3, device=DEV), "guidance": torch.full((1,), 3.5, device=DEV)}
            hidden_bytes, lists = 4096 * 3072 * 2, ("transformer_blocks", "single_transformer_blocks")
        else:  # DiT-XL/2, 256 px -> 256 tokens; batch 2 = one image with batched CFG (DiTPipeline's layout)
            m = DiTTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
            x = {"hidden_states": torch.randn(2, 4, 32, 32, **bf), "class_labels": torch.tensor([207, 1000], device=DEV)}
            hidden_bytes, lists = 2 * 256 * 1152 * 2, ("transformer_blocks",)
    m = m.to(torch.bfloat16).eval()

    def only_block0():
        saved = {n: getattr(m, n) for n in lists}
        for i, n in enumerate(lists):
            setattr(m, n, torch.nn.ModuleList(list(saved[n])[:1] if i == 0 else []))
        return lambda: [setattr(m, n, mod) for n, mod in saved.items()]

    return m, x, hidden_bytes, only_block0


def run_loop(m, x, steps: int, name: str):
    """A denoising-like loop entering cache_context per step; returns per-step seconds and the final latent."""
    lat = x["hidden_states"].clone()
    scale = 1e-3 if name == "flux" else 1.0
    per = []
    with torch.no_grad():
        for i in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            t = torch.full((lat.shape[0],), (999 - i * (999 / steps)) * scale, device=DEV)
            # DiT has no cache_context (DiTPipeline sets none): accel gives it a default context itself.
            ctx = m.cache_context("cond", step_index=i, num_inference_steps=steps) if hasattr(m, "cache_context") else nullcontext()
            with ctx:
                out = m(**{**x, "hidden_states": lat}, timestep=t, return_dict=False)[0]
            lat = lat - 0.02 * out[:, : lat.shape[1]]
            torch.cuda.synchronize()
            per.append(time.perf_counter() - t0)
    return per, lat


def measure(m, x, steps, name, method=None, **options):
    torch.cuda.empty_cache()
    base_mem = torch.cuda.memory_allocated()  # weights and inputs only: every method's state counts as extra
    handle = accel.patch(m, method=method, num_inference_steps=steps, **options) if method else None
    try:
        run_loop(m, x, steps, name)  # warm-up: kernels, allocator
        torch.cuda.reset_peak_memory_stats()
        per, lat = run_loop(m, x, steps, name)
        peak = torch.cuda.max_memory_allocated() - base_mem
        stats = handle.stats() if handle else {"predicted_steps": []}
    finally:
        if handle:
            handle.remove()
    predicted = set(stats["predicted_steps"])
    full = [p for i, p in enumerate(per) if i not in predicted]
    pred = [p for i, p in enumerate(per) if i in predicted]
    return {
        "total_s": sum(per), "median_step_ms": 1e3 * statistics.median(per),
        "median_full_step_ms": 1e3 * statistics.median(full) if full else None,
        "median_predicted_step_ms": 1e3 * statistics.median(pred) if pred else None,
        "min_step_ms": 1e3 * min(per), "computed": stats.get("computed", steps), "predicted": stats.get("predicted", 0),
        "peak_activation_bytes": peak,
    }, lat


def bench(name: str, steps: int) -> dict:
    m, x, hidden_bytes, only_block0 = build(name)
    r = {"steps": steps, "hidden_state_MB": hidden_bytes / 1e6}
    r["unpatched"], ref = measure(m, x, steps, name)
    preset = accel.PRESETS[{"wan": "wan", "flux": "flux", "dit": "dit"}[name]]
    r["cg_taylor_predicts_nothing"], _ = measure(m, x, steps, name, "cg_taylor", threshold=0.0)
    r["cg_taylor_always_predict"], _ = measure(
        m, x, steps, name, "cg_taylor", threshold=1e9, warmup_steps=preset.warmup_steps, max_consecutive_predicted=10**6)
    r["cg_taylor_preset"], lat = measure(m, x, steps, name, "cg_taylor")
    r["cg_taylor_preset"]["rel_err_vs_unpatched"] = float((lat.float() - ref.float()).norm() / ref.float().norm())
    r["first_block_cache_0.05"], _ = measure(m, x, steps, name, "first_block_cache", threshold=0.05)
    r["first_block_cache_always"], _ = measure(m, x, steps, name, "first_block_cache", threshold=1e9)
    r["taylorseer_interval5"], lat = measure(m, x, steps, name, "taylorseer", cache_interval=5, disable_cache_before_step=3)
    r["taylorseer_interval5"]["rel_err_vs_unpatched"] = float((lat.float() - ref.float()).norm() / ref.float().norm())
    restore = only_block0()
    r["block0_plus_head"], _ = measure(m, x, steps, name)
    restore()
    r["unpatched_again"], _ = measure(m, x, steps, name)  # the spread between the two is the timing noise
    # Launch-bound models (DiT-XL/2) drift between runs: alternate the two configurations and compare medians.
    pairs = [(measure(m, x, steps, name)[0]["median_step_ms"],
              measure(m, x, steps, name, "cg_taylor", threshold=0.0)[0]["median_step_ms"]) for _ in range(3)]
    r["alternating_unpatched_vs_nothing_predicted_ms"] = pairs

    full = r["unpatched"]["median_step_ms"]
    floor = r["block0_plus_head"]["median_step_ms"]
    pred = r["cg_taylor_always_predict"]["median_predicted_step_ms"]
    base_peak = r["unpatched"]["peak_activation_bytes"]
    r["summary"] = {
        "full_step_ms": full,
        "block0_plus_head_ms": floor,
        "predicted_step_ms": pred,
        "predicted_over_block0_head": pred / floor,
        "nopredict_overhead_pct": 100 * (r["cg_taylor_predicts_nothing"]["median_step_ms"] / full - 1),
        "unpatched_repeat_spread_pct": 100 * (r["unpatched_again"]["median_step_ms"] / full - 1),
        "nopredict_overhead_pct_alternating": 100 * (statistics.median(b / a for a, b in pairs) - 1),
        "cg_taylor_extra_memory_hidden_states": (r["cg_taylor_always_predict"]["peak_activation_bytes"] - base_peak) / hidden_bytes,
        "taylorseer_extra_memory_hidden_states": (r["taylorseer_interval5"]["peak_activation_bytes"] - base_peak) / hidden_bytes,
        "speedup_cg_taylor_always": r["unpatched"]["total_s"] / r["cg_taylor_always_predict"]["total_s"],
        "speedup_fbc_always": r["unpatched"]["total_s"] / r["first_block_cache_always"]["total_s"],
        "speedup_taylorseer_interval5": r["unpatched"]["total_s"] / r["taylorseer_interval5"]["total_s"],
        "fbc_cached_step_ms": r["first_block_cache_always"]["min_step_ms"],
    }
    del m
    torch.cuda.empty_cache()
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dit,wan,flux")
    p.add_argument("--out", default="benchmarks/results/cg_taylor_h200.json")
    args = p.parse_args()
    import diffusers
    import triton

    res = {
        "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "diffusers": diffusers.__version__, "python": platform.python_version(),
                "date": datetime.date.today().isoformat(), "dtype": "bfloat16"},
        "models": {},
    }
    steps = {"wan": 20, "flux": 28, "dit": 50}
    for name in args.models.split(","):
        res["models"][name] = bench(name, steps[name])
        print(name, json.dumps(res["models"][name]["summary"], indent=1), flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        tmp = args.out + ".tmp"
        json.dump(res, open(tmp, "w"), indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
