"""Where a shapes training step spends its time: steps/s and the top operators by device time (torch.profiler).

    python scripts/profile_training_step.py long-video [--batch-size 128] [--steps 3] [--compile] [--out FILE]

Runs on the GPU when there is one (bf16 autocast, as training does), else on the CPU. On the lent GPU:
    source scripts/device_env.sh && cd /tmp && python $REPO/scripts/profile_training_step.py long-video
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from accel.pipelines.shapes import train as shapes_train


def step_fn(kind: str, model, cfg, device):
    def step(i: int) -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            if kind == "long-video":
                loss = shapes_train._long_video_loss(model, i, cfg, device)
            else:
                loss = shapes_train._flow_matching_loss(model, kind, i, cfg, device)
        loss.backward()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["image", "video", "long-video"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", help="also write the operator table here")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = shapes_train.TrainConfig(kind=args.kind, steps=args.steps, batch_size=args.batch_size, lr=1e-4)
    model = shapes_train.build(args.kind).to(device).train()
    if args.compile:
        shapes_train.compile_network(model, args.kind)
    step = step_fn(args.kind, model, cfg, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps = range(100, 100 + args.steps)
    for i in steps:  # warm-up (and compilation) on the very steps timed: the long model's graphs depend on the step
        step(i)
    sync()
    start = time.perf_counter()
    for i in steps:
        step(i)
    sync()
    rate = args.steps / (time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step(steps[0])
        sync()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    header = f"{args.kind} batch {args.batch_size} compile={args.compile} on {device}: {rate:.2f} steps/s"
    print(header, table, sep="\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n" + table)


if __name__ == "__main__":
    main()
