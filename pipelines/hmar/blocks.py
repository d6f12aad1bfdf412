"""The pieces VAR's and HMAR's transformers share: the AdaLN block, the AdaLN head and the token-pyramid embeddings.

Class conditioning is AdaLN: a linear map of SiLU(class embedding) gives per-sample gains, scales and shifts
around affine-free LayerNorms; the same class embedding is also the start token of the first scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import LayerKVCache, ScaleSelfAttention
from .scales import ScaleLayout, SegmentMask, check_segment_backend


class SegmentAttentionMixin:
    """`set_segment_attention` for the transformers: how their whole-pyramid forwards run the segment masks."""

    segment_attention_backend = "auto"

    def set_segment_attention(self, backend: str) -> None:
        """One of "auto" (the fastest measured for the dtype and device), "block_sparse", "sdpa", "varlen" (attention.py)."""
        self.segment_attention_backend = check_segment_backend(type(self).__name__, backend)


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden)
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class AdaLNSelfAttentionBlock(nn.Module):
    """x + g1 * attn(LN(x) (1 + s1) + b1), then x + g2 * mlp(LN(x) (1 + s2) + b2); (g1, g2, s1, s2, b1, b2) come
    from the class condition, in that order (the order of VAR's `ada_lin` rows, kept so its weights load as they are)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, qk_l2_norm: bool, norm_eps: float):
        super().__init__()
        self.attn = ScaleSelfAttention(width, num_heads, qk_l2_norm)
        self.mlp = FeedForward(width, round(width * mlp_ratio))
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: SegmentMask | None = None,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        """x (B, N, C), cond (B, C): see `ScaleSelfAttention.forward` for mask and cache."""
        gain1, gain2, scale1, scale2, shift1, shift2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gain1 * self.attn(self.norm(x) * (1 + scale1) + shift1, mask=mask, cache=cache)
        return x + gain2 * self.mlp(self.norm(x) * (1 + scale2) + shift2)


class AdaLNHead(nn.Module):
    """LN(x) (1 + s) + b with (s, b) from the class condition, then the logits over the codebook."""

    def __init__(self, width: int, vocab_size: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(F.silu(cond))[:, None].chunk(2, dim=-1)
        return self.proj(self.norm(x) * (1 + scale) + shift).float()  # sampling and the loss want fp32 logits


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor, mask: SegmentMask | None = None,
               caches: list[LayerKVCache] | None = None) -> torch.Tensor:
    for i, block in enumerate(blocks):
        x = block(x, cond, mask=mask, cache=None if caches is None else caches[i])
    return x


class TokenPyramidEmbeddings(nn.Module):
    """Class embeddings (with a null class for CFG at index num_classes), the learned start tokens of scale 0,
    learned absolute positions over the whole pyramid and one level embedding per scale."""

    def __init__(self, num_classes: int, width: int, layout: ScaleLayout):
        super().__init__()
        self.num_classes, self.layout = num_classes, layout
        first = layout.lengths[0]
        self.class_embedding = nn.Embedding(num_classes + 1, width)
        self.start_embedding = nn.Parameter(torch.empty(1, first, width))
        self.position_embedding = nn.Parameter(torch.empty(1, layout.total, width))
        self.level_embedding = nn.Embedding(layout.num_scales, width)
        self.register_buffer("level_ids", layout.level_ids(), persistent=False)  # the scale of every token
        std = math.sqrt(1 / width / 3)  # VAR's initialisation
        for weight in (self.class_embedding.weight, self.start_embedding, self.position_embedding, self.level_embedding.weight):
            nn.init.trunc_normal_(weight, std=std)

    def condition(self, class_labels: torch.Tensor) -> torch.Tensor:
        """(B,) class ids, num_classes meaning 'no class' -> (B, C)."""
        return self.class_embedding(class_labels)

    def scale_position(self, k: int, num_scales: int = 1) -> torch.Tensor:
        """Level + position embeddings of scales k .. k + num_scales - 1: (1, n, C)."""
        span = slice(self.layout.start(k), self.layout.start(k + num_scales))
        return self.level_embedding(self.level_ids[span])[None] + self.position_embedding[:, span]

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Scale 0's input: the class embedding on every start token, plus its positions. (B, first, C)."""
        return cond[:, None] + self.start_embedding + self.scale_position(0)
