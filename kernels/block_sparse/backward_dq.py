"""Backward of block-sparse attention, step 3 of 3: dQ, walking the key blocks each query block sees.

Tiling (FlashAttention-2's dQ loop). One program owns a BLOCK_M x D tile of dQ for one (batch, head): its Q and dO
tiles, and the per-row log-sum-exp (from the forward) and delta (backward_preprocess.py), stay on chip while it
walks the key blocks listed for its query block in the forward's lists (mask.py), BLOCK_N keys at a time:

    S  = Q K^T                          (BLOCK_M x BLOCK_N, tensor cores)
    P  = exp2(S * scale * log2 e - lse) (the forward's probabilities, recomputed: nothing N x N is stored)
    dP = dO V^T
    dS = P * (dP - delta)
    dQ += dS K                          (fp32 accumulator; scaled by `scale` once at the end)

Like the forward, two loops: the "full" key blocks with no masking at all, then the "partial" ones, where the
mask's token rule and the key sequence end set P to 0. Rows that saw no key have lse = +inf (the forward stores
it so), so their P is 0 everywhere and their dQ is 0. Each program writes its whole tile, so dQ needs no zeroing and
no atomics (deterministic). Key blocks never listed for a query block are never read.

The mask's block size (MASK_BLOCK) is the unit of the lists; BLOCK_M and BLOCK_N divide it. Head dims that are not a
power of two are padded to BLOCK_D with masked loads (zeros).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import LOG2E, _load_kv_tile, _token_allowed
from .mask import RULES, table_strides


@triton.jit
def _dq_over_listed(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    idx_ptr, count, offs_n, offs_d, d_ok, qa, qb, K_AUX, n_k, rf, rh, rw, qk_scale,
    MASKED: tl.constexpr, RULE: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dQ of one query tile accumulated over `count` listed key blocks (BLOCK_N keys per step)."""
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N  # kernel tiles per mask block
    for t in range(0, count * SUBS):
        blk = tl.load(idx_ptr + t // SUBS)
        start = blk * MASK_BLOCK + (t % SUBS) * BLOCK_N
        cols = start + offs_n
        k = _load_kv_tile(k_base, None, 0, 0, start, cols, stride_kn, stride_kd, offs_d, d_ok, n_k,
                          MASKED, EVEN_D, False, BLOCK_N, BLOCK_D)
        v = _load_kv_tile(v_base, None, 0, 0, start, cols, stride_vn, stride_vd, offs_d, d_ok, n_k,
                          MASKED, EVEN_D, False, BLOCK_N, BLOCK_D)
        in_dtype = k.dtype
        if DOT_F32:  # the interpreter's bf16 dot is wrong: exact fp32 on upcast operands instead
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_token_allowed(qa, qb, K_AUX, cols, n_k, rf, rh, rw, RULE), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(in_dtype)  # dS K in the input precision, as on the GPU
        if DOT_F32:
            ds = ds.to(tl.float32)
        dq = tl.dot(ds, k, dq)
    return dq


@triton.jit(
    do_not_specialize=[
        "stride_cb", "stride_ch", "stride_fb", "stride_fh", "stride_fm", "stride_pb", "stride_ph", "stride_pm",
        "rf", "rh", "rw", "n_q", "n_k", "head_dim", "num_heads",
    ]
)
def _block_sparse_attention_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    stride_cb, stride_ch,  # counts (B', H', Mq): 0 on broadcast dims
    stride_fb, stride_fh, stride_fm,  # full-block indices (B', H', Mq, W_full)
    stride_pb, stride_ph, stride_pm,  # partial-block indices (B', H', Mq, W_partial)
    Q_AUX, K_AUX, rf, rh, rw,
    n_q, n_k, head_dim, num_heads, qk_scale, sm_scale,
    RULE: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    mask_row = (pid_m * BLOCK_M) // MASK_BLOCK

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < n_q
    tile_ok = row_ok[:, None] & d_ok[None, :]

    # The query-side tiles, loaded once: Q, dO, and per row the forward's lse (+inf past n_q: P = 0) and delta.
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=tile_ok, other=0.0)
    if DOT_F32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * n_q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * n_q + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    # Per-row data of the token rule, as in the forward.
    if RULE == 1:
        qa = tl.load(Q_AUX + 2 * rows, mask=row_ok, other=0)
        qb = tl.load(Q_AUX + 2 * rows + 1, mask=row_ok, other=0)
    elif RULE == 2:
        qa = tl.load(Q_AUX + rows, mask=row_ok, other=0)
        qb = qa
    else:
        qa = tl.zeros([BLOCK_M], dtype=tl.int32)
        qb = qa

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt_off = b * stride_cb + h * stride_ch + mask_row
    n_full = tl.load(FULL_CNT + cnt_off)
    dq = _dq_over_listed(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        FULL_IDX + b * stride_fb + h * stride_fh + mask_row * stride_fm, n_full, offs_n, offs_d, d_ok,
        qa, qb, K_AUX, n_k, rf, rh, rw, qk_scale, False, RULE, MASK_BLOCK, BLOCK_N, BLOCK_D, EVEN_D, DOT_F32,
    )
    n_part = tl.load(PART_CNT + cnt_off)
    dq = _dq_over_listed(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        PART_IDX + b * stride_pb + h * stride_ph + mask_row * stride_pm, n_part, offs_n, offs_d, d_ok,
        qa, qb, K_AUX, n_k, rf, rh, rw, qk_scale, True, RULE, MASK_BLOCK, BLOCK_N, BLOCK_D, EVEN_D, DOT_F32,
    )

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


def launch_dq(q, k, v, do, dq, lse, delta, mask, scale: float, block_m: int, block_n: int, num_warps: int,
              num_stages: int, dot_f32: bool) -> None:
    """dq <- dQ (any strides); lse and delta (B, H, N_q) fp32 contiguous, lse in the forward's log2 units."""
    bsz, heads, n_q, dim = q.shape
    block_d = max(16, triton.next_power_of_2(dim))
    q_aux = mask.q_aux if mask.q_aux is not None else mask.full_counts  # unused for rule "none"
    k_aux = mask.k_aux if mask.k_aux is not None else mask.full_counts
    _block_sparse_attention_bwd_dq[(triton.cdiv(n_q, block_m), bsz * heads)](
        q, k, v, do, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        mask.full_counts, mask.full_indices, mask.partial_counts, mask.partial_indices,
        *table_strides(mask.full_counts, bsz, heads)[:2],
        *table_strides(mask.full_indices, bsz, heads), *table_strides(mask.partial_indices, bsz, heads),
        q_aux, k_aux, *mask.radius,
        n_q, k.shape[2], dim, heads, scale * LOG2E, scale,
        RULE=RULES.index(mask.rule), MASK_BLOCK=mask.block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, EVEN_D=block_d == dim, DOT_F32=dot_f32, num_warps=num_warps, num_stages=num_stages,
    )
