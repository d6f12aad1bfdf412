"""The reference models shipped inside the package: load them offline by name."""

from __future__ import annotations

import os
from importlib import resources

import torch

_REFERENCES = {
    "shapes-image": "ShapesImagePipeline",
    "shapes-video": "ShapesVideoPipeline",
}
CLASSIFIER = "shapes-classifier"


def weights_dir(name: str) -> str:
    """Folder of a shipped model (a `save_pretrained` folder inside the installed package)."""
    path = os.fspath(resources.files("accel.pipelines") / "weights" / name)
    if not os.path.isfile(os.path.join(path, "model_index.json" if name in _REFERENCES else "config.json")):
        raise FileNotFoundError(
            f"the weights of {name!r} are not in this installation ({path}); train them with "
            f"`python -m accel.pipelines.shapes.train` and copy the result there"
        )
    return path


def reference_names() -> list[str]:
    return sorted(_REFERENCES)


def reference_pipeline(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A shipped reference pipeline, loaded from the package with no network access."""
    if name not in _REFERENCES:
        raise ValueError(f"unknown reference model {name!r}; shipped: {reference_names()}")
    from .shapes import pipelines

    cls = getattr(pipelines, _REFERENCES[name])
    pipe = cls.from_pretrained(weights_dir(name), dtype=dtype or torch.float32, local_files_only=True)
    return pipe.to(device) if device is not None else pipe


def reference_classifier(device: str | torch.device | None = None):
    """The shipped shapes classifier (caption agreement and FID features offline)."""
    from .shapes.models import ShapesClassifier

    model = ShapesClassifier.from_pretrained(weights_dir(CLASSIFIER), dtype=torch.float32).eval()
    return model.to(device) if device is not None else model
