"""What VAR's and HMAR's samplers share: argument checks, CFG, top-k / top-p filtering, token draws, outputs.

Token draws are inverse-CDF draws from one uniform number per token, made on the generator's own device, so a CPU
generator drives a CUDA model without moving any logits, a list of generators gives each sample its own stream,
and two computations of the same logits draw the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from ..checks import check_bool, check_choice, check_generator, check_int, check_real

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class NextScalePipelineOutput(BaseOutput):
    """images: PIL images, a (B, H, W, 3) array or a (B, 3, H, W) tensor, in [0, 1]; token_indices: the sampled
    token maps, one (B, pn_k^2) long tensor per scale."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    token_indices: list[torch.Tensor]


def check_class_labels(owner: str, class_labels, num_classes: int) -> torch.Tensor:
    """An int, a list of ints or a 1-D integer tensor of ids in [0, num_classes): (B,) long on the CPU."""
    labels = [class_labels] if isinstance(class_labels, int) and not isinstance(class_labels, bool) else class_labels
    if isinstance(labels, torch.Tensor):
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"{owner}: class_labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not labels or any(
            isinstance(c, bool) or not isinstance(c, int) for c in labels):
        raise TypeError(f"{owner}: class_labels must be a class id, a non-empty list of ids or a 1-D integer tensor, "
                        f"got {class_labels!r}")
    unknown = sorted({c for c in labels if not 0 <= c < num_classes})
    if unknown:
        raise ValueError(f"{owner}: unknown class ids {unknown}: the model has classes 0 .. {num_classes - 1}")
    return torch.tensor(labels, dtype=torch.long)


def check_sampling(owner: str, guidance_scale, top_k, top_p, generator, batch_size: int, output_type, return_dict) -> None:
    check_real(owner, "guidance_scale", guidance_scale, minimum=0.0)
    check_int(owner, "top_k", top_k, minimum=0)
    check_real(owner, "top_p", top_p, minimum=0.0, maximum=1.0)
    check_generator(owner, generator, batch_size)
    check_choice(owner, "output_type", output_type, OUTPUT_TYPES)
    check_bool(owner, "return_dict", return_dict)


def with_null_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The CFG batch: the labels, then as many null-class labels (num_classes)."""
    return torch.cat([labels, torch.full_like(labels, num_classes)])


def guided(logits: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 + t) conditional - t unconditional, from a batch whose second half is unconditional."""
    cond, uncond = logits.chunk(2)
    return (1 + strength) * cond - strength * uncond


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """VAR's filtering: keep the top_k logits (0: all), then the smallest set holding top_p of the mass (0: all)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def _uniforms(shape: tuple[int, int], generator, device) -> torch.Tensor:
    if isinstance(generator, list):
        rows = [torch.rand(shape[1], generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def draw_tokens(logits: torch.Tensor, generator) -> torch.Tensor:
    """One token per position from softmax(logits) (B, n, V): (B, n) long."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    # 1 - u lies in (0, 1], so the first index whose cdf reaches it has non-zero probability.
    target = (1 - _uniforms(tuple(logits.shape[:2]), generator, logits.device)) * cdf[..., -1]
    return torch.searchsorted(cdf, target[..., None]).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def token_probabilities(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(logits) at the given tokens: (B, n)."""
    return logits.float().softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def to_output(images: torch.Tensor, output_type: str):
    """Images in [-1, 1] (B, 3, H, W) -> PIL list, (B, H, W, 3) numpy or (B, 3, H, W) tensor, in [0, 1]."""
    return VaeImageProcessor(do_resize=False).postprocess(images.float(), output_type=output_type)
