"""Permuted block-sparse attention (PBS-Attn): reorder keys within segments so that a few blocks hold most of the
attention mass, then choose blocks dynamically (dynamic_mask.py) on the reordered keys.

Attention over a key set does not depend on the keys' order (non-causal attention: every video DiT layer), so keys
and values may be permuted freely, per batch and head, as long as they move together. Block-sparse attention works
at block granularity: when the keys that matter for the queries are scattered, every block holds a few of them and
top-k over pooled block scores cannot drop any block without losing mass. PBS-Attn gathers them: within each segment
of `segment_size` keys, keys are sorted by an importance score, so the important keys of a segment fill its first
blocks and the rest fill blocks that the selection can skip.

Importance (non-causal variant): the score of key j under the mean query of its (batch, head), q_mean . k_j -- the
first-order estimate of how much attention key j receives from the queries as a whole (PBS-Attn probes with the last
query block, the causal analogue). Segments keep the reordering local (e.g. a frame of a video), so blocks still
pool keys of one region.

`pbs_key_permutation` gives the permutation; `pbs_block_sparse_attention` runs the whole path (gather, dynamic mask,
kernel). Queries are not permuted: the output is in the input's query order. `pbs_token_mask` maps the mask back to
the original key order, for the float64 reference in the tests.
"""

from __future__ import annotations

import torch

from .dynamic_mask import dynamic_block_mask
from .mask import check_block_size, is_int


def pbs_key_permutation(q: torch.Tensor, k: torch.Tensor, segment_size: int) -> torch.Tensor:
    """(B, H, N_k) int64: per (batch, head), key indices in their new order: within each segment of segment_size
    keys (the last may be shorter), by descending importance q_mean . k_j (ties: lower index first)."""
    if not is_int(segment_size) or segment_size < 1:
        raise ValueError(f"segment_size must be an int >= 1, got {segment_size!r}")
    score = torch.matmul(k.float(), q.float().mean(2, keepdim=True).transpose(-1, -2))[..., 0]  # (B, H, N_k)
    # Segment s's keys sort before segment s + 1's: rank by (segment, -score). A stable sort of -score, then a stable
    # sort by segment, keeps that order inside each segment.
    by_score = torch.sort(-score, dim=-1, stable=True).indices
    segment = (by_score // segment_size).to(torch.int32)
    return by_score.gather(-1, torch.sort(segment, dim=-1, stable=True).indices)


def gather_keys(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) gathered along N by a per-(batch, head) permutation perm (B, H, N)."""
    return x.gather(2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))


def pbs_block_sparse_attention(q, k, v, budget: int, segment_size: int, sink_blocks: int = 0, block_size: int = 128,
                               scale: float | None = None, return_mask: bool = False):
    """softmax(q k^T) v over the key blocks chosen per query block (top `budget` of pooled scores) after the keys and
    values are permuted within segments (module docstring). q (B, H, N_q, D), k and v (B, H, N_k, D).

    Returns the output (B, H, N_q, D) in q's order; with return_mask, also (permutation, mask over permuted keys)."""
    from .attention import block_sparse_attention  # noqa: PLC0415  (attention.py is the kernel's module)

    check_block_size(block_size)
    perm = pbs_key_permutation(q, k, segment_size)
    kp, vp = gather_keys(k, perm), gather_keys(v, perm)
    mask = dynamic_block_mask(q, kp, budget=budget, sink_blocks=sink_blocks, block_size=block_size, scale=scale)
    out = block_sparse_attention(q, kp, vp, mask, scale)
    return (out, perm, mask) if return_mask else out


def pbs_token_mask(mask, perm: torch.Tensor) -> torch.Tensor:
    """The token mask (B, H, N_q, N_k) in the original key order: query i sees key perm[j] iff the mask over the
    permuted keys allows (i, j). Materialises N_q x N_k: small sizes only (tests)."""
    permuted = mask.to_dense().expand(perm.shape[0], perm.shape[1], -1, -1)
    out = torch.zeros_like(permuted)
    out.scatter_(-1, perm[:, :, None, :].expand_as(permuted), permuted)
    return out
