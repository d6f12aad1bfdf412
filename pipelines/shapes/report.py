"""Measure the shipped shapes models: the figures and pictures their model cards show.

    python -m accel.pipelines.shapes.report [--weights pipelines/shapes/weights] [--samples 96]

Measures, on held-out data (seed 1000, never used in training): the classifier's accuracy; for samples
generated at the pipelines' default steps and guidance, how often the classifier agrees with the caption;
the CPU time of one image, one 17-frame video and one 8-chunk long video. Writes `evaluation.json`, a sample grid
(PNG), a short video (GIF) and the loss curve (PNG) into each model's folder, beside the card (README.md) that cites
them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import imageio.v3 as iio
import numpy as np
import torch

from .data import image_batch, video_batch
from .models import ShapesClassifier
from .pipelines import ShapesImagePipeline, ShapesVideoPipeline
from .text import IMAGE_CAPTIONS, VIDEO_CAPTIONS, embed_captions

HELD_OUT_SEED = 1000


def _accuracy(logits: dict, batch) -> dict[str, float]:
    return {k: float((v.argmax(1) == getattr(batch, k)).float().mean()) for k, v in logits.items()}


@torch.no_grad()
def classifier_accuracy(classifier: ShapesClassifier, batches: int = 8) -> dict[str, float]:
    acc = {}
    for i in range(batches):
        images, videos = image_batch(HELD_OUT_SEED, i, 128), video_batch(HELD_OUT_SEED, i, 32)
        for prefix, logits, batch in (("image", classifier.classify_images(images.pixels), images),
                                      ("video", classifier.classify_videos(videos.pixels), videos)):
            for k, v in _accuracy(logits, batch).items():
                acc[f"{prefix}_{k}"] = acc.get(f"{prefix}_{k}", 0.0) + v / batches
    return acc


def agreement_by_part(classifier, pixels: torch.Tensor, captions: list[str], video: bool) -> dict[str, list[bool]]:
    """Per sample and per part of the caption ("a <colour> <shape> [moving <direction>]"): does the classifier see it?"""
    from .data import COLOUR_NAMES, DIRECTIONS, SHAPES

    with torch.no_grad():
        logits = classifier.classify_videos(pixels) if video else classifier.classify_images(pixels)
    words = [c.split() for c in captions]
    parts = {"shape": (SHAPES, 2), "colour": (COLOUR_NAMES, 1)} | ({"direction": (DIRECTIONS, 4)} if video else {})
    return {part: (logits[part].argmax(1) == torch.tensor([names.index(w[i]) for w in words])).tolist()
            for part, (names, i) in parts.items()}


def caption_agreement(classifier, pixels: torch.Tensor, captions: list[str], video: bool) -> list[bool]:
    """Does each sample show its caption (shape and colour, and for videos the direction)?"""
    return [all(ok) for ok in zip(*agreement_by_part(classifier, pixels, captions, video).values())]


def colour_centroids(frames: np.ndarray, captions: list[str]) -> np.ndarray:
    """Per video and frame, the (x, y) centroid of the pixels near the caption's colour; NaN where none is.
    Frames (B, F, H, W, 3) in [0, 1]; returns (B, F, 2)."""
    from .data import COLOURS

    ys, xs = np.mgrid[: frames.shape[2], : frames.shape[3]]
    out = np.full((*frames.shape[:2], 2), np.nan)
    for i, (video, caption) in enumerate(zip(frames, captions)):
        mask = np.abs(video - np.array(COLOURS[caption.split()[1]])).sum(-1) < 0.35  # (F, H, W)
        seen = mask.any(axis=(1, 2))
        area = mask.sum(axis=(1, 2))[seen]
        out[i, seen] = np.stack([(mask * xs).sum(axis=(1, 2))[seen], (mask * ys).sum(axis=(1, 2))[seen]], -1) / area[:, None]
    return out


def motion_by_centroid(frames: np.ndarray, captions: list[str], frames_apart: int = 8) -> dict[str, float]:
    """Independent of the classifier: how the centroid of the caption's colour moves from the first frame to frame
    `frames_apart`. Shares of videos moving along the captioned axis, and along it in the captioned sense.
    Frames (B, F, H, W, 3) in [0, 1]."""
    from .data import _DIRECTION_VECTORS, DIRECTIONS

    axis = sense = 0
    for (first, last), caption in zip(colour_centroids(frames[:, [0, frames_apart]], captions), captions):
        if not np.isnan([first, last]).any():  # the colour is seen in both frames (else the video counts as wrong)
            moved, expected = last - first, _DIRECTION_VECTORS[DIRECTIONS.index(caption.split()[4])].numpy()
            along = int(np.argmax(np.abs(moved)))
            axis += bool(expected[along] != 0)
            sense += bool(expected[along] != 0 and np.sign(moved[along]) == expected[along])
    return {"axis": axis / len(captions), "axis_and_sense": sense / len(captions)}


def chunk_agreement(classifier, frames: np.ndarray, captions: list[str], chunk_frames: int) -> np.ndarray:
    """Per long video and chunk: does the chunk show the caption's shape and colour (the classifier's mean over the
    chunk's frames)? Frames (B, F, H, W, 3) in [0, 1]; returns (B, chunks) booleans."""
    from .data import COLOUR_NAMES, SHAPES

    pixels = _to_unit(frames)
    b, c, f, h, w = pixels.shape
    with torch.no_grad():
        logits = classifier.classify_images(pixels.transpose(1, 2).reshape(b * f, c, h, w))
    words = [caption.split() for caption in captions]  # "a <colour> <shape> moving <direction>"
    ok = torch.ones(b, f // chunk_frames, dtype=torch.bool)
    for head, names, position in (("shape", SHAPES, 2), ("colour", COLOUR_NAMES, 1)):
        per_chunk = logits[head].softmax(-1).reshape(b, f // chunk_frames, chunk_frames, -1).mean(2).argmax(-1)
        ok &= per_chunk == torch.tensor([names.index(w[position]) for w in words])[:, None]
    return ok.numpy()


def motion_across_chunks(frames: np.ndarray, captions: list[str], chunk_frames: int, min_speed: float = 0.3,
                         max_jump: float = 2.5) -> dict:
    """Does the shape keep moving, and without a jump where one chunk ends and the next begins? Per video: over
    every two consecutive chunks the colour's centroid travels at least `min_speed` px a frame on average (two: where
    a shape turns at an edge, its rasterised centroid can stand still for a chunk), and no step from a chunk's last
    frame to the next chunk's first is longer than `max_jump` px (the data moves 0.6-0.9 px a frame). Also the median
    step inside chunks and at their boundaries, over all videos."""
    if frames.shape[1] % chunk_frames:
        raise ValueError(f"{frames.shape[1]} frames are not whole chunks of {chunk_frames}")
    steps = np.linalg.norm(np.diff(colour_centroids(frames, captions), axis=1), axis=-1)  # (B, F-1); NaN: colour lost
    at_boundary = (np.arange(1, frames.shape[1]) % chunk_frames) == 0
    inside = steps[:, ~at_boundary].reshape(len(frames), -1, chunk_frames - 1)
    per_chunk = inside.mean(-1)
    moving = ((per_chunk[:, 1:] + per_chunk[:, :-1]) / 2 >= min_speed).all(1)  # NaN (colour lost) compares False
    smooth = (steps[:, at_boundary] <= max_jump).all(1)
    return {"steady": float((moving & smooth).mean()),
            "median_step_px": {"inside_chunks": float(np.nanmedian(inside)), "at_boundaries": float(np.nanmedian(steps[:, at_boundary]))}}


def chunk_consistency(classifier, frames: np.ndarray, captions: list[str], chunk_frames: int) -> list[bool]:
    """Per long video: does every chunk show the caption's shape and colour?"""
    return chunk_agreement(classifier, frames, captions, chunk_frames).all(1).tolist()


def _to_unit(pixels: np.ndarray) -> torch.Tensor:
    """Pipeline "np" output in [0, 1] (channels last) -> classifier input in [-1, 1] (channels first)."""
    t = torch.from_numpy(np.asarray(pixels)).float() * 2 - 1
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t.permute(0, 4, 1, 2, 3)


def generate_and_score(pipe, classifier, captions: list[str], video: bool, batch: int = 24) -> tuple[dict, np.ndarray]:
    """({"all": share agreeing with the whole caption, and the share per part}, the samples)."""
    parts, samples = {}, []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        g = [torch.Generator().manual_seed(HELD_OUT_SEED + start + i) for i in range(len(chunk))]
        out = pipe(chunk, generator=g, output_type="np")
        pixels = out.frames if video else out.images
        for part, ok in agreement_by_part(classifier, _to_unit(pixels), chunk, video).items():
            parts.setdefault(part, []).extend(ok)
        samples.append(np.asarray(pixels))
    shares = {"all": float(np.mean([all(ok) for ok in zip(*parts.values())]))}
    return shares | {part: float(np.mean(ok)) for part, ok in parts.items()}, np.concatenate(samples)


def long_video_report(folder: str, classifier, seeds: int, chunks: int = 8) -> tuple[dict, np.ndarray]:
    """How often a long video keeps its caption's shape and colour in every one of `chunks` chunks, keeps moving
    across chunk boundaries, and moves the captioned way over its first 4 chunks."""
    from .long_video import CHUNK_FRAMES, ShapesLongVideoPipeline

    pipe = ShapesLongVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    captions = [VIDEO_CAPTIONS[(i * 7) % len(VIDEO_CAPTIONS)] for i in range(seeds)]
    generators = [torch.Generator().manual_seed(HELD_OUT_SEED + i) for i in range(seeds)]
    frames = pipe(captions, num_chunks=chunks, generator=generators).frames
    ok = chunk_agreement(classifier, frames, captions, CHUNK_FRAMES)
    return {f"long_video_keeps_shape_and_colour_over_{chunks}_chunks": float(ok.all(1).mean()),
            "long_video_chunks_showing_shape_and_colour": ok.mean(0).round(3).tolist(),  # by chunk: where it fails
            "long_video_motion_across_chunks": motion_across_chunks(frames, captions, CHUNK_FRAMES),
            "long_video_motion_by_centroid_frames_0_to_15": motion_by_centroid(frames, captions, frames_apart=15),
            "long_video_seeds": seeds,
            f"cpu_seconds_long_video_{chunks}_chunks": cpu_seconds(pipe, captions[0], num_chunks=chunks)}, frames


def cpu_seconds(pipe, caption: str, **call) -> float:
    pipe(caption, generator=torch.Generator().manual_seed(0), **call)  # warm-up
    start = time.perf_counter()
    pipe(caption, generator=torch.Generator().manual_seed(1), **call)
    return time.perf_counter() - start


def _grid(images: np.ndarray, cols: int, scale: int = 3) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.ones((rows * h, cols * w, c), dtype=np.float32)
    for i, im in enumerate(images):
        canvas[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    return np.kron((canvas * 255).round().astype(np.uint8), np.ones((scale, scale, 1), dtype=np.uint8))


def _loss_curve(training: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    earlier, stage = 0, training.get("init_training")  # continued trainings: count the steps of every stage
    while stage:
        earlier, stage = earlier + stage["steps_done"], stage.get("init_training")
    steps, losses = zip(*training["losses"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([earlier + s for s in steps], losses)
    title = f"training loss: {training['config']['kind']}" + (f"\n(last stage, after {earlier} steps)" if earlier else "")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def direction_word_gaps(pipe) -> dict[str, float]:
    """How far apart the text encoder puts captions differing only in their direction word: |e(a) - e(b)| / |e(a)|
    of the padded embeddings. Words the training data never told apart end up merged (near 0)."""
    pairs = {"left_right": ("left", "right"), "up_down": ("up", "down"), "left_up": ("left", "up")}
    words = sorted({w for pair in pairs.values() for w in pair})
    e = dict(zip(words, embed_captions(pipe.tokenizer, pipe.text_encoder, [f"a red circle moving {w}" for w in words], "cpu")))
    return {name: float((e[a] - e[b]).norm() / e[a].norm()) for name, (a, b) in pairs.items()}


def _write_json_atomic(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "weights"))
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--text-gaps", action="store_true", help="only print the video text encoder's direction_word_gaps")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    folder = lambda name: os.path.join(args.weights, name)  # noqa: E731
    if args.text_gaps:
        print(json.dumps(direction_word_gaps(ShapesVideoPipeline.from_pretrained(folder("shapes-video"))), indent=1))
        return
    classifier = ShapesClassifier.from_pretrained(folder("shapes-classifier"), dtype=torch.float32).eval()
    results = {"classifier_held_out_accuracy": classifier_accuracy(classifier)}

    # Shipped in float16, run in float32: CPUs have no fast float16 matmuls.
    image = ShapesImagePipeline.from_pretrained(folder("shapes-image"), dtype=torch.float32)
    video = ShapesVideoPipeline.from_pretrained(folder("shapes-video"), dtype=torch.float32)
    for pipe in (image, video):
        pipe.set_progress_bar_config(disable=True)
    image_caps = [list(IMAGE_CAPTIONS)[i % len(IMAGE_CAPTIONS)] for i in range(args.samples)]
    video_caps = [VIDEO_CAPTIONS[(i * 7) % len(VIDEO_CAPTIONS)] for i in range(args.samples)]
    image_shares, images = generate_and_score(image, classifier, image_caps, video=False)
    video_shares, videos = generate_and_score(video, classifier, video_caps, video=True, batch=8)
    results["image_caption_agreement"], results["video_caption_agreement"] = image_shares.pop("all"), video_shares.pop("all")
    results["image_agreement_by_part"], results["video_agreement_by_part"] = image_shares, video_shares
    results["video_motion_by_centroid"] = motion_by_centroid(videos, video_caps)
    results["video_text_direction_gaps"] = direction_word_gaps(video)
    torch.set_num_threads(2)
    results["cpu_seconds_image"] = cpu_seconds(image, image_caps[0], output_type="np")
    results["cpu_seconds_video_17_frames"] = cpu_seconds(video, video_caps[0], output_type="np")
    results["samples"] = args.samples
    print(json.dumps(results, indent=1))

    iio.imwrite(os.path.join(folder("shapes-image"), "samples.png"), _grid(images[:24], 8))
    iio.imwrite(os.path.join(folder("shapes-video"), "samples.png"), _grid(videos[:8, ::4].reshape(-1, 32, 32, 3), 5))
    strip = np.concatenate(list(videos[:4]), axis=2)  # four videos side by side, frame by frame
    iio.imwrite(os.path.join(folder("shapes-video"), "sample.gif"), (strip * 255).round().astype(np.uint8), duration=120, loop=0)
    names = ["shapes-image", "shapes-video", "shapes-classifier"]
    if os.path.isfile(os.path.join(folder("shapes-long-video"), "model_index.json")):
        long_results, long_frames = long_video_report(folder("shapes-long-video"), classifier, seeds=args.samples // 4)
        results.update(long_results)
        print(json.dumps(long_results, indent=1))
        strip = np.concatenate(list(long_frames[:4]), axis=2)
        iio.imwrite(os.path.join(folder("shapes-long-video"), "sample.gif"), (strip * 255).round().astype(np.uint8),
                    duration=120, loop=0)
        names.append("shapes-long-video")
    for name in names:
        training = json.load(open(os.path.join(folder(name), "training.json")))
        _loss_curve(training, os.path.join(folder(name), "loss.png"))
        _write_json_atomic(os.path.join(folder(name), "evaluation.json"), results)


if __name__ == "__main__":
    main()
