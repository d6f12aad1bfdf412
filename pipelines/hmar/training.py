"""Training objectives and steps for VAR and HMAR on token pyramids of a frozen `VARTokenizer`.

- VAR: teacher-forced next-scale cross-entropy over all tokens, block-causal mask (`VARTransformer.forward`).
- HMAR next-scale: the same loss through the block-diagonal mask (`HMARTransformer.forward`).
- HMAR masked refinement (fine-tuning): hide a random fraction of every scale k >= 1 (the same positions across the
  batch, as HMAR does), predict the hidden tokens from the rest with the mask branch, cross-entropy on the hidden
  tokens only. HMAR fine-tunes the mask branch alone, started from the next-scale branch
  (`start_mask_branch_from_next_scale`, `mask_branch_parameters`).
Class labels are replaced by the null class with probability cond_drop_rate (VAR: 0.1), which CFG needs.
The masks run through the block-sparse kernel; its gradients are those of `accel.kernels` (fp32 / fp64 models run
its differentiable PyTorch reference, see attention.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .hmar_transformer import HMARTransformer
from .tokenizer import VARTokenizer
from .var_transformer import VARTransformer


def drop_classes(labels: torch.Tensor, num_classes: int, rate: float, generator=None) -> torch.Tensor:
    """Each label becomes the null class (num_classes) with probability `rate`."""
    drop = torch.rand(labels.shape, generator=generator, device="cpu" if generator is None else generator.device)
    return torch.where(drop.to(labels.device) < rate, num_classes, labels)


@torch.no_grad()
def teacher_forcing(tokenizer: VARTokenizer, indices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale inputs (B, L - pn_0^2, Cvae), targets (B, L)) of a token pyramid."""
    return tokenizer.teacher_forcing_input(indices), torch.cat(indices, dim=1)


def next_scale_loss(transformer: VARTransformer | HMARTransformer, tokenizer: VARTokenizer, indices: list[torch.Tensor],
                    class_labels: torch.Tensor, cond_drop_rate: float = 0.1, generator=None) -> torch.Tensor:
    """Mean cross-entropy of every token given the coarser scales (VAR: block-causal; HMAR: block-diagonal)."""
    inputs, targets = teacher_forcing(tokenizer, indices)
    labels = drop_classes(class_labels, transformer.config.num_classes, cond_drop_rate, generator)
    logits = transformer(labels, inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hidden_positions(transformer: HMARTransformer, ratio: float, generator=None) -> torch.Tensor:
    """bool (L - pn_0^2,): ceil(ratio * n_k) random positions of every scale k >= 1, shared by the batch."""
    layout, parts = transformer.layout, []
    for n in layout.lengths[1:]:
        order = torch.randperm(n, generator=generator)
        parts.append(torch.zeros(n, dtype=torch.bool).index_fill_(0, order[: math.ceil(ratio * n)], True))
    return torch.cat(parts)


def masked_prediction_loss(transformer: HMARTransformer, tokenizer: VARTokenizer, indices: list[torch.Tensor],
                           class_labels: torch.Tensor, ratio: float | None = None, cond_drop_rate: float = 0.1,
                           generator=None) -> torch.Tensor:
    """Cross-entropy of the hidden tokens; ratio None draws it from U(0, 1) per step (HMAR)."""
    if ratio is None:
        ratio = float(torch.rand((), generator=generator))
    inputs, targets = teacher_forcing(tokenizer, indices)
    with torch.no_grad():
        own_tokens = tokenizer.scale_embeddings(indices)
    hidden = hidden_positions(transformer, ratio, generator).to(targets.device)
    labels = drop_classes(class_labels, transformer.config.num_classes, cond_drop_rate, generator)
    logits = transformer.masked_forward(labels, inputs, own_tokens, hidden)
    first = transformer.layout.lengths[0]
    return F.cross_entropy(logits[:, first:][:, hidden].flatten(0, 1), targets[:, first:][:, hidden].flatten())


@torch.no_grad()
def start_mask_branch_from_next_scale(transformer: HMARTransformer) -> None:
    """Copy the next-scale blocks and head into the mask branch (HMAR starts its fine-tuning there)."""
    transformer.mask_blocks.load_state_dict(transformer.next_scale_blocks.state_dict())
    transformer.mask_head.load_state_dict(transformer.next_scale_head.state_dict())


def mask_branch_parameters(transformer: HMARTransformer) -> list[torch.nn.Parameter]:
    """What masked-refinement fine-tuning trains: the mask blocks, the mask head and the mask embedding."""
    modules = (transformer.mask_blocks, transformer.mask_head, transformer.mask_embedding)
    return [p for module in modules for p in module.parameters()]


def training_step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 2.0) -> float:
    """One optimiser step on loss(); gradients clipped to max_grad_norm (VAR's default 2). Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(value.detach())
