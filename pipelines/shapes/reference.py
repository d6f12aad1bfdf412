"""The reference models shipped inside the package: load them offline by name."""

from __future__ import annotations

import importlib
import os
from importlib import resources

import torch

_REFERENCES = {  # name -> (module, relative to accel.pipelines.shapes, pipeline class)
    "shapes-image": (".pipelines", "ShapesImagePipeline"),
    "shapes-video": (".pipelines", "ShapesVideoPipeline"),
    "shapes-long-video": (".long_video", "ShapesLongVideoPipeline"),
    "shapes-streaming": ("..streaming_t2v.shapes", "ShapesStreamingT2VPipeline"),
    # Class-conditional (class ids, not captions): `accel.pipelines.hmar.train` and the folders' cards.
    "shapes-var": ("..hmar", "VARPipeline"),
    "shapes-hmar": ("..hmar", "HMARPipeline"),
}
CLASSIFIER = "shapes-classifier"
CLIP = "shapes-clip"  # an open_clip model: its architecture config shapes-clip.json beside the checkpoint
CLIP_CHECKPOINT = "open_clip_model.safetensors"
_MARKERS = {CLIP: f"{CLIP}.json"}  # the file that says a shipped model is installed, where not config.json


def _folder(name: str) -> str:
    return os.fspath(resources.files("accel.pipelines.shapes") / "weights" / name)


def _installed(name: str) -> bool:
    marker = "model_index.json" if name in _REFERENCES else _MARKERS.get(name, "config.json")
    return os.path.isfile(os.path.join(_folder(name), marker))


def weights_dir(name: str) -> str:
    """Folder of a shipped model (a `save_pretrained` folder inside the installed package)."""
    if not _installed(name):
        raise FileNotFoundError(
            f"the weights of {name!r} are not in this installation ({_folder(name)}); train them with "
            f"`python -m accel.pipelines.shapes.train` and copy the result there"
        )
    return _folder(name)


CLASS_CONDITIONAL = ("shapes-var", "shapes-hmar")  # called with class ids, not prompts


def reference_names(prompted_only: bool = False) -> list[str]:
    """The reference pipelines whose weights this installation holds; `prompted_only`: those called with a prompt."""
    return sorted(name for name in _REFERENCES
                  if _installed(name) and not (prompted_only and name in CLASS_CONDITIONAL))


def reference_pipeline(name: str, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None):
    """A shipped reference pipeline, loaded from the package with no network access; `dtype` (default float32) a
    floating-point torch.dtype or its name."""
    if name not in _REFERENCES:
        raise ValueError(f"unknown reference model {name!r}; known: {sorted(_REFERENCES)}, shipped: {reference_names()}")
    module, class_name = _REFERENCES[name]
    cls = getattr(importlib.import_module(module, __package__), class_name)
    dtype = torch.float32 if dtype is None else dtype
    pipe = cls.from_pretrained(weights_dir(name), dtype=dtype, local_files_only=True)
    return pipe.to(device) if device is not None else pipe


def reference_classifier(device: str | torch.device | None = None):
    """The shipped shapes classifier (caption agreement and FID features offline)."""
    from ..checks import check_module_weights
    from .models import ShapesClassifier

    model = ShapesClassifier.from_pretrained(weights_dir(CLASSIFIER), dtype=torch.float32).eval()
    check_module_weights(model, weights_dir(CLASSIFIER))
    return model.to(device) if device is not None else model


def clip_checkpoint() -> str:
    """The shipped open_clip shapes model's checkpoint (ACCEL_CLIP=shapes-clip:PATH loads it, its architecture config
    beside it)."""
    return os.path.join(weights_dir(CLIP), CLIP_CHECKPOINT)
