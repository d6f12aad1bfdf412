"""PyTorch references for ReLU linear attention, in float math of a chosen dtype (float32 for the CPU fallback and the
GPU check, float64 in the tests).

Non-causal (SANA; SANA-Video with rotary embeddings on the numerator only, as SanaLinearAttnProcessor3_0):
    o_i = R(phi(q_i)) . S / (phi(q_i) . z + eps),   S = sum_j R(phi(k_j)) v_j^T,   z = sum_j phi(k_j),   phi = ReLU
Block-causal: the same with S and z summed over the current chunk and every earlier one; the chunk step carries
(S, z) from chunk to chunk. `block_causal_quadratic` computes the whole sequence at once through an explicit token
mask instead, so the tests compare the state recurrence with an independent formula.
"""

from __future__ import annotations

import torch

from .inputs import LinearAttentionState
from .rotary import RotaryTables, rotate_pairs_reference

CHUNK = 4096  # tokens per step: bounds the float32 temporaries at long sequence lengths


def _features(x: torch.Tensor, rotary: RotaryTables | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(x) for the normaliser and R(phi(x)) for the numerator."""
    phi = torch.relu(x.to(dtype))
    return phi, (phi if rotary is None else rotate_pairs_reference(phi, rotary))


def _rows(tables: RotaryTables | None, start: int, stop: int) -> RotaryTables | None:
    return None if tables is None else RotaryTables(tables.cos[start:stop], tables.sin[start:stop])


def summarise(
    k: torch.Tensor, v: torch.Tensor, rotary: RotaryTables | None = None,
    prior: LinearAttentionState | None = None, dtype: torch.dtype = torch.float32,
) -> LinearAttentionState:
    """(S, z) of k, v (B, H, N, D), added to `prior`; in `dtype`."""
    b, h, n, d = k.shape
    kv = k.new_zeros(b, h, d, d, dtype=dtype) if prior is None else prior.kv.to(dtype).clone()
    k_sum = k.new_zeros(b, h, d, dtype=dtype) if prior is None else prior.k_sum.to(dtype).clone()
    for start in range(0, n, CHUNK):
        phi, rotated = _features(k[:, :, start : start + CHUNK], _rows(rotary, start, start + CHUNK), dtype)
        kv += rotated.transpose(-1, -2) @ v[:, :, start : start + CHUNK].to(dtype)
        k_sum += phi.sum(dim=-2)
    return LinearAttentionState(kv, k_sum)


def attend(
    q: torch.Tensor, state: LinearAttentionState, rotary: RotaryTables | None = None, eps: float = 1e-15,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Queries q (B, H, N, D) against a state; output in `dtype`."""
    kv, k_sum = state.kv.to(dtype), state.k_sum.to(dtype)
    out = []
    for start in range(0, q.shape[2], CHUNK):
        phi, rotated = _features(q[:, :, start : start + CHUNK], _rows(rotary, start, start + CHUNK), dtype)
        out.append((rotated @ kv) / ((phi @ k_sum.unsqueeze(-1)) + eps))
    return torch.cat(out, dim=2) if out else q.new_empty(q.shape, dtype=dtype)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15, rotary: RotaryTables | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return attend(q, summarise(k, v, rotary, dtype=dtype), rotary, eps, dtype)


def block_causal_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState | None = None,
    eps: float = 1e-15, rotary: RotaryTables | None = None, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, LinearAttentionState]:
    new_state = summarise(k, v, rotary, state, dtype)
    return attend(q, new_state, rotary, eps, dtype), new_state


def block_causal_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_sizes: list[int], eps: float = 1e-15,
    rotary: RotaryTables | None = None, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Whole sequence, token by token: query i sees key j iff j's chunk is not after i's. O(N^2): small N only."""
    n = q.shape[2]
    if sum(chunk_sizes) != n:
        raise ValueError(f"chunk sizes {chunk_sizes} do not add up to the {n} tokens")
    chunk_of = torch.repeat_interleave(torch.arange(len(chunk_sizes)), torch.tensor(chunk_sizes)).to(q.device)
    visible = (chunk_of[None, :] <= chunk_of[:, None]).to(dtype)
    phi_q, rot_q = _features(q, rotary, dtype)
    phi_k, rot_k = _features(k, rotary, dtype)
    numerator = ((rot_q @ rot_k.transpose(-1, -2)) * visible) @ v.to(dtype)
    denominator = ((phi_q @ phi_k.transpose(-1, -2)) * visible).sum(-1, keepdim=True)
    return numerator / (denominator + eps)
