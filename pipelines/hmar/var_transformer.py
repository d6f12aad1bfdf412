"""VAR's class-conditional next-scale transformer (arXiv 2404.02905) as a diffusers model.

The sequence is the token pyramid: scale 0 holds start tokens (the class embedding), scale k >= 1 the embedded
input `VARTokenizer.scale_input(k, f_hat)`; the logits at scale k predict scale k's tokens. Attention is
block-causal over scales. Training and the uncached sampler run the whole prefix under that mask through the
block-sparse kernel (`forward`); the cached sampler runs one scale at a time against a KV cache of the coarser
scales (`scale_logits`), which is the same computation since the mask lets a scale see exactly what is cached.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .attention import KVCache
from .blocks import AdaLNHead, AdaLNSelfAttentionBlock, SegmentAttentionMixin, TokenPyramidEmbeddings, run_blocks
from .scales import VAR_SCALES, ScaleLayout, check_scales


def check_width(owner: str, depth: int, width: int | None, num_heads: int | None) -> tuple[int, int]:
    """VAR's shape rule: width = 64 depth, heads = depth, unless given; the width must split into the heads."""
    width, num_heads = width or 64 * depth, num_heads or depth
    if depth < 1 or width % num_heads:
        raise ValueError(f"{owner}: needs depth >= 1 and width divisible by num_heads, got depth {depth}, width {width}, "
                         f"heads {num_heads}")
    return width, num_heads


class VARTransformer(SegmentAttentionMixin, ModelMixin, ConfigMixin):
    """VAR-d{depth}: `depth` AdaLN blocks of width 64 depth and `depth` heads (override with width / num_heads).

    codebook_dim and vocab_size are the tokenizer's; class id num_classes is the null class of CFG.
    """

    @register_to_config
    def __init__(self, num_classes: int = 1000, depth: int = 16, width: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, vocab_size: int = 4096, codebook_dim: int = 32,
                 scales: tuple[int, ...] = VAR_SCALES, qk_l2_norm: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        width, num_heads = check_width(type(self).__name__, depth, width, num_heads)
        self.layout = ScaleLayout(check_scales(type(self).__name__, list(scales)))
        self.embeddings = TokenPyramidEmbeddings(num_classes, width, self.layout)
        self.token_embed = nn.Linear(codebook_dim, width)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttentionBlock(width, num_heads, mlp_ratio, qk_l2_norm, norm_eps) for _ in range(depth))
        self.head = AdaLNHead(width, vocab_size, norm_eps)

    def embed_pyramid(self, cond: torch.Tensor, scale_inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Start tokens followed by the embedded inputs of scales 1 .. n-1: ((B, N, C), n)."""
        first = self.layout.lengths[0]
        count = first + scale_inputs.shape[1]
        starts = [self.layout.start(k) for k in range(1, self.layout.num_scales + 1)]
        if count not in starts:
            raise ValueError(f"{type(self).__name__}: scale_inputs has {scale_inputs.shape[1]} tokens; the inputs of "
                             f"scales 1 .. n-1 have one of {[s - first for s in starts]} for scales {self.layout.scales}")
        num_scales = starts.index(count) + 1
        tokens = self.token_embed(scale_inputs) + self.embeddings.scale_position(1, num_scales - 1)
        return torch.cat([self.embeddings.start_tokens(cond), tokens], dim=1), num_scales

    def forward(self, class_labels: torch.Tensor, scale_inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of the first n scales under the block-causal mask (training; the uncached sampler).

        class_labels (B,) (num_classes for no class); scale_inputs (B, N - pn_0^2, Cvae): the concatenated
        `scale_input`s of scales 1 .. n-1 (all scales: `VARTokenizer.teacher_forcing_input`). Returns (B, N, V) fp32.
        """
        cond = self.embeddings.condition(class_labels)
        x, num_scales = self.embed_pyramid(cond, scale_inputs.to(self.dtype))
        x = run_blocks(self.blocks, x, cond, mask=self.layout.block_causal(num_scales, self.segment_attention_backend))
        return self.head(x, cond)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def scale_tokens(self, k: int, cond: torch.Tensor, scale_input: torch.Tensor | None) -> torch.Tensor:
        """Scale k's embedded input: the start tokens for k = 0, else the tokenizer's scale_input (B, pn_k^2, Cvae)."""
        if k == 0:
            return self.embeddings.start_tokens(cond)
        return self.token_embed(scale_input.to(self.dtype)) + self.embeddings.scale_position(k)

    def scale_logits(self, k: int, cond: torch.Tensor, scale_input: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Logits of scale k (B, pn_k^2, V), attending to the scales in `cache` and adding scale k to it.
        Scales must come in order 0, 1, ... with one cache per run."""
        x = run_blocks(self.blocks, self.scale_tokens(k, cond, scale_input), cond, caches=cache.layers)
        return self.head(x, cond)
