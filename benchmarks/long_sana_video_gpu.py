"""Long SANA-Video on the GPU: per-chunk latency and peak memory for 1, 4, 16 and 64 chunks, beside diffusers'
bidirectional SanaVideoTransformer3DModel on the same number of frames (up to where it fits).

    python benchmarks/long_sana_video_gpu.py [--chunks 1,4,16,64] [--out benchmarks/results/long_sana_video_h200.json]

SANA-Video-2B-shaped random-init transformer (20 layers, 20 heads x 112), bf16, 480p (60 x 104 latents, 1,560
tokens per latent frame), chunks of 10 latent frames; per chunk the pipeline's work: 4 denoising calls and the
t=0 memory pass. Random weights: costs, not quality. Targets: peak memory after 64 chunks within 5% of after 1;
per-chunk latency flat within 10%; the attention in accel's linear-attention kernel.
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

DEV = "cuda"
CONFIG = dict(in_channels=16, out_channels=16, num_attention_heads=20, attention_head_dim=112, num_layers=20,
              num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
              caption_channels=2304, mlp_ratio=3.0, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
              rope_max_seq_len=1024, sample_size=30)
CHUNK_FRAMES, LATENT_H, LATENT_W, STEPS = 10, 60, 104, (1000.0, 960.0, 889.0, 727.0)


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_causal(model, text, chunks: int) -> dict:
    memory = model.new_memory()
    shape = (1, 16, CHUNK_FRAMES, LATENT_H, LATENT_W)
    per_chunk = []
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def chunk():
        x = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
        for t in STEPS:
            v = model(x, text, torch.full((1,), t, device=DEV), memory=memory, return_dict=False)[0]
            x = x - t / 1000 * v
        model(x, text, torch.zeros(1, device=DEV), memory=memory, write_memory=True)

    with torch.no_grad():
        for _ in range(chunks):
            per_chunk.append(_sync_time(chunk))
    return {"chunks": chunks, "per_chunk_s": per_chunk, "median_chunk_s": statistics.median(per_chunk),
            "peak_GB": (torch.cuda.max_memory_allocated() - base) / 1e9, "memory_MB": memory.nbytes() / 1e6}


def run_bidirectional(model, text, chunks: int) -> dict:
    """diffusers' model on all frames at once, the same 4 + 1 calls: the cost per chunk-equivalent."""
    x = torch.randn(1, 16, CHUNK_FRAMES * chunks, LATENT_H, LATENT_W, device=DEV, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        with torch.no_grad():
            seconds = _sync_time(lambda: [model(x, text, torch.full((1,), t, device=DEV)) for t in (*STEPS, 0.0)])
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"chunks": chunks, "error": "out of memory"}
    return {"chunks": chunks, "total_s": seconds, "per_chunk_equivalent_s": seconds / chunks,
            "peak_GB": (torch.cuda.max_memory_allocated() - base) / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", default="1,4,16,64")
    p.add_argument("--bidirectional-chunks", default="1,4,16", help="diffusers' model grows with the video: fewer")
    p.add_argument("--out", default="benchmarks/results/long_sana_video_h200.json")
    args = p.parse_args()
    import diffusers
    import triton
    from diffusers import SanaVideoTransformer3DModel

    from accel.kernels.linear_attention.ops import backend
    from accel.pipelines.long_sana_video import CausalSanaVideoTransformer3DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        causal = CausalSanaVideoTransformer3DModel(**CONFIG).to(torch.bfloat16).eval()
    text = torch.randn(1, 300, 2304, device=DEV, dtype=torch.bfloat16)
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "diffusers": diffusers.__version__, "python": platform.python_version(),
                   "date": datetime.date.today().isoformat(), "dtype": "bfloat16"},
           "attention_backend": backend(torch.device(DEV)), "config": {k: str(v) for k, v in CONFIG.items()},
           "causal": [], "bidirectional": []}
    run_causal(causal, text, 1)  # warm-up: kernels tuned and compiled
    for n in map(int, args.chunks.split(",")):
        res["causal"].append(run_causal(causal, text, n))
        print("causal", n, {k: v for k, v in res["causal"][-1].items() if k != "per_chunk_s"}, flush=True)
    bidirectional = SanaVideoTransformer3DModel.from_config(causal.config).to(DEV, torch.bfloat16).eval()
    bidirectional.load_state_dict(causal.state_dict())
    del causal
    for n in map(int, args.bidirectional_chunks.split(",")):
        res["bidirectional"].append(run_bidirectional(bidirectional, text, n))
        print("bidirectional", n, res["bidirectional"][-1], flush=True)
    first, last = res["causal"][0], res["causal"][-1]
    res["summary"] = {
        "peak_memory_ratio_last_over_first": last["peak_GB"] / first["peak_GB"],
        "chunk_latency_ratio_last_over_first": last["per_chunk_s"][-1] / first["per_chunk_s"][0],
        "chunk_latency_spread_in_longest_run": max(last["per_chunk_s"]) / min(last["per_chunk_s"]),
        "attention_in_kernel": res["attention_backend"] == "triton",
    }
    print(json.dumps(res["summary"], indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
