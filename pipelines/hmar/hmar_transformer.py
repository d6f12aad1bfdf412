"""HMAR's transformer (arXiv 2506.04421): VAR's next-scale prediction made Markovian, plus masked refinement.

Scale k's input is the upsampled cumulative reconstruction of scales 0 .. k-1 (`VARTokenizer.scale_input`), which
already carries everything coarser scales decided; so every scale attends within itself only (a block-diagonal
mask) and sampling needs no KV cache. The blocks split in three:
    base blocks -> next-scale blocks -> next-scale head   (predict scale k's tokens)
    base blocks -> mask blocks       -> mask head         (re-predict the masked tokens of a drafted scale k)
The masked branch's input adds scale k's own drafted tokens (`VARTokenizer.scale_embeddings`), with the masked
ones replaced by a learned mask embedding.

`forward` / `masked_forward` run the whole pyramid under the block-diagonal mask through the block-sparse kernel
(training); `scale_logits` / `masked_scale_logits` run one scale alone with dense attention (sampling). The two are
the same computation: a block-diagonal mask lets a scale see exactly itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .blocks import AdaLNHead, AdaLNSelfAttentionBlock, SegmentAttentionMixin, TokenPyramidEmbeddings, run_blocks
from .scales import VAR_SCALES, ScaleLayout, check_scales
from .var_transformer import check_width


class HMARTransformer(SegmentAttentionMixin, ModelMixin, ConfigMixin):
    """HMAR-d{depth}: depth - branch_depth base blocks shared by both branches, and branch_depth blocks in each of
    the next-scale and mask branches (HMAR's released models: branch_depth 8). Widths and heads as VAR's."""

    @register_to_config
    def __init__(self, num_classes: int = 1000, depth: int = 16, width: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, vocab_size: int = 4096, codebook_dim: int = 32,
                 scales: tuple[int, ...] = VAR_SCALES, qk_l2_norm: bool = True, norm_eps: float = 1e-6,
                 branch_depth: int = 8):
        super().__init__()
        owner = type(self).__name__
        width, num_heads = check_width(owner, depth, width, num_heads)
        if not 1 <= branch_depth <= depth:
            raise ValueError(f"{owner}: branch_depth must be in [1, depth={depth}], got {branch_depth}")
        self.layout = ScaleLayout(check_scales(owner, list(scales)))
        self.embeddings = TokenPyramidEmbeddings(num_classes, width, self.layout)
        # The two branches add their token embeddings before one shared bias (HMAR's `word_embed_bias`).
        self.token_embed = nn.Linear(codebook_dim, width, bias=False)
        self.token_embed_bias = nn.Parameter(torch.zeros(width))
        self.mask_embedding = nn.Embedding(1, width)
        nn.init.trunc_normal_(self.mask_embedding.weight, std=(1 / width / 3) ** 0.5)

        def stack(n):
            return nn.ModuleList(AdaLNSelfAttentionBlock(width, num_heads, mlp_ratio, qk_l2_norm, norm_eps) for _ in range(n))

        self.base_blocks = stack(depth - branch_depth)
        self.next_scale_blocks, self.mask_blocks = stack(branch_depth), stack(branch_depth)
        self.next_scale_head = AdaLNHead(width, vocab_size, norm_eps)
        self.mask_head = AdaLNHead(width, vocab_size, norm_eps)

    # ---- inputs -------------------------------------------------------------------------------------------------

    def _pyramid(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Start tokens, then scales 1 .. K-1's embedded tokens (B, L - pn_0^2, C) with their positions and bias."""
        if tokens.shape[1] != self.layout.total - self.layout.lengths[0]:
            raise ValueError(f"{type(self).__name__}: inputs must cover scales 1 .. K-1 "
                             f"({self.layout.total - self.layout.lengths[0]} tokens), got {tokens.shape[1]}")
        rest = tokens + self.token_embed_bias + self.embeddings.scale_position(1, self.layout.num_scales - 1)
        return torch.cat([self.embeddings.start_tokens(cond), rest], dim=1)

    def _masked_tokens(self, scale_inputs: torch.Tensor, token_inputs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The masked branch's token embedding: next-scale input + own drafted tokens, the masked ones hidden."""
        own = torch.where(masked[..., None], self.mask_embedding.weight[0], self.token_embed(token_inputs.to(self.dtype)))
        return self.token_embed(scale_inputs.to(self.dtype)) + own

    # ---- whole pyramid, block-diagonal mask (training) ----------------------------------------------------------

    def forward(self, class_labels: torch.Tensor, scale_inputs: torch.Tensor) -> torch.Tensor:
        """Next-scale logits of every scale (B, L, V) fp32. scale_inputs (B, L - pn_0^2, Cvae):
        `VARTokenizer.teacher_forcing_input`; class_labels (B,), num_classes for no class."""
        cond = self.embeddings.condition(class_labels)
        x = self._pyramid(cond, self.token_embed(scale_inputs.to(self.dtype)))
        mask = self.layout.block_diagonal(self.segment_attention_backend)
        x = run_blocks(self.base_blocks, x, cond, mask=mask)
        return self.next_scale_head(run_blocks(self.next_scale_blocks, x, cond, mask=mask), cond)

    def masked_forward(self, class_labels: torch.Tensor, scale_inputs: torch.Tensor, token_inputs: torch.Tensor,
                       masked: torch.Tensor) -> torch.Tensor:
        """Masked-prediction logits of every scale (B, L, V) fp32. token_inputs (B, L - pn_0^2, Cvae):
        `VARTokenizer.scale_embeddings` of the true tokens; masked: bool (B, L - pn_0^2) or (L - pn_0^2,), True
        where a token is hidden."""
        cond = self.embeddings.condition(class_labels)
        x = self._pyramid(cond, self._masked_tokens(scale_inputs, token_inputs, masked))
        mask = self.layout.block_diagonal(self.segment_attention_backend)
        x = run_blocks(self.base_blocks, x, cond, mask=mask)
        return self.mask_head(run_blocks(self.mask_blocks, x, cond, mask=mask), cond)

    # ---- one scale alone (sampling: no cache) -------------------------------------------------------------------

    def _scale(self, k: int, cond: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        if k == 0:
            return self.embeddings.start_tokens(cond)
        return tokens + self.token_embed_bias + self.embeddings.scale_position(k)

    def scale_logits(self, k: int, cond: torch.Tensor, scale_input: torch.Tensor | None) -> torch.Tensor:
        """Next-scale logits of scale k alone (B, pn_k^2, V); scale_input (B, pn_k^2, Cvae), None for k = 0."""
        tokens = None if k == 0 else self.token_embed(scale_input.to(self.dtype))
        x = run_blocks(self.base_blocks, self._scale(k, cond, tokens), cond)
        return self.next_scale_head(run_blocks(self.next_scale_blocks, x, cond), cond)

    def masked_scale_logits(self, k: int, cond: torch.Tensor, scale_input: torch.Tensor, token_input: torch.Tensor,
                            masked: torch.Tensor) -> torch.Tensor:
        """Masked-prediction logits of scale k >= 1 alone (B, pn_k^2, V); token_input its drafted tokens'
        embeddings (B, pn_k^2, Cvae), masked bool (B, pn_k^2)."""
        x = self._scale(k, cond, self._masked_tokens(scale_input, token_input, masked))
        x = run_blocks(self.base_blocks, x, cond)
        return self.mask_head(run_blocks(self.mask_blocks, x, cond), cond)
