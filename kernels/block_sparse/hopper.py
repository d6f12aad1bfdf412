"""Block-sparse attention for Hopper (sm_90) in Gluon: warp-specialised, FlashAttention-3's two overlaps.

Why a second kernel. The Triton kernel (attention.py) cannot overlap its softmax with the tensor cores: triton waits
on each wgmma right after issuing it, and the warpgroups of a tile run in step. Gluon exposes the asynchronous
wgmma, mbarriers and warp specialisation. One program is one 128-row query tile of one (batch, head), split by role
(`gl.warp_specialize`, 12 warps):

    loader          (4 warps, 24 registers): TMA of Q, then of the K and V tiles into STAGES-slot rings
    consumer 0 / 1  (4 warps, 240 registers each): query rows 0-63 / 64-127 of the tile

Each consumer overlaps within itself, per key tile t:

    S_t = Q K_t^T          (async wgmma)
    O  += P_{t-1} V_{t-1}  (async wgmma, issued right behind it)
    wait until S_t is done; softmax of S_t -> P_t     <- runs while the tensor cores compute P_{t-1} V_{t-1}
    wait until O is done;   O *= alpha_t

and the two consumers take turns on the tensor cores (ping-pong): one issues its two wgmmas and passes the turn
(an mbarrier), then computes its softmax while the other's wgmmas run. The turns only order the issues; results
do not depend on them.

Rings: slot j % STAGES has a `ready` mbarrier (the TMA's bytes landed) and an `empty` one (both consumers' wgmmas
that read it are done: two arrivals). The loader fills them in the order the consumers free them: K_0, then
(K_{j+1}, V_j). The mask's longest-first order assigns query tiles to programs. Partial tiles (the ragged end of
the keys, rule "none") are masked at the sequence end, without the P V overlap.

Measured on the H200 (benchmarks/results/block_sparse_attention_h200.json): 576-623 TFLOP/s on computed blocks at
N >= 32K, where dense SDPA reaches 564-569 and this kernel without warp specialisation reached 490-495.

Scope: rule "none" masks (random or structured tables) with block sizes that are multiples of 128, head dims 64
and 128, fp16 / bf16, inputs TMA can address (unit stride along D, 16-byte aligned strides). Everything else runs
through the Triton kernel. Gluon has no interpreter: this kernel is tested on the GPU
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
HALF_M = gl.constexpr(64)  # query rows per consumer warpgroup


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
def _load_tile(desc, ring, ready, empty, j, start, b, h, STAGES: gl.constexpr):
    """Wait until slot j % STAGES is free (phase: the ring's lap), then TMA tile j (first key `start`) into it."""
    slot = j % STAGES
    mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)  # a fresh mbarrier passes parity 1: first lap free
    mbarrier.expect(ready.index(slot), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [b, h, start, 0], ready.index(slot), ring.index(slot))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty,
            b, h, m0, n_full_tiles, total, full_idx, part_idx,
            MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """K_0, then (K_{j+1}, V_j) for each j: the order in which the consumers release the slots."""
    for w in gl.static_range(2):
        mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m0 + w * HALF_M, 0], q_bars.index(w), q_smem.index(w))
    start = _tile_start(0, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
    if total > 0:
        _load_tile(k_desc, k_ring, k_ready, k_empty, 0, start, b, h, STAGES)
    for j in range(total):
        next_start = _tile_start(j + 1, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        if j + 1 < total:
            _load_tile(k_desc, k_ring, k_ready, k_empty, j + 1, next_start, b, h, STAGES)
        _load_tile(v_desc, v_ring, v_ready, v_empty, j, start, b, h, STAGES)
        start = next_start


@gluon.jit
def _ready_tile(ring, ready, j, STAGES: gl.constexpr):
    """Wait for tile j's bytes; return its slot as a (BLOCK_N, HEAD_D) view."""
    slot = j % STAGES
    mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
    tile = ring.index(slot)
    return tile.reshape([tile.shape[2], tile.shape[3]])


@gluon.jit
def _take_turn(turns, turn, WG: gl.constexpr):
    """Wait until this consumer may issue (its `turn`-th time): consumer 0 goes first."""
    mbarrier.wait(turns.index(WG), (turn & 1) ^ (1 - WG))
    return turn + 1


@gluon.jit
def _pass_turn(turns, WG: gl.constexpr):
    mbarrier.arrive(turns.index(1 - WG), count=1)


@gluon.jit
def _consumer(q_smem, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, turns, o_desc,
              b, h, m0, n_k, n_full_tiles, total, full_idx, part_idx, qk_scale,
              MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr):
    """Rows WG * 64 ... WG * 64 + 63 of the query tile: the loop of the module docstring, with turns."""
    dtype: gl.constexpr = q_smem.dtype
    HEAD_D: gl.constexpr = q_smem.shape[4]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.wait(q_bars.index(WG), 0)
    q_tile = q_smem.index(WG)
    q = q_tile.reshape([HALF_M, HEAD_D])
    zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([HALF_M], gl.float32, s_rows)
    p = gl.zeros([HALF_M, BLOCK_N], dtype, p_layout)
    turn = 0

    # Full tiles, software-pipelined. Tile 0 has no P V to overlap with.
    if n_full_tiles > 0:
        k_t = _ready_tile(k_ring, k_ready, 0, STAGES)
        turn = _take_turn(turns, turn, WG)
        s = warpgroup_mma(q, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _pass_turn(turns, WG)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.max(s, axis=1) * qk_scale
        p32 = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p32, axis=1)
        p = gl.convert_layout(p32.to(dtype), p_layout)
    for t in range(1, n_full_tiles):
        k_t = _ready_tile(k_ring, k_ready, t, STAGES)
        v_prev = _ready_tile(v_ring, v_ready, t - 1, STAGES)
        turn = _take_turn(turns, turn, WG)
        s = warpgroup_mma(q, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_prev, acc, is_async=True)
        _pass_turn(turns, WG)
        s = warpgroup_mma_wait(1, deps=(s, ))  # S_t done; P V still running
        mbarrier.arrive(k_empty.index(t % STAGES), count=1)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p32 = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p32, axis=1)
        p_next = gl.convert_layout(p32.to(dtype), p_layout)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_empty.index((t - 1) % STAGES), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        p = p_next
        m_i = m_new
    if n_full_tiles > 0:
        v_prev = _ready_tile(v_ring, v_ready, n_full_tiles - 1, STAGES)
        turn = _take_turn(turns, turn, WG)
        acc = warpgroup_mma(p, v_prev, acc, is_async=True)
        _pass_turn(turns, WG)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_empty.index((n_full_tiles - 1) % STAGES), count=1)

    # Partial tiles (the ragged end): masked at the sequence end, one tile at a time.
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for t in range(n_full_tiles, total):
        start = _tile_start(t, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N)
        k_t = _ready_tile(k_ring, k_ready, t, STAGES)
        turn = _take_turn(turns, turn, WG)
        s = warpgroup_mma(q, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _pass_turn(turns, WG)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_empty.index(t % STAGES), count=1)
        s = gl.where(gl.expand_dims(start + offs_n < n_k, 0), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp2(-inf) = 0
        p32 = gl.exp2(s - gl.expand_dims(m_sub, 1))
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p32, axis=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        p = gl.convert_layout(p32.to(dtype), p_layout)
        v_t = _ready_tile(v_ring, v_ready, t, STAGES)
        turn = _take_turn(turns, turn, WG)
        acc = warpgroup_mma(p, v_t, acc, is_async=True)
        _pass_turn(turns, WG)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(t % STAGES), count=1)
        m_i = m_new

    l_o = gl.convert_layout(l_i, o_rows)
    out = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)  # rows that saw no key: zeros
    q.store(out.to(dtype))  # this consumer's Q rows are no longer read: their buffer stages O
    fence_async_shared()
    gl.thread_barrier()  # all four warps' rows are in shared memory before the copy engine reads them
    tma.async_copy_shared_to_global(o_desc, [b, h, m0 + WG * HALF_M, 0], q_tile)  # rows past n_q are clipped
    tma.store_wait(pendings=0)


@gluon.jit
def _block_sparse_attention_fwd_sm90(
    q_desc, k_desc, v_desc, o_desc,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, ORDER,
    stride_cb, stride_ch, stride_fb, stride_fh, stride_fm, stride_pb, stride_ph, stride_pm,
    n_q, n_k, num_heads, qk_scale,
    MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    HEAD_D: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_M: gl.constexpr = 2 * HALF_M
    SUBS: gl.constexpr = MASK_BLOCK // BLOCK_N

    n_tiles = gl.cdiv(n_q, BLOCK_M)
    program = gl.load(ORDER + gl.program_id(0))
    pid_m = program % n_tiles
    pid_bh = program // n_tiles
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    m0 = pid_m * BLOCK_M
    mask_row = m0 // MASK_BLOCK
    cnt = b * stride_cb + h * stride_ch + mask_row
    n_full_tiles = gl.load(FULL_CNT + cnt) * SUBS
    total = n_full_tiles + gl.load(PART_CNT + cnt) * SUBS
    full_idx = FULL_IDX + b * stride_fb + h * stride_fh + mask_row * stride_fm
    part_idx = PART_IDX + b * stride_pb + h * stride_ph + mask_row * stride_pm

    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    # (the argument tuples are written out in place: a tuple held in a variable loses its constexprs)
    gl.warp_specialize([
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty,
                   b, h, m0, n_full_tiles, total, full_idx, part_idx, MASK_BLOCK, BLOCK_N, STAGES)),
        (_consumer, (q_smem, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, turns, o_desc, b, h, m0,
                     n_k, n_full_tiles, total, full_idx, part_idx, qk_scale, MASK_BLOCK, BLOCK_N, STAGES, 0)),
        (_consumer, (q_smem, k_ring, v_ring, q_bars, k_ready, k_empty, v_ready, v_empty, turns, o_desc, b, h, m0,
                     n_k, n_full_tiles, total, full_idx, part_idx, qk_scale, MASK_BLOCK, BLOCK_N, STAGES, 1)),
    ], [4, 4], [240, 240])


TILES = ((128, 128, 12),)  # (block_m, block_n, num_warps): one 128 x 128 tile, loader + two consumer warpgroups
RING_STAGES = (2, 3)  # K / V ring depths that fit in shared memory beside Q (3: 224 KB)


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


def launch(q, k, v, out, mask: BlockSparseMask, scale: float, stages: int) -> None:
    """Run the kernel into `out` with `stages`-slot K / V rings (callers check `unsupported_reason` first)."""
    bsz, heads, n_q, _ = q.shape
    (block_m, block_n, _), = TILES
    order = mask.longest_first_order(bsz, heads, block_m)
    _block_sparse_attention_fwd_sm90[(order.numel(),)](  # Q and O move in halves: one per consumer
        _descriptor(q, HALF_M.value), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, HALF_M.value),
        mask.full_counts, mask.full_indices, mask.partial_counts, mask.partial_indices, order,
        *table_strides(mask.full_counts, bsz, heads)[:2], *table_strides(mask.full_indices, bsz, heads),
        *table_strides(mask.partial_indices, bsz, heads),
        n_q, k.shape[2], heads, scale * LOG2E,
        MASK_BLOCK=mask.block_size, BLOCK_N=block_n, STAGES=stages, num_warps=4, maxnreg=168,  # 4 loader + 8 consumer warps
    )
