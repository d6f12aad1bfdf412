"""Quality metrics on cached samples (uint8, channels last; videos are scored per frame).

Every metric either returns numbers or says why it can't: weights are looked for at an explicit path, then an
environment variable, then the local caches, and never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


class Unavailable(Exception):
    """A metric that cannot run here (its weights are absent); the message says why."""


def to_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, T, H, W, 3) -> float in [0, 1], (N*T, 3, H, W)."""
    t = torch.from_numpy(pixels).float() / 255
    return t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2).contiguous()


def fidelity(samples: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM against the unaccelerated outputs. PSNR of the squared error pooled over every sample: inf only
    when all are identical (a mean of per-sample PSNRs is inf as soon as one is)."""
    x, y = to_float(samples), to_float(baseline)
    psnr = float(peak_signal_noise_ratio(x, y, data_range=1.0))
    ssim = float(structural_similarity_index_measure(x, y, data_range=1.0))
    return {"psnr": psnr, "ssim": ssim}


def lpips(samples: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not (os.path.isdir(hub) and any(f.startswith("alexnet") for f in os.listdir(hub))):
        raise Unavailable(f"LPIPS needs torchvision's AlexNet weights in {hub}")
    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, sync_on_compute=False)
    return {"lpips": float(metric(to_float(samples), to_float(baseline)))}


def temporal_flicker(samples: np.ndarray) -> dict[str, float]:
    """Mean absolute change between consecutive frames, in 8-bit levels (videos only)."""
    if samples.ndim != 5:
        raise Unavailable("flicker applies to videos")
    return {"flicker": float(np.abs(np.diff(samples.astype(np.float32), axis=1)).mean())}


@dataclass
class FeatureExtractor:
    """A module mapping uint8 images (N, 3, H, W) to (N, d) features (torchmetrics probes it with uint8), and its name."""

    module: torch.nn.Module
    name: str


class _ShapesFeatures(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.image_features(images.float() / 255 * 2 - 1)


def is_shapes_pipeline(pipeline: str) -> bool:
    """A shipped shapes model, or a shapes pipeline saved locally (its model_index.json names the class)."""
    from accel.pipelines import reference_names

    index = os.path.join(pipeline, "model_index.json")
    saved = json.load(open(index)).get("_class_name", "") if os.path.isfile(index) else ""
    return pipeline in reference_names() or saved.startswith("Shapes")


def feature_extractor(pipeline_name: str, inception_path: str | None = None) -> FeatureExtractor:
    """The shapes classifier for the shapes models; else Inception from a local weights file."""
    if is_shapes_pipeline(pipeline_name):
        from accel.pipelines import reference_classifier

        return FeatureExtractor(_ShapesFeatures(reference_classifier()).eval(), "shapes-classifier")
    path = inception_path or os.environ.get("ACCEL_INCEPTION_WEIGHTS")
    default = os.path.join(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    path = path or (default if os.path.isfile(default) else None)
    if path is None or not os.path.isfile(path):
        raise Unavailable("FID/KID need Inception weights: set ACCEL_INCEPTION_WEIGHTS or put torch-fidelity's file in the torch hub cache")
    from torchmetrics.image.fid import NoTrainInceptionV3

    return FeatureExtractor(NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path), "inception")


# Sample-count rules (n: independent samples a side; a video counts once, its frames are not independent).
KID_MIN_SAMPLES = 10
KID_SUBSETS = 100
HALVES_RULE = (
    "FID and KID compare two independent sets: each configuration's odd-numbered samples against the baseline's "
    "even-numbered ones (the same seeds would be paired, near-duplicate samples), so the baseline row gives the value "
    "two sets of one distribution show at this sample count: the floor."
)
SAMPLE_COUNT_RULES = (
    "FID needs more samples a side than the feature size d (n > d); with fewer, the feature covariance is singular "
    "and FID is mostly estimator bias. "
    f"KID needs n >= {KID_MIN_SAMPLES} a side: it is the mean +- std over {KID_SUBSETS} random subsets of n/2 samples "
    "(frames, for videos); smaller subsets make it mostly noise. "
    "Latency and speedup: median (min-max) over the timed rounds."
)
STATISTICS_RULES = f"{HALVES_RULE} {SAMPLE_COUNT_RULES}"


def independent_halves(samples: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The samples' odd-numbered and the reference's even-numbered members: sets with no seed in common."""
    return samples[1::2], reference[0::2]


def _frames_uint8(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).reshape(-1, *pixels.shape[-3:]).permute(0, 3, 1, 2).contiguous()


def feature_size(extractor: FeatureExtractor, pixels: np.ndarray) -> int:
    with torch.no_grad():
        return int(extractor.module(_frames_uint8(pixels[:1])).shape[-1])


def fid(samples: np.ndarray, reference: np.ndarray, extractor: FeatureExtractor) -> dict[str, float]:
    """FID (torchmetrics) of the samples' frames against the reference's, where the sample count supports it."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    n, d = min(len(samples), len(reference)), feature_size(extractor, samples)
    if n <= d:
        raise Unavailable(f"FID needs more samples a side than the {extractor.name}'s {d} feature dimensions; "
                          f"this run has {n}")
    metric = FrechetInceptionDistance(feature=extractor.module, normalize=False, sync_on_compute=False)
    metric.update(_frames_uint8(reference), real=True)
    metric.update(_frames_uint8(samples), real=False)
    with _one_thread():
        return {"fid": float(metric.compute()), "fid_n": n}


def kid(samples: np.ndarray, reference: np.ndarray, extractor: FeatureExtractor) -> dict[str, float]:
    """KID (torchmetrics), mean and std over random subsets of half the frames, where the sample count supports it."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(samples), len(reference))
    if n < KID_MIN_SAMPLES:
        raise Unavailable(f"KID needs at least {KID_MIN_SAMPLES} samples a side; this run has {n}")
    x, y = _frames_uint8(samples), _frames_uint8(reference)
    # Only the main process measures, on every sample: no syncing with the other processes of an accelerate run.
    metric = KernelInceptionDistance(feature=extractor.module, subset_size=min(len(x), len(y)) // 2,
                                     subsets=KID_SUBSETS, normalize=False, sync_on_compute=False)
    metric.update(y, real=True)
    metric.update(x, real=False)
    with torch.random.fork_rng(devices=[]), _one_thread():  # KID's random subsets: the same in every run and process
        torch.manual_seed(0)
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_n": n}


@contextlib.contextmanager
def _one_thread():
    """FID sums the square roots of the eigenvalues of a float64 matrix product; at the eigenvalues near zero, BLAS's
    rounding, which depends on the thread count, shows up in the 8th digit. `accelerate launch` gives each process one
    thread on a GPU machine, a plain run gets all cores: one thread here should give both the same numbers. (The
    features themselves are extracted on all threads: the one two-GPU run so far matched them exactly.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clip_score(samples: np.ndarray, prompts: list[str], model_spec: str | None = None) -> dict[str, float]:
    """CLIPScore (100 x cosine, clamped at 0) through open_clip with a local checkpoint.

    `model_spec` or ACCEL_CLIP: "ARCH:PATH" (e.g. "ViT-B-32:/models/open_clip_vit_b32.bin")."""
    spec = model_spec or os.environ.get("ACCEL_CLIP")
    if not spec or ":" not in spec or not os.path.isfile(spec.split(":", 1)[1]):
        raise Unavailable("CLIPScore needs a local open_clip checkpoint: set ACCEL_CLIP=ARCH:PATH")
    import open_clip

    arch, path = spec.split(":", 1)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
    tokenizer = open_clip.get_tokenizer(arch)
    return {"clip_score": clip_score_with(model.eval(), tokenizer, samples, prompts)}


@torch.no_grad()
def clip_score_with(model, tokenizer, samples: np.ndarray, prompts: list[str]) -> float:
    """Mean CLIPScore of samples against their prompts (frames of a video each scored against its prompt)."""
    images = to_float(samples)
    frames = len(images) // len(prompts)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    img = torch.nn.functional.normalize(model.encode_image((images - mean) / std), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1).repeat_interleave(frames, 0)
    return float((100 * (img * txt).sum(-1)).clamp_min(0).mean())


def class_agreement(samples: np.ndarray, labels: list[int]) -> dict[str, float]:
    """Share of samples in which the shipped shapes classifier sees the class's shape and colour (the shapes-var /
    shapes-hmar cards' measure, `accel.pipelines.hmar.report.agreement`), and of each part alone."""
    from accel.pipelines import reference_classifier
    from accel.pipelines.hmar.report import agreement

    with torch.no_grad():
        shares = agreement(reference_classifier(), samples, torch.tensor(labels))
    return {"class_agreement": shares["shape_and_colour"], "class_agreement_shape": shares["shape"],
            "class_agreement_colour": shares["colour"], "class_agreement_n": len(labels)}


def shapes_real_images(labels: list[int], seed_offset: int = 0) -> np.ndarray:
    """Real images of the shapes data (uint8, channels last) of the classes `labels`, one each, from the held-out seed
    the cards' FID uses (plus `seed_offset`, for a second, independent set)."""
    from accel.pipelines.hmar.report import real_images_of
    from accel.pipelines.shapes.report import HELD_OUT_SEED

    return real_images_of(HELD_OUT_SEED + seed_offset, labels)


def caption_agreement(samples: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Share of samples in which the shipped shapes classifier sees what the caption says."""
    from accel.pipelines import reference_classifier
    from accel.pipelines.shapes.report import caption_agreement as agree

    x = torch.from_numpy(samples).float() / 255 * 2 - 1
    x = x.permute(0, 4, 1, 2, 3) if x.dim() == 5 else x.permute(0, 3, 1, 2)
    agreed = agree(reference_classifier(), x, prompts, video=x.dim() == 5)
    return {"agreement": float(np.mean(agreed)), "agreement_n": len(agreed)}
