"""Backward of block-sparse attention, step 2 of 3: dK and dV, walking the query blocks that see each key block.

Tiling (FlashAttention-2's dK / dV loop, in the transposed form of Triton's fused-attention tutorial). One program
owns a BLOCK_N x D tile of dK and of dV for one (batch, head): its K and V tiles stay on chip while it walks the
query blocks that the mask lets see its key block, BLOCK_M query rows at a time. Those come from the transposed
lists (`BlockSparseMask.query_lists`, built once per mask): for key block j, the query blocks i with (i, j) listed
in the forward, split into full and partial as there. Per step, with the per-row lse (forward) and delta
(backward_preprocess.py) of those query rows:

    S^T  = K Q^T                              (BLOCK_N x BLOCK_M, tensor cores)
    P^T  = exp2(S^T * scale * log2 e - lse)   (recomputed from the forward's log-sum-exp)
    dV  += P^T dO
    dP^T = V dO^T
    dS^T = P^T * (dP^T - delta)
    dK  += dS^T Q                              (fp32 accumulators; dK scaled by `scale` once at the end)

Full blocks run with no masking at all; partial ones apply the mask's token rule (interval [lo, hi) of each query
row, or the 3-D window with global tokens), transposed, and the query sequence end. The transposed lists make the
ragged last query block partial, so full blocks never read past N_q. Each program writes its whole tile: a key block
that no query sees gets dK = dV = 0. No atomics: every dK / dV element has one writer (deterministic).

The mask's block size (MASK_BLOCK) is the unit of the lists; BLOCK_M and BLOCK_N divide it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import LOG2E, _in_window
from .mask import RULES, table_strides


@triton.jit
def _token_allowed_t(rows, kc, cols, Q_AUX, n_q, rf, rh, rw, RULE: tl.constexpr):
    """Which (key, query) pairs of a partial BLOCK_N x BLOCK_M tile are allowed: the transpose of the forward's
    `_token_allowed` (keys along dim 0). rows: query rows; kc: the keys' packed coordinates (box3d)."""
    row_ok = rows < n_q
    if RULE == 1:  # interval lo <= j < hi of each query row: one unsigned compare
        lo = tl.load(Q_AUX + 2 * rows, mask=row_ok, other=0)
        hi = tl.load(Q_AUX + 2 * rows + 1, mask=row_ok, other=0)
        allowed = (cols[:, None] - lo[None, :]).to(tl.uint32) < (hi - lo).to(tl.uint32)[None, :]
    elif RULE == 2:  # box3d: |dq| <= r on every axis is symmetric, so the forward's window test works transposed
        qc = tl.load(Q_AUX + rows, mask=row_ok, other=0)
        near = _in_window(kc >> 20, qc >> 20, rf)
        near = near & _in_window((kc >> 10) & 1023, (qc >> 10) & 1023, rh)
        near = near & _in_window(kc & 1023, qc & 1023, rw)
        allowed = near | ((kc < 0)[:, None] | (qc < 0)[None, :])
    else:
        allowed = (cols >= 0)[:, None]
    return allowed & row_ok[None, :]


@triton.jit
def _load_rows(base, rows, stride_n, stride_d, offs_d, d_ok, n, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A BLOCK_M x BLOCK_D tile of Q or dO: rows past n (partial blocks only) and columns past the head dim read 0."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASKED:
        tile = tl.load(ptrs, mask=(rows < n)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _dkdv_over_listed(
    dk, dv, k, v, kc, cols, q_base, do_base, lse_row, delta_row, stride_qn, stride_qd, stride_don, stride_dod,
    idx_ptr, count, offs_m, offs_d, d_ok, Q_AUX, n_q, rf, rh, rw, qk_scale,
    MASKED: tl.constexpr, RULE: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dK, dV of one key tile accumulated over `count` listed query blocks (BLOCK_M rows per step)."""
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_M  # kernel tiles per mask block
    for t in range(0, count * SUBS):
        blk = tl.load(idx_ptr + t // SUBS)
        rows = blk * MASK_BLOCK + (t % SUBS) * BLOCK_M + offs_m
        q = _load_rows(q_base, rows, stride_qn, stride_qd, offs_d, d_ok, n_q, MASKED, EVEN_D)
        do = _load_rows(do_base, rows, stride_don, stride_dod, offs_d, d_ok, n_q, MASKED, EVEN_D)
        if MASKED:  # past n_q: lse = +inf gives P = 0
            lse = tl.load(lse_row + rows, mask=rows < n_q, other=float("inf"))
            delta = tl.load(delta_row + rows, mask=rows < n_q, other=0.0)
        else:
            lse = tl.load(lse_row + rows)
            delta = tl.load(delta_row + rows)
        in_dtype = q.dtype
        if DOT_F32:  # the interpreter's bf16 dot is wrong: exact fp32 on upcast operands instead
            q, do = q.to(tl.float32), do.to(tl.float32)
        qk_t = tl.dot(k, tl.trans(q))
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(_token_allowed_t(rows, kc, cols, Q_AUX, n_q, rf, rh, rw, RULE), p_t, 0.0)
        p_in = p_t.to(in_dtype)  # P^T dO and dS^T Q in the input precision, as on the GPU
        if DOT_F32:
            p_in = p_in.to(tl.float32)
        dv = tl.dot(p_in, do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(in_dtype)
        if DOT_F32:
            ds_t = ds_t.to(tl.float32)
        dk = tl.dot(ds_t, q, dk)
    return dk, dv


@triton.jit(
    do_not_specialize=[
        "stride_cb", "stride_ch", "stride_fb", "stride_fh", "stride_fm", "stride_pb", "stride_ph", "stride_pm",
        "rf", "rh", "rw", "n_q", "n_k", "head_dim", "num_heads",
    ]
)
def _block_sparse_attention_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,  # the transposed lists: query blocks per key block
    stride_cb, stride_ch,  # counts (B', H', Mk): 0 on broadcast dims
    stride_fb, stride_fh, stride_fm,  # full-block indices (B', H', Mk, W_full)
    stride_pb, stride_ph, stride_pm,  # partial-block indices (B', H', Mk, W_partial)
    Q_AUX, K_AUX, rf, rh, rw,
    n_q, n_k, head_dim, num_heads, qk_scale, sm_scale,
    RULE: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    mask_col = (pid_n * BLOCK_N) // MASK_BLOCK

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col_ok = cols < n_k
    tile_ok = col_ok[:, None] & d_ok[None, :]

    # The key-side tiles, loaded once (rows past n_k read 0; their gradients are not stored).
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=tile_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=tile_ok, other=0.0)
    if DOT_F32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    if RULE == 2:
        kc = tl.load(K_AUX + cols, mask=col_ok, other=0)
    else:
        kc = tl.zeros([BLOCK_N], dtype=tl.int32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_row = LSE + pid_bh.to(tl.int64) * n_q
    delta_row = DELTA + pid_bh.to(tl.int64) * n_q

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cnt_off = b * stride_cb + h * stride_ch + mask_col
    n_full = tl.load(FULL_CNT + cnt_off)
    dk, dv = _dkdv_over_listed(
        dk, dv, k, v, kc, cols, q_base, do_base, lse_row, delta_row, stride_qn, stride_qd, stride_don, stride_dod,
        FULL_IDX + b * stride_fb + h * stride_fh + mask_col * stride_fm, n_full, offs_m, offs_d, d_ok,
        Q_AUX, n_q, rf, rh, rw, qk_scale, False, RULE, MASK_BLOCK, BLOCK_M, EVEN_D, DOT_F32,
    )
    n_part = tl.load(PART_CNT + cnt_off)
    dk, dv = _dkdv_over_listed(
        dk, dv, k, v, kc, cols, q_base, do_base, lse_row, delta_row, stride_qn, stride_qd, stride_don, stride_dod,
        PART_IDX + b * stride_pb + h * stride_ph + mask_col * stride_pm, n_part, offs_m, offs_d, d_ok,
        Q_AUX, n_q, rf, rh, rw, qk_scale, True, RULE, MASK_BLOCK, BLOCK_M, EVEN_D, DOT_F32,
    )

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_ok)


def launch_dkdv(q, k, v, do, dk, dv, lse, delta, mask, scale: float, block_m: int, block_n: int, num_warps: int,
                num_stages: int, dot_f32: bool) -> None:
    """dk, dv <- dK, dV (any strides); lse and delta (B, H, N_q) fp32 contiguous, lse in the forward's log2 units."""
    bsz, heads, n_q, dim = q.shape
    block_d = max(16, triton.next_power_of_2(dim))
    full_counts, full_indices, partial_counts, partial_indices = mask.query_lists
    q_aux = mask.q_aux if mask.q_aux is not None else full_counts  # unused for rule "none"
    k_aux = mask.k_aux if mask.k_aux is not None else full_counts
    _block_sparse_attention_bwd_dkdv[(triton.cdiv(k.shape[2], block_n), bsz * heads)](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        full_counts, full_indices, partial_counts, partial_indices,
        *table_strides(full_counts, bsz, heads)[:2],
        *table_strides(full_indices, bsz, heads), *table_strides(partial_indices, bsz, heads),
        q_aux, k_aux, *mask.radius,
        n_q, k.shape[2], dim, heads, scale * LOG2E, scale,
        RULE=RULES.index(mask.rule), MASK_BLOCK=mask.block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, EVEN_D=block_d == dim, DOT_F32=dot_f32, num_warps=num_warps, num_stages=num_stages,
    )
