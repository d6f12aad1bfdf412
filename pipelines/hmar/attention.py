"""Self-attention over scale segments, as VAR and HMAR compute it, with the segment masks run by `accel.kernels`.

Three ways a layer attends, chosen by its caller:
- over a whole token pyramid with a segment mask (training, VAR's uncached prefix, HMAR's full forward): the
  block-sparse kernel, which skips the masked-out blocks;
- over one scale with every earlier scale cached (VAR's KV-cached sampling): the query scale sees all cached keys,
  so the mask is dense and SDPA computes it;
- over one scale alone (HMAR's sampling: Markovian, no cache): dense within the scale, SDPA again.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from accel.kernels import BlockSparseMask, block_sparse_attention, block_sparse_attention_reference

logger = logging.getLogger("accel")

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_LOG_SCALE = math.log(100.0)  # VAR clamps the learned per-head temperature at 100
_LOGGED: set[str] = set()


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the (query, key) pairs `mask` allows; q, k, v (B, H, N, D).

    fp16 / bf16 go to `block_sparse_attention` (the Triton kernel on CUDA, or under TRITON_INTERPRET=1; its own
    logged fallback to the reference on a plain CPU). The kernel takes no fp32 / fp64, so those run its PyTorch
    reference (dense masked softmax, differentiable), logged once.
    """
    if q.dtype in KERNEL_DTYPES:
        return block_sparse_attention(q, k, v, mask, scale=scale)
    message = (f"segment attention in {q.dtype}: block_sparse_attention takes float16 / bfloat16 only, so its PyTorch "
               "reference computes it (dense masked softmax in row chunks); cast the model to bf16 for the kernel")
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)
    return block_sparse_attention_reference(q, k, v, mask, scale=scale)


class LayerKVCache:
    """The keys and values of the scales one layer has seen so far (VAR's KV cache)."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this scale's keys and values (B, H, n, D) along the sequence; return everything cached."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """One `LayerKVCache` per transformer block, for one sampling run."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]


class ScaleSelfAttention(nn.Module):
    """VAR's self-attention: one fused qkv projection with biases on q and v only (k has none), and either
    L2-normalised q and k with a learned per-head temperature (`qk_l2_norm`, VAR's released models) or the scale
    0.25 / sqrt(head_dim)."""

    def __init__(self, width: int, num_heads: int, qk_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qk_l2_norm = qk_l2_norm
        self.to_qkv = nn.Linear(width, 3 * width, bias=False)
        self.query_bias = nn.Parameter(torch.zeros(width))
        self.value_bias = nn.Parameter(torch.zeros(width))
        if qk_l2_norm:  # log temperature per head, (1, H, 1, 1) to broadcast over (B, H, N, D); VAR starts it at 4
            self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.to_out = nn.Linear(width, width)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bias = torch.cat([self.query_bias, torch.zeros_like(self.query_bias), self.value_bias])
        qkv = F.linear(x, self.to_qkv.weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        if self.qk_l2_norm:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=MAX_LOG_SCALE).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    @property
    def scale(self) -> float:
        return 1.0 if self.qk_l2_norm else 0.25 / math.sqrt(self.head_dim)

    def forward(self, x: torch.Tensor, mask: BlockSparseMask | None = None, cache: LayerKVCache | None = None) -> torch.Tensor:
        """x (B, N, C). With `mask`: x is a token pyramid attended under it. Without: x is one scale, attending to
        itself and, with `cache`, to every scale cached before it."""
        q, k, v = self._qkv(x)
        if mask is not None:
            out = segment_attention(q, k, v, mask, self.scale)
        else:
            if cache is not None:
                k, v = cache.extend(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).flatten(2))
