"""Dynamic block masks: which key blocks each query block attends to, chosen from the current q and k on the GPU.

The way SVG2 / XAttention / VSA-style methods work: a new mask per layer and step, from pooled block scores. Here:

    qp, kp = mean of each block of q and k              (block_pool.py: one Triton launch)
    S      = qp kp^T * scale   (B, H, Mq, Mk) float32    (one batched matmul)
    lists  = per query block, the chosen key blocks      (the selection kernel below: one Triton launch)

then the block-sparse kernel reads the lists straight from device memory (`DeviceBlockSparseMask`): nothing is read
back by the host, every output has a fixed size, so the whole thing can sit inside a CUDA graph.

Selection, per (batch, head, query block) row of S:
- forced blocks first: the first `sink_blocks` key blocks, and the diagonal block (key block i for query block i)
  when `diagonal`; then the others by score, descending; ties by lower block index;
- top-k: the first `budget` blocks of that order (at least the forced ones);
- cumulative mass (`mass` given): the softmax of the row's scores, summed in that order; the first blocks whose
  preceding mass is below `mass` (so the set reaches it), at least the forced ones, at most `width`.
The chosen blocks are written in ascending order into fixed-width lists (width = budget for top-k, the cap for
mass), padded with 0; the ragged last key block, when chosen, goes to the partial list (the kernel masks the
sequence end there).

Selection kernel tiling. One program per row: it loads the row's Mk scores (padded to MK_PAD, a power of two) and
packs each into one int64 sort key -- from the top: the forced bit, the score's order-preserving 32-bit image, then
MK_PAD - 1 - j in the low log2(MK_PAD) bits, so that ties go to the lower index and keys are unique. The row's count
c is the budget (top-k) or, for the mass rule, read off the keys sorted descending (tl.sort, bitonic, in registers;
the scores decoded back from the keys). The c-th largest key is a threshold that picks the chosen set: top-k finds it
without sorting, bit by bit from the top (the largest t with at least c keys >= t: one count per key bit), and a
running count (tl.cumsum) of the chosen blocks gives each its slot in the ascending list.
`select_blocks_reference` is the same rule in PyTorch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_pool import block_pool, block_pool_reference
from .device_mask import DeviceBlockSparseMask, partial_lists
from .mask import check_block_size, is_int, num_blocks

MAX_KEY_BLOCKS = 1 << 16  # the sort key keeps up to 16 bits for the block index (a row of 65536 blocks is plenty)


@triton.jit
def _kth_largest(key, c, TOP_BIT: tl.constexpr):
    """The c-th largest of the unique non-negative keys (padding -1): the largest t with at least c keys >= t, built
    from the top bit down."""
    t = tl.zeros((), dtype=tl.int64)
    for bit in range(TOP_BIT, -1, -1):
        candidate = t | (tl.full((), 1, tl.int64) << bit)
        t = tl.where(tl.sum((key >= candidate).to(tl.int32), 0) >= c, candidate, t)
    return t


@triton.jit(do_not_specialize=["n_kb", "n_qb", "budget", "sink"])
def _select_blocks_kernel(
    S, FULL_CNT, FULL_IDX, PART_CNT, n_kb, n_qb, budget, mass, sink,
    MK_PAD: tl.constexpr, IDX_BITS: tl.constexpr, WIDTH: tl.constexpr, USE_MASS: tl.constexpr,
    DIAGONAL: tl.constexpr, RAGGED: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) * n_qb + i
    j = tl.arange(0, MK_PAD)
    valid = j < n_kb
    s = tl.load(S + row * n_kb + j, mask=valid, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0, as torch's sort sees them (equal)
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving int image of the float
    forced = j < sink
    if DIAGONAL:
        forced = forced | (j == i)
    forced = forced & valid
    key = ((forced.to(tl.int64) << (IDX_BITS + 32)) | ((ordered.to(tl.int64) + 2147483648) << IDX_BITS)
           | (MK_PAD - 1 - j).to(tl.int64))
    key = tl.where(valid, key, -1)  # padding ranks last
    n_forced = tl.sum(forced.to(tl.int32), 0)
    if USE_MASS:
        srt = tl.sort(key, descending=True)
        o = (((srt >> IDX_BITS) & 0xFFFFFFFF) - 2147483648).to(tl.int32)  # decode the sorted scores
        ss = tl.where(o >= 0, o, o ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        peak = tl.max(tl.where(valid, s, float("-inf")), 0)
        e = tl.where(srt >= 0, tl.exp(ss - peak), 0.0)
        p = e / tl.sum(e, 0)
        before = tl.cumsum(p, 0) - p  # mass of the blocks ahead of each
        c = tl.sum(((before < mass) & (srt >= 0)).to(tl.int32), 0)
        c = tl.minimum(tl.maximum(c, n_forced), WIDTH)
        threshold = tl.sum(tl.where(j == c - 1, srt, 0), 0)
    else:
        c = tl.minimum(tl.maximum(tl.minimum(budget, n_kb), n_forced), WIDTH)
        threshold = _kth_largest(key, c, IDX_BITS + 32)
    chosen = (key >= threshold) & valid
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1  # ascending: block j goes after the chosen blocks before it
    tl.store(FULL_IDX + row * WIDTH + slot, j, mask=chosen)
    tl.store(FULL_IDX + row * WIDTH + j, 0, mask=(j >= c) & (j < WIDTH))  # padding
    if RAGGED:
        last = tl.sum((chosen & (j == n_kb - 1)).to(tl.int32), 0)
        tl.store(FULL_CNT + row, c - last)
        tl.store(PART_CNT + row, last)
    else:
        tl.store(FULL_CNT + row, c)
        tl.store(PART_CNT + row, 0)


def check_selection(num_kv_blocks: int, budget, mass, sink_blocks, diagonal, width) -> None:
    if mass is None and (not is_int(budget) or budget < 1):
        raise ValueError(f"budget must be an int >= 1 (key blocks per query block), got {budget!r}")
    if not is_int(width) or not 1 <= width <= num_kv_blocks:
        raise ValueError(f"width must be an int in [1, {num_kv_blocks}] (key blocks), got {width!r}")
    if mass is None:
        if budget > width:
            raise ValueError(f"budget={budget} exceeds the list width {width}")
    elif not (isinstance(mass, float) and 0.0 < mass <= 1.0):
        raise ValueError(f"mass must be a float in (0, 1], got {mass!r}")
    if not is_int(sink_blocks) or sink_blocks < 0:
        raise ValueError(f"sink_blocks must be an int >= 0, got {sink_blocks!r}")
    if not isinstance(diagonal, bool):
        raise TypeError(f"diagonal must be a bool, got {diagonal!r}")
    forced = min(sink_blocks, num_kv_blocks) + int(diagonal)
    if forced > width:
        raise ValueError(f"{forced} always-on blocks (sink_blocks={sink_blocks}, diagonal={diagonal}) exceed the list "
                         f"width {width}")
    if num_kv_blocks > MAX_KEY_BLOCKS:
        raise ValueError(f"{num_kv_blocks} key blocks: at most {MAX_KEY_BLOCKS} (use larger blocks)")


def select_blocks(scores: torch.Tensor, kv_len: int, block_size: int, width: int, budget: int | None = None,
                  mass: float | None = None, sink_blocks: int = 0, diagonal: bool = False, out=None):
    """(full_counts (B, H, Mq), full_indices (B, H, Mq, width), partial_counts (B, H, Mq)), int32, from block scores
    (B, H, Mq, Mk) float32 of kv_len keys in blocks of block_size (see the module docstring for the rule).
    out: optional contiguous int32 buffers of those shapes."""
    bsz, heads, mq, mk = scores.shape
    _check_scores(scores, kv_len, block_size, diagonal)
    check_selection(mk, budget, mass, sink_blocks, diagonal, width)
    scores = scores.contiguous()
    shapes = ((bsz, heads, mq), (bsz, heads, mq, width), (bsz, heads, mq))
    if out is None:
        out = tuple(torch.empty(s, dtype=torch.int32, device=scores.device) for s in shapes)
    elif any(tuple(t.shape) != s or t.dtype != torch.int32 or not t.is_contiguous() or t.device != scores.device
             for t, s in zip(out, shapes)):
        raise ValueError(f"out buffers must be contiguous int32 {shapes} on {scores.device}")
    full_counts, full_indices, part_counts = out
    mk_pad = max(16, triton.next_power_of_2(mk))
    _select_blocks_kernel[(mq, bsz * heads)](
        scores, full_counts, full_indices, part_counts, mk, mq, budget or 0, float(mass or 0.0), sink_blocks,
        MK_PAD=mk_pad, IDX_BITS=mk_pad.bit_length() - 1, WIDTH=width, USE_MASS=mass is not None, DIAGONAL=diagonal,
        RAGGED=kv_len % block_size != 0,
        num_warps=4 if mk_pad <= 1024 else 8,
    )
    return full_counts, full_indices, part_counts


def _check_scores(scores, kv_len: int, block_size: int, diagonal: bool) -> None:
    check_block_size(block_size)
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.ndim != 4:
        raise TypeError(f"scores must be a float32 tensor (B, H, Mq, Mk), got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}")
    if scores.shape[-1] != num_blocks(kv_len, block_size):
        raise ValueError(f"scores have {scores.shape[-1]} key blocks; kv_len={kv_len} in blocks of {block_size} "
                         f"needs {num_blocks(kv_len, block_size)}")
    if diagonal and scores.shape[-2] != scores.shape[-1]:
        raise ValueError(f"diagonal needs as many query as key blocks, got {scores.shape[-2]} and {scores.shape[-1]}")


def select_blocks_reference(scores: torch.Tensor, kv_len: int, block_size: int, width: int, budget: int | None = None,
                            mass: float | None = None, sink_blocks: int = 0, diagonal: bool = False):
    """The selection rule in PyTorch: the same outputs as `select_blocks` (padding entries 0)."""
    bsz, heads, mq, mk = scores.shape
    _check_scores(scores, kv_len, block_size, diagonal)
    check_selection(mk, budget, mass, sink_blocks, diagonal, width)
    s = scores
    s = torch.where(s == 0, torch.zeros_like(s), s)
    j = torch.arange(mk, device=s.device)
    forced = (j < sink_blocks)[None, :].expand(mq, mk)
    if diagonal:
        forced = forced | (j[None, :] == torch.arange(mq, device=s.device)[:, None])
    forced = forced.expand(bsz, heads, mq, mk)
    by_score = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ties: lower index first
    forced_first = torch.sort(forced.gather(-1, by_score).to(torch.uint8), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, forced_first)
    n_forced = forced.sum(-1)
    if mass is None:
        count = torch.full_like(n_forced, min(budget, mk))
    else:
        e = torch.exp(s - s.amax(-1, keepdim=True))
        p = (e / e.sum(-1, keepdim=True)).gather(-1, order)
        count = ((torch.cumsum(p, -1) - p) < mass).sum(-1)
    count = torch.maximum(count, n_forced).clamp(max=width)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, j.expand_as(order).contiguous())
    chosen = rank < count[..., None]
    ascending = torch.sort(torch.where(chosen, j, mk), dim=-1).values[..., :width]
    indices = torch.where(ascending < mk, ascending, 0).to(torch.int32)
    ragged = kv_len % block_size != 0
    last = chosen[..., -1].to(torch.int32) if ragged else torch.zeros_like(count, dtype=torch.int32)
    return (count.to(torch.int32) - last), indices, last


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int = 128, scale: float | None = None) -> torch.Tensor:
    """(B, H, Mq, Mk) float32: mean-pooled q blocks against mean-pooled k blocks, times scale (default 1/sqrt(D))."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qp, kp = block_pool(q, k, block_size)
    # One GEMM with the scale as its alpha (fp32 accumulators: the same values as matmul then multiply).
    out = torch.baddbmm(qp.new_empty(()), qp.flatten(0, 1), kp.flatten(0, 1).transpose(-1, -2), beta=0.0, alpha=scale)
    return out.view(*qp.shape[:3], kp.shape[2])


def block_scores_reference(q: torch.Tensor, k: torch.Tensor, block_size: int = 128, scale: float | None = None):
    """`block_scores` in PyTorch (float32, float64 for float64 inputs)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(block_pool_reference(q, block_size), block_pool_reference(k, block_size).transpose(-1, -2)) * scale


def _check_qk(q, k) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor (B, H, N, D), got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.device != k.device:
        raise ValueError(f"q {tuple(q.shape)} on {q.device} and k {tuple(k.shape)} on {k.device} must share B, H, D, device")


def dynamic_block_mask(q: torch.Tensor, k: torch.Tensor, budget: int | None = None, mass: float | None = None,
                       width: int | None = None, sink_blocks: int = 0, diagonal: bool = False, block_size: int = 128,
                       scale: float | None = None) -> DeviceBlockSparseMask:
    """A per-(batch, head) block mask chosen from q and k on their device, with no host sync (module docstring).

    budget: key blocks per query block (top-k); or mass in (0, 1]: the smallest set of top blocks holding that share
    of the row's pooled softmax, at most `width` blocks (default: all). The always-on blocks (`sink_blocks` first
    ones, the `diagonal`) count towards the budget."""
    _check_qk(q, k)
    if (budget is None) == (mass is None):
        raise ValueError("give exactly one of budget (top-k blocks) and mass (cumulative share)")
    check_block_size(block_size)
    mk = num_blocks(k.shape[2], block_size)
    width = (budget if mass is None else mk) if width is None else width
    check_selection(mk, budget, mass, sink_blocks, diagonal, width)
    scores = block_scores(q, k, block_size, scale)
    full_counts, full_indices, part_counts = select_blocks(scores, k.shape[2], block_size, width, budget, mass,
                                                           sink_blocks, diagonal)
    # The selection wrote the partial counts (the ragged last block where chosen, else 0): only the lists remain.
    part_counts, part_indices = partial_lists(tuple(part_counts.shape), part_counts, mk, q.device)
    return DeviceBlockSparseMask(q.shape[2], k.shape[2], block_size, full_counts, full_indices, part_counts, part_indices)


def dynamic_block_mask_reference(q, k, budget=None, mass=None, width=None, sink_blocks=0, diagonal=False,
                                 block_size=128, scale=None):
    """`dynamic_block_mask`'s lists (full_counts, full_indices, partial_counts) in PyTorch."""
    _check_qk(q, k)
    mk = num_blocks(k.shape[2], block_size)
    width = (budget if mass is None else mk) if width is None else width
    scores = block_scores_reference(q, k, block_size, scale).float()
    return select_blocks_reference(scores, k.shape[2], block_size, width, budget, mass, sink_blocks, diagonal)
