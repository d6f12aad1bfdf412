"""Block-sparse attention for Hopper (sm_90) in Gluon, with FlashAttention-3's softmax / tensor-core overlap.

Why a second kernel. The Triton kernel (attention.py) cannot overlap its softmax with the tensor cores: triton waits
on each wgmma right after issuing it. Gluon exposes the asynchronous wgmma and its wait, so here, per key tile t,

    S_t = Q K_t^T          (async wgmma)
    O  += P_{t-1} V_{t-1}  (async wgmma, issued right behind it)
    wait until S_t is done; softmax of S_t -> P_t     <- runs while the tensor cores compute P_{t-1} V_{t-1}
    wait until O is done;   O *= alpha_t

K and V tiles arrive by TMA into two-slot rings, each slot with its mbarrier; a slot is refilled (tile t + 2) as
soon as every warpgroup has finished the wgmma that read it. One program is one BLOCK_M-row query tile of one
(batch, head), launched in the mask's longest-first order: 128 x 128 tiles with 8 warps (two warpgroups of 64
rows), or 64 x 64 tiles with 4 warps, two programs per multiprocessor (short sequences: more, shorter programs).

Measured on the H200 (benchmarks/results/block_sparse_attention_h200.json): 490-495 TFLOP/s on computed blocks at
N >= 32K, where the Triton kernel reaches 460-470. Q K^T itself still overlaps nothing; hiding it too needs two
warpgroups taking turns on the tensor cores (FlashAttention-3's ping-pong, with warp specialisation).

Scope: rule "none" masks (random or structured tables; the ragged last key block is a partial block, masked at the
sequence end), head dims 64 and 128, fp16 / bf16, inputs TMA can address (unit stride along D, 16-byte aligned
strides). Everything else runs through the Triton kernel. Gluon has no interpreter: this kernel is tested on the GPU
(benchmarks/block_sparse_attention_gpu.py checks it against SDPA and a float32 reference).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .mask import BlockSparseMask, table_strides

LOG2E = 1.4426950408889634


@gluon.jit
def _tile_start(j, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of the j-th key tile of this program: the full list's tiles, then the partial list's."""
    SUBS: gl.constexpr = MASK_BLOCK // BLOCK_N
    j = gl.maximum(gl.minimum(j, total - 1), 0)  # prefetches past the end read a valid entry (copies skipped)
    if j < n_full_tiles:
        blk = gl.load(full_idx + j // SUBS)
        sub = j % SUBS
    else:
        blk = gl.load(part_idx + (j - n_full_tiles) // SUBS)
        sub = (j - n_full_tiles) % SUBS
    return blk * MASK_BLOCK + sub * BLOCK_N


@gluon.jit
def _fill_slot(desc, ring, bars, j, start, total, b, h):
    """TMA tile j (first key `start`) into slot j % 2 of `ring`; its mbarrier flips when the bytes have landed."""
    if j < total:
        bar = bars.index(j % 2)
        mbarrier.expect(bar, desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [b, h, start, 0], bar, ring.index(j % 2))


@gluon.jit
def _slot(ring, bars, j, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr):
    """Wait for tile j and return it as a (BLOCK_N, HEAD_D) shared-memory view."""
    mbarrier.wait(bars.index(j % 2), (j // 2) & 1)
    return ring.index(j % 2).reshape([BLOCK_N, HEAD_D])


@gluon.jit
def _block_sparse_attention_fwd_sm90(
    q_desc, k_desc, v_desc, o_desc,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, ORDER,
    stride_cb, stride_ch, stride_fb, stride_fh, stride_fm, stride_pb, stride_ph, stride_pm,
    n_q, n_k, num_heads, qk_scale,
    MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
    num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    SUBS: gl.constexpr = MASK_BLOCK // BLOCK_N
    # wgmma layouts: warps stacked along the rows (16 rows each); S is BLOCK_M x BLOCK_N, O is BLOCK_M x HEAD_D.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    n_tiles = gl.cdiv(n_q, BLOCK_M)
    program = gl.load(ORDER + gl.program_id(0))
    pid_m = program % n_tiles
    pid_bh = program // n_tiles
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    mask_row = (pid_m * BLOCK_M) // MASK_BLOCK
    cnt = b * stride_cb + h * stride_ch + mask_row
    n_full_tiles = gl.load(FULL_CNT + cnt) * SUBS
    total = n_full_tiles + gl.load(PART_CNT + cnt) * SUBS
    full_idx = FULL_IDX + b * stride_fb + h * stride_fh + mask_row * stride_fm
    part_idx = PART_IDX + b * stride_pb + h * stride_ph + mask_row * stride_pm

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, pid_m * BLOCK_M, 0], q_bar, q_smem)
    for j in gl.static_range(2):
        start = _tile_start(j, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        _fill_slot(k_desc, k_ring, k_bars, j, start, total, b, h)
        _fill_slot(v_desc, v_ring, v_bars, j, start, total, b, h)
    mbarrier.wait(q_bar, 0)
    q = q_smem.reshape([BLOCK_M, HEAD_D])

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, s_rows)
    p = gl.zeros([BLOCK_M, BLOCK_N], dtype, p_layout)  # defined even when there are no full tiles

    # Full tiles, software-pipelined (module docstring). Tile 0 has no P V to overlap with.
    if n_full_tiles > 0:
        next_start = _tile_start(2, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        s = warpgroup_mma(q, _slot(k_ring, k_bars, 0, BLOCK_N, HEAD_D).permute((1, 0)), zero_s, use_acc=False)
        gl.thread_barrier()  # both warpgroups are done reading K slot 0
        _fill_slot(k_desc, k_ring, k_bars, 2, next_start, total, b, h)
        m_i = gl.max(s, axis=1) * qk_scale
        p32 = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p32, axis=1)
        p = gl.convert_layout(p32.to(dtype), p_layout)
    for t in range(1, n_full_tiles):
        k_next = _tile_start(t + 2, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        v_next = _tile_start(t + 1, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        s = warpgroup_mma(q, _slot(k_ring, k_bars, t, BLOCK_N, HEAD_D).permute((1, 0)), zero_s,
                          use_acc=False, is_async=True)
        acc = warpgroup_mma(p, _slot(v_ring, v_bars, t - 1, BLOCK_N, HEAD_D), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # S_t done (wgmma groups retire in order); P V still running
        gl.thread_barrier()  # both warpgroups are past S_t: K slot t % 2 may be refilled
        _fill_slot(k_desc, k_ring, k_bars, t + 2, k_next, total, b, h)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p32 = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p32, axis=1)
        p_next = gl.convert_layout(p32.to(dtype), p_layout)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        gl.thread_barrier()  # both warpgroups are past P_{t-1} V_{t-1}: V slot (t - 1) % 2 may be refilled
        _fill_slot(v_desc, v_ring, v_bars, t + 1, v_next, total, b, h)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        p = p_next
        m_i = m_new
    if n_full_tiles > 0:
        v_next = _tile_start(n_full_tiles + 1, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        acc = warpgroup_mma(p, _slot(v_ring, v_bars, n_full_tiles - 1, BLOCK_N, HEAD_D), acc)
        gl.thread_barrier()
        _fill_slot(v_desc, v_ring, v_bars, n_full_tiles + 1, v_next, total, b, h)

    # Partial tiles (the ragged end): masked at the sequence end, one tile at a time.
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for t in range(n_full_tiles, total):
        start = _tile_start(t, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        next_start = _tile_start(t + 2, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        s = warpgroup_mma(q, _slot(k_ring, k_bars, t, BLOCK_N, HEAD_D).permute((1, 0)), zero_s, use_acc=False)
        gl.thread_barrier()
        _fill_slot(k_desc, k_ring, k_bars, t + 2, next_start, total, b, h)
        s = gl.where(gl.expand_dims(start + offs_n < n_k, 0), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp2(-inf) = 0
        p32 = gl.exp2(s - gl.expand_dims(m_sub, 1))
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p32, axis=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        p = gl.convert_layout(p32.to(dtype), p_layout)
        acc = warpgroup_mma(p, _slot(v_ring, v_bars, t, BLOCK_N, HEAD_D), acc)
        gl.thread_barrier()
        _fill_slot(v_desc, v_ring, v_bars, t + 2, next_start, total, b, h)
        m_i = m_new

    for i in gl.static_range(2):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    mbarrier.invalidate(q_bar)
    l_o = gl.convert_layout(l_i, o_rows)
    out = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)  # rows that saw no key: zeros
    q_smem.reshape([BLOCK_M, HEAD_D]).store(out.to(dtype))  # Q is no longer read: its buffer stages O
    fence_async_shared()
    gl.thread_barrier()  # every warp's rows are in shared memory before the copy engine reads them
    tma.async_copy_shared_to_global(o_desc, [b, h, pid_m * BLOCK_M, 0], q_smem)  # rows past n_q are clipped
    tma.store_wait(pendings=0)


TILES = ((128, 128, 8), (64, 64, 4))  # (block_m, block_n, num_warps) this kernel is built and measured for


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                       mask: BlockSparseMask) -> str | None:
    """Why this kernel cannot take the call, or None: it needs sm_90, rule "none", D in (64, 128) and tensors the
    copy engine can address (out=None: a new contiguous output)."""
    if q.device.type != "cuda" or _capability(q.device)[0] != 9:
        return f"it runs on sm_90 GPUs only (got {q.device})"
    if mask.rule != "none":
        return f"it has no token rules (the mask's rule is {mask.rule!r})"
    if q.shape[-1] not in (64, 128):
        return f"it takes head dims 64 and 128 (got {q.shape[-1]})"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        # TMA: unit stride along D, 16-byte aligned base and strides; no broadcast (stride 0) dims
        aligned = t is None or t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(
            st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:3])
        if not aligned:
            return f"{name} is not TMA-addressable (strides {t.stride()}: need unit stride along D, 16-byte aligned ones)"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple[int, ...], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    block = (1, 1, rows, t.shape[3])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), _smem_layout(block, t.dtype))


def launch(q, k, v, out, mask: BlockSparseMask, scale: float, block_m: int, block_n: int, num_warps: int) -> None:
    """Run the kernel into `out` with one of TILES (callers check `unsupported_reason` first)."""
    bsz, heads, n_q, _ = q.shape
    order = mask.longest_first_order(bsz, heads, block_m)
    _block_sparse_attention_fwd_sm90[(order.numel(),)](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m),
        mask.full_counts, mask.full_indices, mask.partial_counts, mask.partial_indices, order,
        *table_strides(mask.full_counts, bsz, heads)[:2], *table_strides(mask.full_indices, bsz, heads),
        *table_strides(mask.partial_indices, bsz, heads),
        n_q, k.shape[2], heads, scale * LOG2E,
        MASK_BLOCK=mask.block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=q.shape[3], num_warps=num_warps,
    )
