"""Why a shapes video model misses its caption: the figures the shapes-video card and the session notes cite.

    python scripts/diagnose_shapes_models.py --video FOLDER [--video-samples 48] [--guidance G]
                                             [--long FOLDER] [--long-seeds 8] [--out benchmarks/results/shapes_diagnosis.json]

For a video model folder (save_pretrained layout):
- caption agreement by part and the colour centroid's motion on `--video-samples` held-out videos;
- how far apart its text encoder puts "left" / "right" / "up" captions;
- the model's predicted clean video from pure noise at t = 0.98 and 0.7 for "a red circle moving left / right":
  where the red is, frame by frame (a model that cannot tell a clip's start from its end predicts the same for both);
- its loss on held-out clips at fixed noise levels with each clip's caption and with the direction word reversed;
- how close it is to time-reversal equivariant, and (from the data alone) what the direction word's sense can earn;
- how strongly its patch embedding reads the position channels (frame, row, column), next to the pixel channels.
The probes use the clips the model trained on: with motion trails if its training.json says `motion_trail`.
For a long-video model folder: the share of seeds showing the caption's shape and colour chunk by chunk over 8 chunks,
and which colours its first-chunk prediction from noise at t = 0.98 holds for "a red / blue / green circle".
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import warnings

import numpy as np
import torch

from accel.pipelines.shapes.data import COLOURS, video_batch
from accel.pipelines.shapes.long_video import ShapesLongVideoPipeline
from accel.pipelines.shapes.models import POSITION_CHANNELS, ShapesClassifier, with_positions
from accel.pipelines.shapes.pipelines import ShapesVideoPipeline
from accel.pipelines.shapes.report import (
    VIDEO_CAPTIONS, direction_word_gaps, generate_and_score, long_video_report, motion_by_centroid,
)
from accel.pipelines.shapes.train import training_record

WEIGHTS = os.path.join(os.path.dirname(__file__), "..", "pipelines", "shapes", "weights")


def _predicted_clean(transformer, model_input, text, t: float) -> np.ndarray:
    """x0 = x_t - t v from pure noise x_t (the flow the shapes models learn), as (B, F, H, W, 3) in [0, 1]."""
    noise = model_input[:, :3]
    n = noise.shape[0]
    v = transformer(model_input, encoder_hidden_states=text, timestep=torch.full((n,), t * 1000), return_dict=False)[0]
    return (((noise - t * v).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()


def _colour_weight(frames: np.ndarray, colour: str) -> np.ndarray:
    return np.exp(-((frames - np.array(COLOURS[colour])) ** 2).sum(-1) / 0.05)


def red_centroid_by_frame(pipe: ShapesVideoPipeline, n: int = 16) -> dict:
    noise = torch.randn(n, 3, 17, 32, 32, generator=torch.Generator().manual_seed(0))
    ys, xs = np.mgrid[:32, :32]
    out = {}
    for t in (0.98, 0.7):
        for direction in ("left", "right"):
            text = pipe.encode_prompt([f"a red circle moving {direction}"] * n, "cpu")
            w = _colour_weight(_predicted_clean(pipe.transformer, with_positions(pipe.transformer, noise), text, t), "red")
            x = ((w * xs).sum((2, 3)) / w.sum((2, 3))).mean(0)
            out[f"t={t} {direction}: red centroid x at frames 0/8/16"] = [round(float(x[i]), 3) for i in (0, 8, 16)]
    return out


REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up"}


@torch.no_grad()
def loss_with_reversed_direction(pipe: ShapesVideoPipeline, trail: bool, n: int = 64) -> dict:
    """The training loss (velocity MSE) on held-out clips at fixed noise levels, with each clip's own caption and with
    its direction word reversed. Where the two are equal, the model does not use the word's sense at that noise level."""
    clips = video_batch(1000, 0, n, trail=trail)
    noise = torch.randn(clips.pixels.shape, generator=torch.Generator().manual_seed(0))
    reversed_captions = [" ".join(c.split()[:-1] + [REVERSED[c.split()[-1]]]) for c in clips.captions]
    out = {}
    for t in (0.5, 0.8, 0.9, 0.95, 0.98):
        xt = with_positions(pipe.transformer, (1 - t) * clips.pixels + t * noise)
        losses = []
        for captions in (clips.captions, reversed_captions):
            text = pipe.encode_prompt(captions, "cpu")
            v = pipe.transformer(xt, encoder_hidden_states=text, timestep=torch.full((n,), t * 1000), return_dict=False)[0]
            losses.append(round(float(((v - (noise - clips.pixels)) ** 2).mean()), 5))
        out[f"t={t}"] = {"own caption": losses[0], "direction reversed": losses[1]}
    return out


@torch.no_grad()
def time_reversal_equivariance(pipe: ShapesVideoPipeline, trail: bool, n: int = 8) -> dict:
    """|f(x) - reverse(f(reverse(x)))| / |f(x)| on noised held-out clips: near 0, the model cannot tell a clip's
    start from its end (then "left" and "right", each the other played backwards, look alike to it)."""
    clips = video_batch(1000, 0, n, trail=trail)
    noise = torch.randn(clips.pixels.shape, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt(clips.captions, "cpu")

    def velocity(x, t):
        return pipe.transformer(with_positions(pipe.transformer, x), encoder_hidden_states=text,
                                timestep=torch.full((n,), t * 1000), return_dict=False)[0]

    out = {}
    for t in (0.5, 0.9):
        xt = (1 - t) * clips.pixels + t * noise
        v = velocity(xt, t)
        out[f"t={t}"] = round(float((v - velocity(xt.flip(2), t).flip(2)).norm() / v.norm()), 5)  # dim 2: frames
    return out


def optimal_loss_with_and_without_sense(trail: bool, n: int = 4096) -> dict:
    """From the data alone: the loss of the best prediction from pure noise (each caption's mean clip, estimated on
    one set of clips and scored on another) when the caption says the direction, and when it says only the axis.
    Their difference is all the direction word's sense can earn at the highest noise."""
    fit, test = video_batch(5, 0, n, trail=trail), video_batch(6, 0, n, trail=trail)
    losses = {}
    for name, with_sense in (("with sense", True), ("axis only", False)):
        means = {int(k): fit.pixels[_caption_key(fit, with_sense) == k].mean(0) for k in _caption_key(fit, with_sense).unique()}
        prediction = torch.stack([means[int(k)] for k in _caption_key(test, with_sense)])
        losses[name] = round(float(((test.pixels - prediction) ** 2).mean()), 5)
    return losses


def _caption_key(clips, with_sense: bool) -> torch.Tensor:
    """One integer per clip for its shape, colour and direction (or only its axis: DIRECTIONS pairs left/right and
    up/down)."""
    return (clips.shape * 6 + clips.colour) * 4 + (clips.direction if with_sense else clips.direction // 2)


def patch_embedding_weight_norms(pipe: ShapesVideoPipeline) -> dict:
    """Norms of the patch embedding's input weights per channel: the pixels' three and the position channels' that
    the model has (its only source of absolute positions; RoPE gives relative ones), by name."""
    weight = pipe.transformer.patch_embedding.weight.float()
    norms = [round(float(weight[:, c].norm()), 3) for c in range(weight.shape[1])]
    return {"pixel_channels": norms[:3], "position_channels": dict(zip(POSITION_CHANNELS, norms[3:]))}


def trained_with_trail(folder: str) -> bool:
    """Whether the model at `folder` trained on clips with motion trails (its training.json says), so that it is
    probed on the data it learnt."""
    record = training_record(folder)
    if record is None:
        warnings.warn(f"no training.json in or beside {folder}: probing it on clips without motion trails")
        return False
    return bool(record["config"].get("motion_trail"))


def video_diagnosis(folder: str, classifier, samples: int, guidance_scale: float | None = None) -> dict:
    trail = trained_with_trail(folder)
    pipe = ShapesVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    captions = [VIDEO_CAPTIONS[(i * 7) % len(VIDEO_CAPTIONS)] for i in range(samples)]
    if guidance_scale is None:
        guidance_scale = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    generate = functools.partial(pipe, guidance_scale=guidance_scale)
    shares, videos = generate_and_score(generate, classifier, captions, video=True, batch=8)
    return {"folder": folder, "motion_trail": trail, "samples": samples, "guidance_scale": guidance_scale,
            "caption_agreement": shares,
            "motion_by_centroid": motion_by_centroid(videos, captions),
            "text_direction_gaps": direction_word_gaps(pipe), "predicted_clean_from_noise": red_centroid_by_frame(pipe),
            "loss_with_reversed_direction": loss_with_reversed_direction(pipe, trail),
            "time_reversal_equivariance": time_reversal_equivariance(pipe, trail),
            "patch_embedding_weight_norms": patch_embedding_weight_norms(pipe),
            "data_optimal_loss_from_noise": optimal_loss_with_and_without_sense(trail)}


def long_diagnosis(folder: str, classifier, seeds: int) -> dict:
    result = long_video_report(folder, classifier, seeds=seeds)[0]
    pipe = ShapesLongVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    noise = torch.randn(16, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    colours = {}
    for colour in ("red", "blue", "green"):
        text = pipe.encode_prompt([f"a {colour} circle moving left"] * 16, False)[0]
        clean = _predicted_clean(pipe.transformer, noise, text, 0.98)
        mass = {name: float(_colour_weight(clean, name).mean()) for name in COLOURS}
        colours[f"a {colour} circle: top colours at t=0.98"] = sorted(mass, key=mass.get, reverse=True)[:3]
    return {"folder": folder, **result, "first_chunk_prediction_from_noise": colours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", default=os.path.join(WEIGHTS, "shapes-video"))
    p.add_argument("--video-samples", type=int, default=48)
    p.add_argument("--guidance", type=float, help="the video samples' guidance scale (default: the pipeline's)")
    p.add_argument("--long", help="a shapes long-video model folder")
    p.add_argument("--long-seeds", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/shapes_diagnosis.json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    classifier = ShapesClassifier.from_pretrained(os.path.join(WEIGHTS, "shapes-classifier"), dtype=torch.float32).eval()
    results = {"video": video_diagnosis(args.video, classifier, args.video_samples, args.guidance)}
    if args.long:
        results["long_video"] = long_diagnosis(args.long, classifier, args.long_seeds)
    print(json.dumps(results, indent=1))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
