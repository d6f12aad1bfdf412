"""StreamingT2V on the CPU with the shipped shapes-streaming model: peak memory of a 1,200-frame video against an
80-frame one, and the time per chunk from chunk 2 to the last.

    python benchmarks/streaming_t2v_cpu.py [--frames 80,1200] [--steps 2] [--out benchmarks/results/streaming_t2v_cpu.json]

Each length runs in a fresh process (the process's peak resident memory cannot be reset), streaming its chunks to an
mp4 and keeping no frames; CAM and APM on, guidance on (both branches). Chunks are 16 frames overlapping by 8:
80 frames are 9 chunks, 1,200 frames 149. Targets (issue 22): peak memory within 5%, time per chunk flat within 5%
from chunk 2 to the last. Fewer denoising steps than the default 20 keep the run short: they scale every chunk's
time alike and leave its memory as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def child(frames: int, steps: int, pipeline: str) -> dict:
    """One video in this process: its chunk times and this process's peak resident memory."""
    from accel.pipelines import reference_pipeline
    from accel.pipelines.streaming_t2v.shapes import ShapesStreamingT2VPipeline

    pipe = (ShapesStreamingT2VPipeline.from_pretrained(pipeline) if os.path.isdir(pipeline)
            else reference_pipeline(pipeline))
    pipe.set_progress_bar_config(disable=True)
    loaded_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    ends = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        pipe("a red circle moving left", num_frames=frames, num_inference_steps=steps,
             output_path=os.path.join(folder, "video.mp4"), generator=torch.Generator().manual_seed(0),
             callback_on_chunk_end=lambda *_: ends.append(time.perf_counter()))
    per_chunk = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    return {"frames": frames, "chunks": len(per_chunk), "per_chunk_s": per_chunk, "loaded_peak_MB": loaded_MB,
            "peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}


def summary(short: dict, long: dict) -> dict:
    """Peak memory long over short; chunk times from chunk 2 on: median, range, and the 10th and 90th percentiles
    over the median (on shared cores a few chunks wait for other jobs: the percentiles show the flatness beside them),
    and the median of the last quarter of the chunks over the first quarter's."""
    later = long["per_chunk_s"][2:]
    median, ranked, quarter = statistics.median(later), sorted(later), len(later) // 4
    return {
        "peak_MB_ratio_long_to_short": long["peak_MB"] / short["peak_MB"],
        "chunk_s_median_from_chunk_2": median,
        "chunk_s_range_over_median": (ranked[-1] - ranked[0]) / median,
        "chunk_s_p10_p90_over_median": [ranked[len(ranked) // 10] / median, ranked[9 * len(ranked) // 10] / median],
        "chunk_s_last_vs_first_quarter": statistics.median(later[-quarter:]) / statistics.median(later[:quarter]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", default="80,1200", help="short,long video lengths (16 + 8k frames)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pipeline", default="shapes-streaming", help="a shipped name or a ShapesStreamingT2V folder")
    p.add_argument("--out", default="benchmarks/results/streaming_t2v_cpu.json")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one length, in its own process
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.pipeline)))
        return
    runs = []
    for frames in (int(n) for n in args.frames.split(",")):
        command = [sys.executable, __file__, "--child", str(frames), "--steps", str(args.steps), "--pipeline",
                   args.pipeline]
        runs.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    result = {
        "benchmark": "streaming_t2v_cpu", "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/streaming_t2v_cpu.py --frames {args.frames} --steps {args.steps}",
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs seen, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__, "pipeline": args.pipeline, "runs": runs,
        "summary": summary(*runs),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
