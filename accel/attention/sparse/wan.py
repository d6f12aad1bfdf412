"""The sparse self-attention processor of WanTransformer3DModel's `attn1` layers.

It keeps diffusers' projections, q/k RMS norms, rotary embedding and output projection, and runs the attention
through the pattern (`SparsePattern.attend`: `accel.kernels.block_sparse_attention`); under Ulysses context
parallelism between the all-to-alls of ulysses.py. Cross-attention (`attn2`) is left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from accel.diffusers_internals import get_wan_qkv_projections

from .state import _GridState
from .ulysses import _heads_to_sequence, _sequence_to_heads

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding (interleaved pairs), in the same arithmetic."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor:
    """WanAttnProcessor for self-attention with the attention itself block-sparse."""

    def __init__(self, state: _GridState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("WanSparseAttnProcessor is for self-attention without an attention mask")
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"sparse attention needs float16 or bfloat16 activations, got {hidden_states.dtype}: run the model in bf16"
            )
        query, key, value = get_wan_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        if self.state.ulysses is None:
            built = self.state.built(query.shape[1], attn.heads, query.device)
            out = self.state.pattern.attend(built, query, key, value)  # (B, N, H, D)
        else:
            out = self._attend_ulysses(self.state.ulysses, attn.heads, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend_ulysses(self, cp: ContextParallelConfig, heads: int, query, key, value) -> torch.Tensor:
        """Attention on this rank's tokens (B, N/W, H, D) through every token of its heads, as diffusers' Ulysses."""
        group, world = cp._ulysses_mesh.get_group(), cp.ulysses_degree
        if heads % world:
            raise ValueError(f"sparse attention under Ulysses needs the head count ({heads}) divisible by "
                             f"ulysses_degree ({world})")
        start = dist.get_rank(group) * (heads // world)  # the heads the first all-to-all sends to this rank
        query, key, value = (_sequence_to_heads(x, group, world) for x in (query, key, value))
        built = self.state.built(query.shape[1], heads, query.device, (start, start + heads // world))
        return _heads_to_sequence(self.state.pattern.attend(built, query, key, value), group, world)
