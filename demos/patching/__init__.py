"""Patching demonstration: one diffusers pipeline, several accelerators, one call each, no downloads.

    python -m accel.demos.patching [--steps 20] [--layers 6]

Runs a tiny random-init WanPipeline (the real diffusers pipeline and transformer class, toy sizes) without
acceleration, then under CG-Taylor and diffusers' FirstBlockCache and TaylorSeer through `accel.patch`, and
prints steps computed / predicted, time and the difference to the unaccelerated output. Random weights make
noise, not video: the figures show the mechanics, not quality (the quality-vs-speed harness does that).
"""

from __future__ import annotations

import argparse
import time

import torch

import accel
from accel.pipelines.tiny import tiny_wan_pipeline

CONFIGS = [
    ("unaccelerated", None, {}),
    ("cg_taylor (Wan preset)", "cg_taylor", {}),
    ("cg_taylor threshold 1.0", "cg_taylor", {"threshold": 1.0}),
    ("first_block_cache 0.2", "first_block_cache", {"threshold": 0.2}),
    ("taylorseer interval 3", "taylorseer", {"cache_interval": 3, "disable_cache_before_step": 3}),
]


def generate(pipe, kwargs, steps):
    start = time.perf_counter()
    video = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames
    return video, time.perf_counter() - start


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="accel.patch on a tiny offline WanPipeline")
    parser.add_argument("--steps", type=_at_least(2), default=20, help="denoising steps (>= 2)")
    parser.add_argument("--layers", type=_at_least(2), default=6, help="transformer blocks (>= 2: CG-Taylor's head and tail)")
    args = parser.parse_args(argv)
    pipe, kwargs = tiny_wan_pipeline(args.layers)
    pipe.set_progress_bar_config(disable=True)
    generate(pipe, kwargs, 2)  # warm-up

    print(f"{'method':26s} {'computed':>8s} {'predicted':>9s} {'seconds':>8s} {'max |diff|':>10s}")
    baseline = None
    for label, method, options in CONFIGS:
        if method is None:
            baseline, seconds = generate(pipe, kwargs, args.steps)
            print(f"{label:26s} {args.steps:8d} {0:9d} {seconds:8.2f} {0.0:10.4f}")
            continue
        with accel.patch(pipe, method=method, **options) as handle:
            video, seconds = generate(pipe, kwargs, args.steps)
            stats = handle.stats()
        diff = (video - baseline).abs().max().item()
        print(f"{label:26s} {stats['computed']:8d} {stats['predicted']:9d} {seconds:8.2f} {diff:10.4f}")

