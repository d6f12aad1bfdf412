"""StreamingT2V on the GPU: peak memory and time per chunk over a long video, and the cost of CAM + APM per chunk.

    python benchmarks/streaming_t2v_gpu.py [--chunks 2,38] [--steps 2] [--out benchmarks/results/streaming_t2v_h100.json]

A Wan-2.1-1.3B-shaped random-init WanTransformer3DModel (30 blocks, 12 heads x 128, FFN 8960) with diffusers'
AutoencoderKLWan (random init, Wan 2.1's shape), bf16, 480p (832 x 480: 60 x 104 latents, 1,560 tokens a latent
frame), chunks of F = 16 latent frames overlapping by O = 8 (24,960 tokens a chunk), CAM copying the first 15 blocks
(the default: half), APM with a random-init open_clip ViT-B-32 image tower, 512 text tokens of width 4096 (random
prompt embeddings: no text encoder), no guidance. Every chunk is decoded by Wan's VAE, its causal cache carried.
Random weights: costs, not quality. All timings of one run of this script, on one card (named in the JSON).

- memory: peak allocated over 2 chunks (93 video frames) and 38 chunks (1,245 frames); target within 5%.
- time per chunk: chunk 2 to the last, flat within 5%.
- CAM + APM overhead: a conditioned chunk's time over a plain base chunk's (chunk 0 of the same run: the base's
  own generation and decode, plus the anchor's embedding), and over a chunk of the memory-free baseline
  (conditioning="replace"); target <= 1.3x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from accel.pipelines.streaming_t2v import ClipImageEncoder, StreamingT2VPipeline

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=2, text_dim=32)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
HEIGHT, WIDTH, TEXT_TOKENS = 480, 832, 512


def build(tiny: bool, device: str, dtype: torch.dtype) -> StreamingT2VPipeline:
    import open_clip

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**(TINY if tiny else WAN_1_3B))
    vae = AutoencoderKLWan(**TINY_VAE) if tiny else AutoencoderKLWan()
    base = SimpleNamespace(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                           text_encoder=None, tokenizer=None)
    encoder = ClipImageEncoder.from_open_clip(open_clip.create_model("ViT-B-32"))
    pipe = StreamingT2VPipeline.from_base(base, image_encoder=encoder, text_tokens=TEXT_TOKENS)
    pipe.to(device, dtype)
    pipe.image_encoder.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(pipe, chunks: int, steps: int, size: tuple[int, int], device: str, conditioning: str = "memory") -> dict:
    """One video of `chunks` chunks: the time each chunk took (from the previous chunk's end, decode included) and
    the peak memory allocated above what the run started with."""
    dtype = pipe.transformer.dtype
    embeds = torch.randn(1, TEXT_TOKENS, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    ends = []

    def chunk_end(_pipe, _chunk, _frames):
        _sync(device)
        ends.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start_memory = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    _sync(device)
    start = time.perf_counter()
    pipe(prompt_embeds=embeds.to(device, dtype), num_chunks=chunks, num_inference_steps=steps, guidance_scale=1.0,
         height=size[0], width=size[1], output_type="latent", return_frames=False, callback_on_chunk_end=chunk_end,
         conditioning=conditioning, generator=torch.Generator().manual_seed(0))
    per_chunk = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    peak = (torch.cuda.max_memory_allocated() - start_memory) / 1e9 if device.startswith("cuda") else None
    return {"chunks": chunks, "video_frames": pipe.frame_count(chunks), "conditioning": conditioning,
            "per_chunk_s": per_chunk, "peak_GB": peak}


def summary(short: dict, long: dict, replace: dict) -> dict:
    later = long["per_chunk_s"][2:]  # chunk 2 on: chunk 1 is the first conditioned one, its kernels' first calls
    median = statistics.median(later)
    out = {
        "peak_GB_ratio_long_to_short": long["peak_GB"] / short["peak_GB"] if short["peak_GB"] else None,
        "chunk_s_median_from_chunk_2": median,
        "chunk_s_spread_from_chunk_2": (max(later) - min(later)) / median,
        "plain_base_chunk_s": long["per_chunk_s"][0],
        "cam_apm_overhead_vs_plain_chunk": median / long["per_chunk_s"][0],
    }
    replaced = replace["per_chunk_s"][1:]
    out["replace_chunk_s_median"] = statistics.median(replaced)
    out["cam_apm_overhead_vs_replace_chunk"] = median / out["replace_chunk_s_median"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", default="2,38", help="short,long: chunks of the two memory runs")
    p.add_argument("--steps", type=int, default=2, help="denoising steps a chunk")
    p.add_argument("--tiny", action="store_true", help="a toy model at 32x32 on the CPU: checks the script runs")
    p.add_argument("--out", default="benchmarks/results/streaming_t2v_h100.json")
    args = p.parse_args()
    short_chunks, long_chunks = (int(n) for n in args.chunks.split(","))
    device = "cpu" if args.tiny else "cuda"
    size = (32, 32) if args.tiny else (HEIGHT, WIDTH)
    pipe = build(args.tiny, device, torch.float32 if args.tiny else torch.bfloat16)
    run(pipe, 2, args.steps, size, device)  # warm-up: first calls of every kernel, the VAE's included
    short = run(pipe, short_chunks, args.steps, size, device)
    long = run(pipe, long_chunks, args.steps, size, device)
    replace = run(pipe, 4, args.steps, size, device, conditioning="replace")
    result = {
        "benchmark": "streaming_t2v_gpu", "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/streaming_t2v_gpu.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                         if k != "tiny") + (" --tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": "Wan-2.1-1.3B-shaped random init" if not args.tiny else "tiny",
        "height_width": size, "chunk_frames": 16, "overlap_frames": 8, "steps_per_chunk": args.steps,
        "cam_blocks": pipe.cam.config.num_blocks, "dtype": str(pipe.transformer.dtype),
        "runs": {"short": short, "long": long, "replace": replace}, "summary": summary(short, long, replace),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
