"""Long-video metrics, chunk by chunk, and a side-by-side run of long-video pipelines over seeds.

Per chunk (the frames a pipeline hands `callback_on_chunk_end`): caption agreement (the shapes classifier sees the
caption's shape and colour: `accel.pipelines.shapes.report.chunk_agreement`; the direction word is left out, since
shapes bounce off the edges in a long video), CLIPScore (torchmetrics' `clip_score` with an open_clip model, the
shipped shapes-clip by default), and peak memory. Per boundary between two chunks, against the same measure between
consecutive frames inside chunks: the cosine similarity of the classifier's features of the frames either side, the
flicker (mean absolute change, 8-bit levels) and the warp error (the flicker after the best shift of up to
WARP_SHIFT pixels: motion-compensated, so a shape moving smoothly scores low, a jump or a change of look high).

Results: per configuration, the mean over every video, and the seed-to-seed spread (the std and range, over seeds,
of each seed's mean over prompts and chunks), so a difference between configurations can be set against it.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

WARP_SHIFT = 2  # pixels; the shapes data moves 0.6-0.9 px a frame
METRICS = ("caption_agreement", "clip_score", "boundary_feature_cosine", "inside_feature_cosine", "boundary_flicker",
           "inside_flicker", "boundary_warp_error", "inside_warp_error", "peak_memory_MB", "chunk_s")


@dataclass
class LongVideo:
    """A generated long video as its chunks' new frames ((T, H, W, 3) in [0, 1] each), with per-chunk costs."""

    chunks: list[np.ndarray] = field(default_factory=list)
    peak_memory_MB: list[float] = field(default_factory=list)
    chunk_s: list[float] = field(default_factory=list)


def _peak_memory_MB(device: torch.device) -> float:
    """Peak memory since the last call: the GPU's allocations (then reset), or on the CPU the process's peak
    resident size so far (Linux reports it in KB; it cannot be reset, so it only says whether memory grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e6
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def generate(pipe, caption: str, seed: int, num_chunks: int, **call) -> LongVideo:
    """One long video of `num_chunks` chunks, collected chunk by chunk through `callback_on_chunk_end`."""
    video, device = LongVideo(), pipe._execution_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last = [time.perf_counter()]

    def on_chunk(_pipe, _chunk, frames):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        video.chunks.append(np.asarray(frames[0], dtype=np.float32))
        video.peak_memory_MB.append(_peak_memory_MB(device))
        video.chunk_s.append(now - last[0])
        last[0] = now

    pipe(caption, num_chunks=num_chunks, generator=torch.Generator().manual_seed(seed), return_frames=False,
         callback_on_chunk_end=on_chunk, **call)
    return video


# Metrics -------------------------------------------------------------------------------------------------------------

def _uint8(frames: np.ndarray) -> np.ndarray:
    return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)


def flicker(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute change between two frames (H, W, 3) in [0, 1], in 8-bit levels."""
    return float(np.abs(a - b).mean() * 255)


def warp_error(a: np.ndarray, b: np.ndarray, max_shift: int = WARP_SHIFT) -> float:
    """The flicker from frame `a` to frame `b` after the integer shift of `a` (up to `max_shift` px either way) that
    fits `b` best, over the pixels every shift keeps (the border of `max_shift` px is left out)."""
    m = max_shift
    target = b[m:-m, m:-m]
    return min(flicker(a[m + dy: a.shape[0] - m + dy, m + dx: a.shape[1] - m + dx], target)
               for dy in range(-m, m + 1) for dx in range(-m, m + 1))


def _frame_pairs(video: LongVideo) -> tuple[list, list]:
    """(pairs across chunk boundaries, pairs of consecutive frames inside chunks)."""
    boundary = [(prev[-1], nxt[0]) for prev, nxt in zip(video.chunks, video.chunks[1:])]
    inside = [(c[i], c[i + 1]) for c in video.chunks for i in range(len(c) - 1)]
    return boundary, inside


@torch.no_grad()
def _feature_cosines(classifier, pairs: list) -> list[float]:
    if not pairs:
        return []
    a = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2) * 2 - 1
    b = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2) * 2 - 1
    return F.cosine_similarity(classifier.image_features(a), classifier.image_features(b), dim=-1).tolist()


class _OpenClipModel(torch.nn.Module):
    """An open_clip model behind the two calls torchmetrics' clip_score makes of a CLIP model."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self.config = SimpleNamespace()  # clip_score reads text_config from it where there is one

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


class _OpenClipProcessor:
    """open_clip's own preprocessing (on PIL images) and tokenizer, called as torchmetrics calls a processor."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, text=None, images=None, **unused):
        from torchvision.transforms.functional import to_pil_image

        if images is not None:
            return {"pixel_values": torch.stack([self.preprocess(to_pil_image(image)) for image in images])}
        ids = self.tokenizer(text)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_clip(spec: str | None = None):
    """(model, processor) for torchmetrics' clip_score from ACCEL_CLIP=ARCH:PATH (`spec`, the environment, else the
    shipped shapes-clip), through open_clip's create_model_and_transforms; loaded from the local file only."""
    import os

    import open_clip

    from accel.pipelines.streaming_t2v.image_encoder import ENV_VAR, parse_spec
    from accel.pipelines.streaming_t2v.shapes import shapes_clip_spec

    arch, path = parse_spec(spec or os.environ.get(ENV_VAR) or shapes_clip_spec())
    config = os.path.join(os.path.dirname(os.path.abspath(path)), f"{arch}.json")
    if os.path.isfile(config):
        open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
    return _OpenClipModel(model), _OpenClipProcessor(preprocess, open_clip.get_tokenizer(arch))


@torch.no_grad()
def chunk_clip_scores(clip, chunks: list[np.ndarray], caption: str) -> list[float]:
    """Per chunk, the mean CLIPScore (torchmetrics) of its frames against the caption."""
    from torchmetrics.functional.multimodal import clip_score

    scores = []
    for chunk in chunks:
        images = torch.from_numpy(_uint8(chunk)).permute(0, 3, 1, 2)
        per_frame = [float(clip_score(image, caption, model_name_or_path=lambda: clip)) for image in images]
        scores.append(statistics.fmean(per_frame))
    return scores


def score(video: LongVideo, caption: str, classifier, clip) -> dict[str, float]:
    """A long video's metrics (each the mean over its chunks, boundaries or frame pairs)."""
    from accel.pipelines.shapes.report import chunk_agreement

    boundary, inside = _frame_pairs(video)
    agreement = [bool(chunk_agreement(classifier, c[None], [caption], len(c))[0, 0]) for c in video.chunks]
    values = {
        "caption_agreement": agreement,
        "clip_score": chunk_clip_scores(clip, video.chunks, caption) if clip is not None else [],
        "boundary_feature_cosine": _feature_cosines(classifier, boundary),
        "inside_feature_cosine": _feature_cosines(classifier, inside),
        "boundary_flicker": [flicker(a, b) for a, b in boundary],
        "inside_flicker": [flicker(a, b) for a, b in inside],
        "boundary_warp_error": [warp_error(a, b) for a, b in boundary],
        "inside_warp_error": [warp_error(a, b) for a, b in inside],
        "peak_memory_MB": video.peak_memory_MB,
        "chunk_s": video.chunk_s[1:],  # chunk 0 pays the first calls
    }
    return {k: float(np.mean(v)) for k, v in values.items() if len(v)}


# Side by side --------------------------------------------------------------------------------------------------------

def summarise(per_video: list[dict]) -> dict:
    """Per metric: the mean over every video, and over seeds the std and range of each seed's mean over prompts."""
    out = {}
    seeds = sorted({v["seed"] for v in per_video})
    for metric in METRICS:
        if not all(metric in v for v in per_video):
            continue
        per_seed = [statistics.fmean(v[metric] for v in per_video if v["seed"] == s) for s in seeds]
        out[metric] = {"mean": statistics.fmean(v[metric] for v in per_video), "seed_means": per_seed,
                       "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                       "seed_range": [min(per_seed), max(per_seed)]}
    return out


def compare(configs: dict, prompts: list[str], seeds: list[int], num_chunks: int, classifier, clip,
            progress=print) -> dict:
    """`configs`: name -> (pipeline, call keyword arguments). Every configuration generates every (prompt, seed)."""
    results = {}
    for name, (pipe, call) in configs.items():
        per_video = []
        for seed in seeds:
            for prompt in prompts:
                video = generate(pipe, prompt, seed, num_chunks, **call)
                per_video.append({"prompt": prompt, "seed": seed, **score(video, prompt, classifier, clip)})
                progress(f"{name} seed {seed} {prompt!r}: agreement {per_video[-1]['caption_agreement']:.2f}")
        results[name] = {"call": call, "videos": per_video, "summary": summarise(per_video)}
    return results


SHIPPED_CONFIGS = {  # name -> (shipped pipeline, call keyword arguments)
    "streaming_cam_apm": ("shapes-streaming", {"conditioning": "memory"}),
    "streaming_naive_replace": ("shapes-streaming", {"conditioning": "replace"}),
    "shapes_long_video": ("shapes-long-video", {}),
}


def run_shipped(out: str, prompts: list[str], seeds: list[int], num_chunks: int, steps: int, device: str) -> str:
    """The shipped long-video models side by side (SHIPPED_CONFIGS); writes `out` (JSON, atomically) and returns a
    markdown table of the means and seed spreads."""
    import datetime
    import json
    import os
    import platform

    from accel.pipelines import reference_classifier, reference_pipeline

    loaded = {name: reference_pipeline(name, device=device) for name in {n for n, _ in SHIPPED_CONFIGS.values()}}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    configs = {label: (loaded[name], {**call, "num_inference_steps": steps})
               for label, (name, call) in SHIPPED_CONFIGS.items()}
    start = time.perf_counter()
    results = compare(configs, prompts, seeds, num_chunks, reference_classifier(device), load_clip())
    command = (f"accel-eval long-video --out {out} --seeds {','.join(map(str, seeds))} --chunks {num_chunks} "
               f"--steps {steps} --device {device} (prompts: below)")
    record = {"command": command, "date": datetime.date.today().isoformat(), "device": device,
              "hardware": torch.cuda.get_device_name() if device.startswith("cuda") else
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "prompts": prompts, "seeds": seeds, "num_chunks": num_chunks, "steps": steps,
              "wall_s": time.perf_counter() - start, "results": results}
    with open(out + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(out + ".tmp", out)
    return table(results)


def table(results: dict) -> str:
    """Markdown: a row per configuration, each metric as mean (seed std)."""
    metrics = [m for m in METRICS if all(m in r["summary"] for r in results.values())]
    lines = ["| config | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for m in metrics:
            s = r["summary"][m]
            cells.append(f"{s['mean']:.3f}" + (f" (+-{s['seed_std']:.3f})" if s["seed_std"] is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
