"""Kernel 1 of 2: summarise keys and values into the linear-attention state.

    S[d, e] += sum_j R(phi(k_j))[d] v_j[e]     z[d] += sum_j phi(k_j)[d]      (phi = ReLU, R = optional RoPE)

Reference: `naive.summarise`. Tiling: grid (B*H, SPLITS). Program (bh, s) walks the tokens [s*SPAN, (s+1)*SPAN) of one
head in tiles of BLOCK_N tokens x D_PAD channels (D padded to a power of two, >= 32 so tensor-core dots have every side
>= 16) and accumulates the D_PAD x D_PAD outer-product sum in float32 registers, one tensor-core dot per tile
(K = BLOCK_N). It accumulates S transposed, S^T += v^T R(phi(k)): v^T is then read straight from the swizzled
shared-memory copy of the v tile, and phi(k), which passes through registers anyway (ReLU, RoPE, the sum z), is the
operand written back to shared memory. (A first version accumulated S itself, so its dot read phi(k) column-wise
from an unswizzled buffer; with one 8-warp configuration it moved k and v at 35% of the H200's copy bandwidth,
against 58% for this one with the configurations below.)

Splitting the tokens is what fills the GPU when B*H is small (16 heads, 132 SMs); each split writes its own partial
state and the launcher adds them up: a deterministic reduction, no atomics. Split 0 starts from the prior state, so
a block-causal chunk step costs no extra pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import LinearAttentionState
from .launch import grid_split, launch, pad_dim, prune_fp32, state_dot
from .rotary import RotaryTables, load_tables, rotate_pairs

# Tuned on first use for 16-bit inputs. For D = 128 the 4-warp programs (a 128 x 128 float32 accumulator is 128
# registers a thread) fit two an SM, the 8-warp ones move more bytes per step. float32 inputs (3-pass TF32 dots,
# twice the bytes a tile) take the last one alone (prune_fp32).
CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),  # float32
]


@triton.jit
def _chunk_state_kernel(
    K, V, COS, SIN, PRIOR_KV, PRIOR_KSUM, KV_PART, KSUM_PART,
    H, N, SPAN,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, HAS_PRIOR: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < D
    tile = tl.arange(0, BLOCK_N)
    state_mask = col_ok[:, None] & col_ok[None, :]
    transposed = cols[None, :] * D + cols[:, None]  # accumulator element [e, d] is S[d, e]

    # Split 0 carries the prior state; the others start from zero (the masked loads give the zeros).
    carry = HAS_PRIOR & (split == 0)
    acc = tl.load(PRIOR_KV + bh.to(tl.int64) * D * D + transposed, mask=state_mask & carry, other=0.0)
    k_sum = tl.load(PRIOR_KSUM + bh.to(tl.int64) * D + cols, mask=col_ok & carry, other=0.0)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    start = split * SPAN
    end = tl.minimum(start + SPAN, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tile
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + cols[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + cols[None, :] * stride_vd, mask=mask, other=0.0)
        # ReLU in the input dtype, NaN kept as torch.relu keeps it (a NaN fails `k < 0`; `k > 0 ? k : 0` and
        # tl.maximum would turn it into 0 and hide a broken input); padding loads as 0 and adds nothing.
        k = tl.where(k < 0, 0.0, k)
        k_sum += tl.sum(k.to(tl.float32), axis=0)
        if ROPE:
            cos, sin = load_tables(COS, SIN, rows, row_ok, D, D_PAD)
            # Rounded back to the input dtype, as diffusers rounds its rotated keys, so the dot stays 16-bit.
            k = rotate_pairs(k.to(tl.float32), cos, sin, BLOCK_N, D_PAD).to(K.dtype.element_ty)
        if DOT_FP32:  # fp32 inputs, or the interpreter (whose bf16 dot is broken): exact float32 products
            acc = tl.dot(tl.trans(v.to(tl.float32)), k.to(tl.float32), acc, input_precision=PRECISION)
        else:  # 16-bit products are exact in the float32 accumulator
            acc = tl.dot(tl.trans(v), k, acc)

    part = bh.to(tl.int64) * tl.num_programs(1) + split
    tl.store(KV_PART + part * D * D + transposed, acc, mask=state_mask)
    tl.store(KSUM_PART + part * D + cols, k_sum, mask=col_ok)


_tuned_chunk_state_kernel = triton.autotune(
    CONFIGS, key=["D_PAD", "ROPE"], prune_configs_by={"early_config_prune": prune_fp32}
)(_chunk_state_kernel)


def _alloc(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Partial-state workspace (a seam for the tests, which poison it)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def chunk_state(
    k: torch.Tensor, v: torch.Tensor, rotary: RotaryTables | None = None, prior: LinearAttentionState | None = None,
) -> LinearAttentionState:
    """The state of k, v (B, H, N, D), plus `prior` if given. Inputs are checked by the caller."""
    b, h, n, d = k.shape
    # Each split's D x D float32 partial is written and read back once: 8 D^2 bytes, 2 D tokens of bf16 k and v.
    splits, span = grid_split(n, b * h, k.device, overhead=2 * d)
    kv_part = _alloc((b * h, splits, d, d), k.device)
    ksum_part = _alloc((b * h, splits, d), k.device)
    cos, sin = rotary if rotary is not None else (kv_part, kv_part)  # unused pointers when ROPE is off
    prior_kv, prior_ksum = prior if prior is not None else (kv_part, ksum_part)
    dot_fp32, precision = state_dot(k.dtype, _chunk_state_kernel)
    launch(
        _chunk_state_kernel, _tuned_chunk_state_kernel, (b * h, splits),
        k, v, cos, sin, prior_kv, prior_ksum, kv_part, ksum_part, h, n, span, *k.stride(), *v.stride(),
        D=d, D_PAD=pad_dim(d), ROPE=rotary is not None, HAS_PRIOR=prior is not None,
        DOT_FP32=dot_fp32, PRECISION=precision,
    )
    if splits == 1:
        return LinearAttentionState(kv_part.view(b, h, d, d), ksum_part.view(b, h, d))
    return LinearAttentionState(kv_part.sum(1).view(b, h, d, d), ksum_part.sum(1).view(b, h, d))
