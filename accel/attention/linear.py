"""SANA and SANA-Video linear self-attention on accel's Triton kernels.

    restore = apply_linear_attention_kernels(transformer)   # SanaTransformer2DModel or SanaVideoTransformer3DModel
    ...
    restore()                                               # the original processor objects, exactly

Only the linear self-attention layers change (diffusers' SanaLinearAttnProcessor2_0 and SanaLinearAttnProcessor3_0);
cross-attention and PAG processors are left alone. The replacements keep diffusers' projections, q/k norms, eps,
output projection and fp16 clip, and compute the attention itself in one fused pass (float32 inside, so fp16 cannot
overflow the normaliser, which SanaLinearAttnProcessor3_0 sums in the input dtype).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0

from accel.kernels.linear_attention import RotaryTables, linear_attention
from accel.kernels.linear_attention.inputs import MAX_HEAD_DIM

logger = logging.getLogger("accel")

EPS = 1e-15  # diffusers' SANA processors


def _project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """diffusers' projections and q/k norms; q, k, v as (B, H, N, D) views of the (B, N, H*D) projections (no copy)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return [x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value)]


def _output(attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The kernel wrote `out` with q's strides, i.e. (B, N, H, D) in memory: back to (B, N, H*D) is a view.
    hidden_states = out.transpose(1, 2).flatten(2).to(dtype)
    return attn.to_out[1](attn.to_out[0](hidden_states))


class SanaLinearAttnKernelProcessor:
    """SanaLinearAttnProcessor2_0 (SANA image models) with the attention on accel's kernels."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None) -> torch.Tensor:
        # attention_mask: ignored, as by SanaLinearAttnProcessor2_0 (SANA passes none to its self-attention).
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        out = _output(attn, linear_attention(query, key, value, eps=EPS), hidden_states.dtype)
        return out.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else out


class SanaVideoLinearAttnKernelProcessor:
    """SanaLinearAttnProcessor3_0 (SANA-Video) with the attention on accel's kernels: RoPE on the numerator only.

    The model computes one rotary table pair per forward and hands it to every layer; its compact form for the
    kernels is built once and reused while the same tables come back.
    """

    def __init__(self):
        self._source: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tables: RotaryTables | None = None

    def _rotary(self, rotary_emb, n: int, d: int) -> RotaryTables | None:
        if rotary_emb is None:  # diffusers' 3.0 processor fails here; plain linear attention is the sensible reading
            return None
        cos, sin = rotary_emb
        if self._source is None or self._source[0] is not cos or self._source[1] is not sin:
            self._tables = RotaryTables.from_diffusers(cos, sin, n, d)
            self._source = (cos, sin)  # held, so the identity test cannot match a recycled object
        return self._tables

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ) -> torch.Tensor:
        # attention_mask: ignored, as by SanaLinearAttnProcessor3_0.
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        tables = self._rotary(rotary_emb, key.shape[2], key.shape[3])
        out = linear_attention(query, key, value, eps=EPS, rotary=tables)
        return _output(attn, out, hidden_states.dtype)


_REPLACEMENTS = {
    SanaLinearAttnProcessor2_0: SanaLinearAttnKernelProcessor,
    SanaLinearAttnProcessor3_0: SanaVideoLinearAttnKernelProcessor,
}
_OURS = tuple(_REPLACEMENTS.values())


def _head_dim(attn) -> int:
    return attn.to_q.out_features // attn.heads


def apply_linear_attention_kernels(model: torch.nn.Module) -> Callable[[], None]:
    """Put accel's linear-attention kernels into every SANA linear self-attention layer of `model`.

    Returns a function restoring the original processor objects. Raises, before changing anything, on a model without
    SANA linear attention, on one already patched, and on head dims the kernels do not support.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    layers = [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    if any(isinstance(m.processor, _OURS) for m in layers):
        raise RuntimeError(f"{type(model).__name__} already runs accel's linear-attention kernels; restore it first")
    targets = [m for m in layers if type(m.processor) in _REPLACEMENTS]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no SANA linear self-attention (SanaLinearAttnProcessor2_0 or "
            f"SanaLinearAttnProcessor3_0): linear_attention_kernels applies to SanaTransformer2DModel and "
            f"SanaVideoTransformer3DModel"
        )
    too_wide = sorted({_head_dim(m) for m in targets if _head_dim(m) > MAX_HEAD_DIM})
    if too_wide:
        raise ValueError(f"head dims {too_wide} are wider than the kernels support ({MAX_HEAD_DIM})")

    shared = {}  # one replacement per kind: the video processor's rotary cache then serves every layer
    originals = [(m, m.processor) for m in targets]
    for module, processor in originals:
        kind = _REPLACEMENTS[type(processor)]
        module.set_processor(shared.setdefault(kind, kind()))
    logger.info("accel: linear-attention kernels in %d layers of %s", len(targets), type(model).__name__)

    def restore() -> None:
        for module, processor in originals:
            module.set_processor(processor)

    return restore
