"""The image encoder APM reads the anchor frame with: an open_clip image tower loaded from a local checkpoint.

`ACCEL_CLIP=ARCH:PATH` names it: ARCH an open_clip architecture (a built-in name such as ViT-H-14, or ARCH.json, an
open_clip model config, beside the checkpoint), PATH the checkpoint file. It is loaded with open_clip's own
`create_model_and_transforms(ARCH, pretrained=PATH)`, from that file only (no download).
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

ENV_VAR = "ACCEL_CLIP"


class ClipImageEncoder(torch.nn.Module):
    """An open_clip image tower with its preprocessing: frames (B, 3, H, W) in [0, 1] -> pooled embeddings (B, E),
    as `model.encode_image(preprocess(frame))` gives them (resize of the short side, centre crop, normalisation)."""

    def __init__(self, visual: torch.nn.Module, image_size: int, mean, std):
        super().__init__()
        self.visual = visual.eval()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.embed_dim = int(self.visual(torch.zeros(1, 3, image_size, image_size)).shape[-1])

    @classmethod
    def from_open_clip(cls, model: torch.nn.Module) -> "ClipImageEncoder":
        """From an open_clip model (its `visual` tower and the preprocessing open_clip recorded on it)."""
        cfg = model.visual.preprocess_cfg
        size = cfg["size"]
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise ValueError(f"ClipImageEncoder: square image towers only, this one takes {tuple(size)}")
            size = size[0]
        return cls(model.visual, size, cfg["mean"], cfg["std"])

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        frames = F.interpolate(frames.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        frames = frames[..., top: top + self.image_size, left: left + self.image_size]
        return (frames.clamp(0, 1) - self.mean) / self.std

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        return self.visual(self.preprocess(frames).to(dtype))


def parse_spec(spec: str) -> tuple[str, str]:
    """ARCH:PATH -> (ARCH, PATH), split at the first colon."""
    arch, sep, path = spec.partition(":")
    if not sep or not arch or not path:
        raise ValueError(f"{ENV_VAR} must be ARCH:PATH (an open_clip architecture and a local checkpoint file, "
                         f"e.g. ViT-H-14:/models/open_clip_vit_h14.safetensors), got {spec!r}")
    return arch, path


def load_image_encoder(spec: str | None = None) -> ClipImageEncoder:
    """The image encoder `spec` (default: the ACCEL_CLIP environment variable) names, loaded from its local file.
    Raises ValueError naming ACCEL_CLIP when it is unset, malformed, or names a missing file or an unknown
    architecture."""
    import open_clip

    spec = os.environ.get(ENV_VAR) if spec is None else spec
    if not spec:
        raise ValueError(f"no open_clip image encoder: {ENV_VAR} is not set (it takes ARCH:PATH, an open_clip "
                         "architecture and a local checkpoint file)")
    arch, path = parse_spec(spec)
    if not os.path.isfile(path):
        raise ValueError(f"{ENV_VAR}={spec!r}: the checkpoint {path!r} is not a file")
    config = os.path.join(os.path.dirname(os.path.abspath(path)), f"{arch}.json")
    if os.path.isfile(config):  # an architecture of one's own, described beside its weights
        open_clip.add_model_config(config)
    if arch.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"{ENV_VAR}={spec!r}: open_clip knows no architecture {arch!r}: give a built-in one "
                         f"(e.g. ViT-H-14, ViT-B-32) or put its model config at {config!r}")
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=path)
    return ClipImageEncoder.from_open_clip(model)
