"""Install and measure the shipped shapes-var and shapes-hmar models: the figures and pictures their model cards show.

    python -m accel.pipelines.hmar.report [--runs RUNS] [--weights pipelines/shapes/weights] [--samples 480]

With --runs (a folder holding the `accel.pipelines.hmar.train` stages' OUT folders tokenizer/, var/ and hmar/), the
exports of var and hmar are first installed as shapes-var and shapes-hmar, each with the records of the stages it
came from (training.json). Then, on held-out data (seed 1000; training draws seeds 0, 1, ...):

- how often the shipped shapes classifier sees the class's shape and colour, in `--samples` generated images (an
  equal number per class) and in as many real images;
- FID on the classifier's 128-d pooled features (`accel.eval.harness.metrics.fid`, torchmetrics) of the generated
  images against the real ones, and of a second real set against them: the floor at this sample count;
- the tokenizer alone: PSNR and classifier agreement of its reconstructions (what no transformer over its tokens
  can beat), and the share of its codebook in use;
- CPU seconds for a batch of 24 images (one per class).
Each at guidance scales GUIDANCE_SCALES, HMAR with its mask refinement (the schedule its folder carries,
`train.MASK_SCHEDULE`) and without (one draft per scale). Writes `evaluation.json`, `samples.png` (4 samples of each
class, at the last guidance scale) and `loss.png` (every stage) into both folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter, defaultdict

import imageio.v3 as iio
import numpy as np
import torch

from accel.eval.harness.metrics import feature_extractor, fid as harness_fid

from ..shapes.data import COLOURS, SHAPES, image_batch
from ..shapes.models import NUM_CLASSES, ShapesClassifier
from ..shapes.report import HELD_OUT_SEED, _grid
from ..shapes.train import _replace_folder
from .pipeline_hmar import HMARPipeline
from .pipeline_var import VARPipeline
from .train import SCALES, class_labels

MODELS = {"shapes-var": ("var", VARPipeline), "shapes-hmar": ("hmar", HMARPipeline)}
STAGES_OF = {"var": ("tokenizer", "var"), "hmar": ("tokenizer", "var", "hmar")}
NO_REFINEMENT = tuple((n * n,) for n in SCALES)
TIMING_THREADS = 2
# The pipelines' default (VAR's ImageNet setting) and a stronger one, which these small models follow better.
GUIDANCE_SCALES = (1.5, 3.0)


def install(runs: str, weights: str) -> None:
    """Copy the var and hmar stages' exports into the weights folder, each with its stages' training records."""
    for name, (stage, _) in MODELS.items():
        tmp = os.path.join(weights, name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(os.path.join(runs, stage, "model"), tmp)
        records = [json.load(open(os.path.join(runs, s, "training.json"))) for s in STAGES_OF[stage]]
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump({"stages": records}, f, indent=1)
        _replace_folder(tmp, os.path.join(weights, name))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), the harness metrics' format."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def real_images(seed: int, count: int) -> tuple[np.ndarray, torch.Tensor]:
    batch = image_batch(seed, 0, count)
    return to_uint8(batch.pixels), class_labels(batch)


def real_images_of(seed: int, labels: list[int], batch_size: int = 256) -> np.ndarray:
    """Real images of exactly these classes, one per label in order: each class's images taken in the order seed's
    stream of the shapes data draws them (so a class subset is compared with real images of that subset only)."""
    wanted = Counter(labels)
    if not set(wanted) <= set(range(NUM_CLASSES)):
        raise ValueError(f"class labels must be in [0, {NUM_CLASSES}), got {sorted(set(wanted))}")
    found: dict[int, list[np.ndarray]] = defaultdict(list)
    index = 0
    while any(len(found[c]) < n for c, n in wanted.items()):
        batch = image_batch(seed, index, batch_size)
        for image, label in zip(to_uint8(batch.pixels), class_labels(batch).tolist()):
            if len(found[label]) < wanted[label]:
                found[label].append(image)
        index += 1
    taken = {label: iter(images) for label, images in found.items()}
    return np.stack([next(taken[label]) for label in labels])


def generate(pipe, labels: torch.Tensor, batch: int = 96, **call) -> np.ndarray:
    """uint8 images of the class labels, sample i drawn from generator seed HELD_OUT_SEED + i."""
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start: start + batch]
        generators = [torch.Generator().manual_seed(HELD_OUT_SEED + start + i) for i in range(len(chunk))]
        out.append(pipe(chunk, generator=generators, output_type="pt", **call).images)
    return to_uint8(torch.cat(out) * 2 - 1)


def agreement(classifier, images: np.ndarray, labels: torch.Tensor) -> dict:
    """Shares of images whose shape, colour, and both, the classifier reads as the label's; and the shape's share
    for each shape asked for (where a model fails)."""
    logits = classifier.classify_images(to_pixels(images))
    shapes = labels // len(COLOURS)
    shape = logits["shape"].argmax(1) == shapes
    colour = logits["colour"].argmax(1) == labels % len(COLOURS)
    by_shape = {name: float(shape[shapes == i].float().mean()) for i, name in enumerate(SHAPES)}
    return {"shape_and_colour": float((shape & colour).float().mean()), "shape": float(shape.float().mean()),
            "colour": float(colour.float().mean()), "shape_by_shape": by_shape}


def tokenizer_figures(tokenizer, classifier, real: np.ndarray, labels: torch.Tensor) -> dict:
    pixels = to_pixels(real)
    indices = tokenizer.encode(pixels)
    reconstruction = to_uint8(tokenizer.decode(indices))
    mse = float(((to_pixels(reconstruction) - pixels) ** 2).mean())
    used = torch.cat([idx.flatten() for idx in indices]).unique().numel()
    return {"reconstruction_psnr_db": 10 * float(np.log10(4 / mse)),
            "reconstruction_agreement": agreement(classifier, reconstruction, labels),
            "codebook_share_used": used / tokenizer.config.vocab_size}


def cpu_seconds(pipe, rounds: int = 10, **call) -> float:
    """Median wall time of one batch of 24 images (one per class) over `rounds`, after a warm-up, on TIMING_THREADS
    threads (the median: the CPU may be shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS)
    labels = list(range(NUM_CLASSES))
    try:
        pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
        times = []
        for r in range(rounds):
            start = time.perf_counter()
            pipe(labels, generator=torch.Generator().manual_seed(1 + r), output_type="pt", **call)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times))


def loss_curves(training: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = training["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3))
    for ax, record in zip(np.atleast_1d(axes), stages):
        steps, losses = zip(*record["losses"])
        ax.plot(steps, losses)
        config = record["config"]
        if config.get("next_scale_steps") is not None:  # HMAR: next-scale, then the mask branch's loss
            ax.axvline(config["next_scale_steps"], color="grey", linestyle=":")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=config["stage"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure(weights: str, samples: int) -> tuple[dict, dict[str, np.ndarray]]:
    classifier = ShapesClassifier.from_pretrained(os.path.join(weights, "shapes-classifier"), dtype=torch.float32)
    classifier.eval()
    pipes = {name: cls.from_pretrained(os.path.join(weights, name), dtype=torch.float32)
             for name, (_, cls) in MODELS.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(samples) % NUM_CLASSES
    extractor = feature_extractor("shapes-hmar")  # the shapes classifier's pooled features, as the harness takes them
    fid = lambda images, reference: harness_fid(images, reference, extractor)["fid"]  # noqa: E731
    real, real_labels = real_images(HELD_OUT_SEED, samples)
    other_real, _ = real_images(HELD_OUT_SEED + 1, samples)
    configs = {"shapes-var": (pipes["shapes-var"], {}),
               "shapes-hmar": (pipes["shapes-hmar"], {}),  # its saved schedule
               "shapes-hmar, no refinement": (pipes["shapes-hmar"], {"mask_schedule": NO_REFINEMENT})}
    results = {"samples": samples, "mask_schedule": pipes["shapes-hmar"].config.mask_schedule,
               "real": {"agreement": agreement(classifier, real, real_labels), "fid_floor": fid(other_real, real)},
               "tokenizer": tokenizer_figures(pipes["shapes-var"].tokenizer, classifier, real, real_labels)}
    images = {}
    for name, (pipe, call) in configs.items():
        results[name] = {"cpu_seconds_24_images": cpu_seconds(pipe, **call)}  # CFG runs both halves at any scale
        for guidance in GUIDANCE_SCALES:
            images[name] = generate(pipe, labels, guidance_scale=guidance, **call)
            results[name][f"guidance_{guidance}"] = {"agreement": agreement(classifier, images[name], labels),
                                                     "fid": fid(images[name], real)}
        print(name, json.dumps(results[name]), flush=True)
    return results, images  # the images at the last guidance scale


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", help="install the var and hmar exports of these training runs first")
    p.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "..", "shapes", "weights"))
    p.add_argument("--samples", type=int, default=480, help="images per model (FID needs more than 128)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.runs:
        install(args.runs, args.weights)
    results, images = measure(args.weights, args.samples)
    results |= {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "timing_threads": TIMING_THREADS}
    print(json.dumps(results, indent=1))
    for name in MODELS:
        folder = os.path.join(args.weights, name)
        # The first 96 samples: 4 rows of the 24 classes (class = shape * 6 + colour, left to right).
        iio.imwrite(os.path.join(folder, "samples.png"), _grid(images[name][: 4 * NUM_CLASSES] / 255.0, NUM_CLASSES))
        loss_curves(json.load(open(os.path.join(folder, "training.json"))), os.path.join(folder, "loss.png"))
        with open(os.path.join(folder, "evaluation.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
