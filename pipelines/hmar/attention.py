"""Self-attention over scale segments, as VAR and HMAR compute it.

Three ways a layer attends, chosen by its caller:
- over a whole token pyramid under a `SegmentMask` (training, VAR's uncached prefix, HMAR's full forward):
  `segment_attention`, with one of the backends below;
- over one scale with every earlier scale cached (VAR's KV-cached sampling): the query scale sees all cached keys,
  so the mask is dense and SDPA computes it;
- over one scale alone (HMAR's sampling: Markovian, no cache): dense within the scale, SDPA again.

Segment backends (`SegmentMask.backend`, set per model with `set_segment_attention`):
- "block_sparse": `accel.kernels.block_sparse_attention` on the mask's blocks (the token rule makes the segment
  edges exact; fp16 / bf16, the Triton kernel on CUDA or under TRITON_INTERPRET=1);
- "sdpa": one `scaled_dot_product_attention` per segment on slices of q, k, v (no mask: each call takes the fused
  flash / efficient kernels; any dtype and device);
- "varlen": block-diagonal only, CUDA fp16 / bf16: the batch's segments packed as variable-length sequences for
  torch's flash `varlen_attn`, one launch;
- "auto": what measured fastest (benchmarks/hmar_gpu.py, hmar_attention_tiles_gpu.py): see `_auto_backend`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from accel.kernels import block_sparse_attention

from .scales import SegmentMask

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_LOG_SCALE = math.log(100.0)  # VAR clamps the learned per-head temperature at 100


def _auto_backend(q: torch.Tensor) -> str:
    # fp32 / fp64 never reach the kernel (it takes fp16 / bf16 only): per-segment SDPA is exact and differentiable.
    if q.dtype not in HALF_DTYPES:
        return "sdpa"
    # H100, HMAR shape: block-diagonal forward block-sparse 0.29 ms, forward + backward 1.78
    # (results/hmar_attention_tiles_h100.json); in an earlier run varlen flash 0.40 / 1.94 and SDPA per segment 0.50
    # forward with a 3x slower backward (results/hmar_h100.json). Block-causal has no varlen form.
    return "block_sparse"


def _check_varlen(q: torch.Tensor, segments: SegmentMask) -> None:
    if varlen_attn is None:
        raise RuntimeError(f"segment attention backend 'varlen' needs torch.nn.attention.varlen (torch >= 2.10), "
                           f"this is torch {torch.__version__}; use 'auto', 'block_sparse' or 'sdpa'")
    if segments.causal or q.device.type != "cuda" or q.dtype not in HALF_DTYPES:
        raise ValueError("segment attention backend 'varlen' takes block-diagonal masks on CUDA in fp16 / bf16, got "
                         f"{'block-causal' if segments.causal else 'block-diagonal'} {q.dtype} on {q.device}; "
                         "use 'auto', 'block_sparse' or 'sdpa'")


def _sdpa_segments(q, k, v, segments: SegmentMask, scale: float) -> torch.Tensor:
    outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, first:e], v[:, :, first:e], scale=scale)
            for s, e, first in segments.spans()]
    return torch.cat(outs, dim=2)


def _varlen_segments(q, k, v, segments: SegmentMask, scale: float) -> torch.Tensor:
    # (B, H, N, D) -> (B * N, H, D): every (batch entry, segment) becomes one sequence of the packed batch.
    b, h, n, d = q.shape
    offsets = segments.packed_offsets(b, q.device)
    longest = max(segments.lengths)
    packed = [x.transpose(1, 2).reshape(b * n, h, d) for x in (q, k, v)]
    out = varlen_attn(*packed, offsets, offsets, longest, longest, scale=scale)
    return out.view(b, n, h, d).transpose(1, 2)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: SegmentMask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the (query, key) pairs `segments` allows; q, k, v (B, H, N, D), N its total."""
    if q.shape[2] != segments.total:
        raise ValueError(f"segment attention: {q.shape[2]} tokens, the segments {list(segments.lengths)} cover "
                         f"{segments.total}")
    backend = _auto_backend(q) if segments.backend == "auto" else segments.backend
    if backend == "varlen":
        _check_varlen(q, segments)
        return _varlen_segments(q, k, v, segments, scale)
    if backend == "sdpa":
        return _sdpa_segments(q, k, v, segments, scale)
    return block_sparse_attention(q, k, v, segments.block_mask(q.device), scale=scale)


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

    def forward(self, x: torch.Tensor, mask: SegmentMask | None = None, cache: LayerKVCache | None = None) -> torch.Tensor:
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
