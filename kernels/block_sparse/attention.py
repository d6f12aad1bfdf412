"""IO-aware block-sparse attention: one Triton kernel (FlashAttention-2 style) that reads only the listed key blocks.

Tiling. One program computes a BLOCK_M x D tile of the output for one (batch, head): its query tile stays on
chip, and it walks the key blocks listed for its query block (see mask.py), BLOCK_N keys at a time,
keeping the running row max m, the running sum l and the unnormalised output acc in fp32 (online softmax).
Per step: S = Q K^T (tensor cores), P = exp2(S * scale * log2 e - m), acc = acc * exp2(m_old - m) + P V.
Key blocks never listed are never read, so time and HBM traffic fall with the number of listed blocks.

Two loops per program: first the "full" blocks, with no masking at all (the hot path: no index compares,
no selects, unmasked loads); then the "partial" blocks, where the token rule and the sequence end mask S
to -inf. A row that has seen nothing keeps m = -inf; the partial loop subtracts 0 instead of -inf so that
such rows give p = 0 and alpha = 0 rather than NaN, and the epilogue writes zeros for rows with l = 0.

Launch order. Programs' costs differ with the lengths of their lists, and the last programs to start decide when
the kernel ends. With LONGEST_FIRST each program reads its (batch * head, query tile) from the mask's order table:
heads in order, each head's longest lists first, so every head ends with its shortest tiles. On the H200 this
made the default tiles 0.8-2.3% faster than plain order; sorting all heads' tiles together made random
tables up to 24% slower (it mixes heads, so the programs running together no longer share K/V in L2).

The mask's block size (MASK_BLOCK) is the unit of the lists; kernel tiles may be smaller (BLOCK_M and
BLOCK_N divide it), so the tile shape is tuned independently of the pattern.
Head dims that are not a power of two (e.g. 112) are padded to BLOCK_D with masked loads (zeros).

On Hopper (triton 3.6) K/V tiles come through the TMA copy engine. The measured ceiling of this structure is
~460-470 TFLOP/s on computed blocks (H200, D = 128): triton waits on each S = Q K^T right after issuing it and
keeps the two warpgroups of a 128-row tile in step with CTA barriers, so the softmax never overlaps the tensor
cores within a program. hopper.py is the Gluon kernel that does overlap them; calls it covers run there on sm_90
(`choose_config`), everything else here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

try:  # host-side tensor descriptors (TMA), triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from .mask import RULES, BlockSparseMask, is_int, table_mask, table_strides
from .reference import block_sparse_attention_reference

try:  # the Gluon kernel for Hopper (triton >= 3.5)
    from . import hopper

    HOPPER_IMPORT_ERROR = None
except ImportError as error:
    hopper, HOPPER_IMPORT_ERROR = None, error

logger = logging.getLogger("accel")

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
_INT32_MAX = 2**31 - 1


@triton.jit
def _in_window(q_coord, k_coord, radius):
    """|q - k| <= radius on a (BLOCK_M, BLOCK_N) grid as one subtraction and one unsigned compare per pair."""
    return (k_coord[None, :] - (q_coord - radius)[:, None]).to(tl.uint32) <= (2 * radius).to(tl.uint32)


@triton.jit
def _token_allowed(qa, qb, K_AUX, cols, n_k, rf, rh, rw, RULE: tl.constexpr):
    """Which (row, col) pairs of a partial tile are allowed: the sequence end and the mask's token rule.

    qa, qb: per-row data loaded once per program (interval: lo and hi; box3d: packed coordinates, unused).
    The rule runs on every pair of every partial tile, so each test is kept to ~2 integer ops per pair.
    """
    if RULE == 1:  # interval lo <= j < hi (the builder clamps hi to n_k): one unsigned compare
        allowed = (cols[None, :] - qa[:, None]).to(tl.uint32) < (qb - qa).to(tl.uint32)[:, None]
    elif RULE == 2:  # box3d: within the window on every axis, or either token global (coordinate -1)
        kc = tl.load(K_AUX + cols, mask=cols < n_k, other=0)
        near = _in_window(qa >> 20, kc >> 20, rf)
        near = near & _in_window((qa >> 10) & 1023, (kc >> 10) & 1023, rh)
        near = near & _in_window(qa & 1023, kc & 1023, rw)
        allowed = (near | ((qa < 0)[:, None] | (kc < 0)[None, :])) & (cols < n_k)[None, :]
    else:
        allowed = (cols < n_k)[None, :]
    return allowed


@triton.jit
def _load_kv_tile(
    base, desc, b, h, start, cols, stride_n, stride_d, offs_d, d_ok, n_k,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A BLOCK_N x BLOCK_D tile of K or V: rows past n_k and columns past the head dim read as 0."""
    if USE_TMA:
        # The copy engine zero-fills outside the tensor and needs no per-element addresses (fewer registers).
        tile = desc.load([b, h, start, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        ptrs = base + cols[:, None] * stride_n + offs_d[None, :] * stride_d
        if MASKED:
            tile = tl.load(ptrs, mask=(cols < n_k)[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _attend_listed(
    acc, m_i, l_i, q, k_base, v_base, desc_k, desc_v, b, h, stride_kn, stride_kd, stride_vn, stride_vd,
    idx_ptr, count, offs_n, offs_d, d_ok, qa, qb, K_AUX, n_k, rf, rh, rw, qk_scale,
    MASKED: tl.constexpr, RULE: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Online-softmax update of one query tile over `count` listed key blocks (BLOCK_N keys per step)."""
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N  # kernel tiles per mask block
    for t in range(0, count * SUBS):
        # The block index is a load inside the loop: the pipeliner issues it a stage ahead of the K/V loads.
        blk = tl.load(idx_ptr + t // SUBS)
        start = blk * MASK_BLOCK + (t % SUBS) * BLOCK_N
        cols = start + offs_n
        k = _load_kv_tile(k_base, desc_k, b, h, start, cols, stride_kn, stride_kd, offs_d, d_ok, n_k,
                          MASKED, EVEN_D, USE_TMA, BLOCK_N, BLOCK_D)
        if DOT_F32:  # the interpreter's bf16 dot is wrong: exact fp32 on upcast operands instead
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            allowed = _token_allowed(qa, qb, K_AUX, cols, n_k, rf, rh, rw, RULE)
            qk = tl.where(allowed, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp2(-inf) = 0
            p = tl.math.exp2(qk - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_kv_tile(v_base, desc_v, b, h, start, cols, stride_vn, stride_vd, offs_d, d_ok, n_k,
                          MASKED, EVEN_D, USE_TMA, BLOCK_N, BLOCK_D)
        p = p.to(v.dtype)  # P V in the input precision, as on the GPU
        if DOT_F32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = tl.dot(p, v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(
    # Scalars whose divisibility does not matter: no recompilation per sequence length or mask shape.
    do_not_specialize=[
        "stride_cb", "stride_ch", "stride_fb", "stride_fh", "stride_fm", "stride_pb", "stride_ph", "stride_pm",
        "rf", "rh", "rw", "n_q", "n_k", "head_dim", "num_heads",
    ]
)
def _block_sparse_attention_fwd(
    Q, K, V, O, DESC_K, DESC_V,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    stride_cb, stride_ch,  # counts (B, H, Mq): 0 on broadcast dims, 1 along Mq
    stride_fb, stride_fh, stride_fm,  # full-block indices (B, H, Mq, W_full)
    stride_pb, stride_ph, stride_pm,  # partial-block indices (B, H, Mq, W_partial)
    Q_AUX, K_AUX, rf, rh, rw, ORDER, LSE,
    n_q, n_k, head_dim, num_heads, qk_scale,
    RULE: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr,
    LONGEST_FIRST: tl.constexpr, STORE_LSE: tl.constexpr,
):
    if LONGEST_FIRST:  # grid (programs,): ORDER lists (batch * head) * tiles + tile, longest lists first
        n_tiles = tl.cdiv(n_q, BLOCK_M)
        program = tl.load(ORDER + tl.program_id(0))
        pid_m = program % n_tiles
        pid_bh = program // n_tiles
    else:  # grid (query tiles, batch * heads): a head's tiles are adjacent, sharing its K/V blocks in L2
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
    b32 = pid_bh // num_heads
    h32 = pid_bh % num_heads
    b, h = b32.to(tl.int64), h32.to(tl.int64)  # batch / head offsets can pass 2^31 elements
    mask_row = (pid_m * BLOCK_M) // MASK_BLOCK

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < n_q

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    # Per-row data of the token rule, loaded once.
    if RULE == 1:
        qa = tl.load(Q_AUX + 2 * rows, mask=row_ok, other=0)
        qb = tl.load(Q_AUX + 2 * rows + 1, mask=row_ok, other=0)
    elif RULE == 2:
        qa = tl.load(Q_AUX + rows, mask=row_ok, other=0)
        qb = qa
    else:
        qa = tl.zeros([BLOCK_M], dtype=tl.int32)
        qb = qa

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    cnt_off = b * stride_cb + h * stride_ch + mask_row
    n_full = tl.load(FULL_CNT + cnt_off)
    full_idx = FULL_IDX + b * stride_fb + h * stride_fh + mask_row * stride_fm
    acc, m_i, l_i = _attend_listed(
        acc, m_i, l_i, q, k_base, v_base, DESC_K, DESC_V, b32, h32, stride_kn, stride_kd, stride_vn, stride_vd,
        full_idx, n_full, offs_n, offs_d, d_ok, qa, qb, K_AUX, n_k, rf, rh, rw, qk_scale,
        False, RULE, MASK_BLOCK, BLOCK_N, BLOCK_D, EVEN_D, USE_TMA, DOT_F32,
    )
    n_part = tl.load(PART_CNT + cnt_off)
    part_idx = PART_IDX + b * stride_pb + h * stride_ph + mask_row * stride_pm
    acc, m_i, l_i = _attend_listed(
        acc, m_i, l_i, q, k_base, v_base, DESC_K, DESC_V, b32, h32, stride_kn, stride_kd, stride_vn, stride_vd,
        part_idx, n_part, offs_n, offs_d, d_ok, qa, qb, K_AUX, n_k, rf, rh, rw, qk_scale,
        True, RULE, MASK_BLOCK, BLOCK_N, BLOCK_D, EVEN_D, USE_TMA, DOT_F32,
    )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: acc = 0 -> zeros
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:  # for the backward (backward.py): log2-domain log-sum-exp of each row's scaled scores, (B, H, N_q)
        # fp32; +inf on rows that saw no key, so that the backward's P = exp2(S - lse) is 0 there.
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE + pid_bh.to(tl.int64) * n_q + rows, lse, mask=row_ok)


INTERPRETED = isinstance(_block_sparse_attention_fwd, InterpretedFunction)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters; block_m and block_n must divide the mask's block size.

    use_tma: K/V tiles through the Hopper copy engine (tensor descriptors) instead of per-element pointers.
    longest_first: launch the query tiles with the longest block lists first (see the module docstring).
    gluon: run the Gluon kernel for Hopper instead (hopper.py: warp-specialised, softmax overlapped with the tensor
        cores, TMA, longest first): tiles 128 x 128 with 12 warps (a loader and two consumer warpgroups), num_stages
        2 or 3 (its K / V rings). It takes rule "none" masks, head dims 64 and 128 and TMA-addressable tensors on
        sm_90; other calls with it raise.
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    use_tma: bool = False
    longest_first: bool = True
    gluon: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):  # tensor-core tiles: powers of two of at least 16
            value = getattr(self, name)
            if not is_int(value) or value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"KernelConfig.{name} must be a positive int, got {value!r}")


GLUON_CONFIGS = tuple(KernelConfig(m, n, w, s, use_tma=True, gluon=True)
                      for m, n, w in (hopper.TILES if hopper else ()) for s in hopper.RING_STAGES)
# 2 and 3 ring stages are within ~3% of each other on most patterns of the H200 benchmark; the deeper ring is the
# default, for sparse tables' scattered loads.
GLUON_DEFAULT = KernelConfig(128, 128, 12, 3, use_tma=True, gluon=True)


@functools.lru_cache(maxsize=None)
def _cuda_arch(device: torch.device) -> tuple[int, int]:
    """(major compute capability, multiprocessor count), cached: it is read on every call."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.multi_processor_count


def default_config(q: torch.Tensor, block_size: int) -> KernelConfig:
    """The Triton kernel's tiles for q's device and problem size (from the H200 benchmark), clipped to the mask's
    block size. (On Hopper, `choose_config` sends the calls the Gluon kernel can take to it instead.)

    Hopper: 128 x 128 tiles, 8 warps, TMA; when that gives under 8 waves of programs (short sequences such as
    FLUX's 4608 tokens), 64 x 64 tiles with 4 warps: twice the programs, two resident per multiprocessor. Tiles
    clipped below 128 x 128 by the mask's block size get at most 4 warps: at HMAR's shape (64-token blocks) 8 warps
    on 64 x 64 tiles took 1.9x as long (results/hmar_attention_tiles_h100.json).
    """
    major, sms = _cuda_arch(q.device) if q.device.type == "cuda" else (0, 0)
    if major >= 9:
        many = q.shape[0] * q.shape[1] * triton.cdiv(q.shape[2], 128) >= 8 * sms
        cfg = KernelConfig(128, 128, 8, 2, use_tma=True) if many else KernelConfig(64, 64, 4, 2, use_tma=True)
    elif major == 8:
        cfg = KernelConfig(128, 64, 4, 3)
    else:
        cfg = KernelConfig(64, 64, 4, 2)
    cfg = dataclasses.replace(cfg, block_m=min(cfg.block_m, block_size), block_n=min(cfg.block_n, block_size))
    if cfg.block_m * cfg.block_n < 128 * 128:
        cfg = dataclasses.replace(cfg, num_warps=min(cfg.num_warps, 4))
    return cfg


def choose_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                  out: torch.Tensor | None = None) -> KernelConfig:
    """What a call without `config` runs: the Gluon kernel where it applies (Hopper, rule "none", D 64 / 128, block
    sizes that are multiples of 128), else the Triton kernel with `default_config`'s tiles."""
    if _gluon_unsupported_reason(q, k, v, out, mask, GLUON_DEFAULT) is None:
        return GLUON_DEFAULT
    return default_config(q, mask.block_size)


def _gluon_unsupported_reason(q, k, v, out, mask: BlockSparseMask, cfg: KernelConfig) -> str | None:
    if hopper is None:
        return f"this triton has no Gluon for Hopper ({HOPPER_IMPORT_ERROR})"
    tiles = (cfg.block_m, cfg.block_n, cfg.num_warps)
    if tiles not in hopper.TILES or cfg.num_stages not in hopper.RING_STAGES:
        return (f"its (block_m, block_n, num_warps) are one of {hopper.TILES} and num_stages one of "
                f"{hopper.RING_STAGES} (got {tiles}, {cfg.num_stages})")
    if mask.block_size % cfg.block_m:
        return f"its tiles must divide the mask's block size (got {cfg.block_m} and {mask.block_size})"
    return hopper.unsupported_reason(q, k, v, out, mask)


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int):
    """4-D (B, H, N, D) descriptors of K and V with BLOCK_N x BLOCK_D boxes, or None where TMA cannot be used."""
    if TensorDescriptor is None:
        return None
    for t in (k, v):
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:3]):
            return None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, block_d]) for t in (k, v))


_LOGGED: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


FALLBACK_MESSAGE = (
    "block_sparse_attention on CPU without TRITON_INTERPRET=1: using the PyTorch reference (dense masked softmax in "
    "row chunks). Set TRITON_INTERPRET=1 before importing triton to run the Triton kernel."
)
DENSE_MESSAGE = (
    "block_sparse_attention: the mask allows every (query, key) pair, so dense SDPA computes it (faster than the "
    "Triton kernel on a dense pattern); pass config= to run the kernel anyway."
)


def runs_dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                    config: KernelConfig | None, out: torch.Tensor | None = None) -> bool:
    """On CUDA a pattern that skips nothing goes to SDPA (cuDNN / FlashAttention), unless a kernel config is given or
    the Gluon kernel takes the call: on the H200 it is as fast as SDPA or faster on dense patterns, but it has no
    backward, so inputs that need gradients still go to SDPA.

    Only inputs SDPA's fused kernels take (head dim a multiple of 8, unit stride along it): for others SDPA would fall
    back to its math backend and build the N x N scores, where this kernel stays in O(N) memory."""
    fused = q.shape[-1] % 8 == 0 and all(t.stride(-1) == 1 for t in (q, k, v))
    if not (q.device.type == "cuda" and config is None and fused and mask.allows_all_pairs):
        return False
    if _gluon_unsupported_reason(q, k, v, out, mask, GLUON_DEFAULT) is not None:
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def check_inputs(q, k, v, block_mask, scale, block_size, out, config) -> tuple[BlockSparseMask, float]:
    """Every argument of `block_sparse_attention`, before anything runs: (the mask, the scale) on success.

    Cheap attribute checks only (no device syncs), except building a mask from a bool block table."""
    _check_tensors(q, k, v, out)
    mask = _as_mask(block_mask, q, k, block_size)
    _check_mask(mask, q, k)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    if config is not None:
        _check_config(config, q, k, v, out, mask)
    return mask, _check_scale(scale, q.shape[-1])


def _as_mask(block_mask, q: torch.Tensor, k: torch.Tensor, block_size: int) -> BlockSparseMask:
    if isinstance(block_mask, BlockSparseMask):
        if block_mask.device != q.device:
            raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}; build it there or call .to()")
        return block_mask
    if isinstance(block_mask, torch.Tensor):
        return table_mask(block_mask.to(q.device), q.shape[2], k.shape[2], block_size)
    raise TypeError(f"block_mask must be a bool block table or a BlockSparseMask, got {type(block_mask).__name__}")


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, H, N, D), got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must all be float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cuda", "cpu"):
        raise NotImplementedError(f"block_sparse_attention runs on CUDA (or CPU), not on {q.device.type}")
    (bsz, heads, n_q, dim), n_k = q.shape, k.shape[2]
    if k.shape != (bsz, heads, n_k, dim) or v.shape != k.shape:
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (want k = v = (B, H, N_k, D))"
        )
    if min(bsz, heads, n_q, n_k) < 1:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: batch, heads and sequences must not be empty")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={dim} is not supported: 1 <= D <= {MAX_HEAD_DIM}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor like q or None, got {type(out).__name__}")
    if out is not None and (out.shape, out.dtype, out.device) != (q.shape, q.dtype, q.device):
        raise ValueError(f"out must be a tensor like q {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    # Offsets inside one (batch, head) are int32 in the kernel (cheaper tile addresses); only huge tensors can overflow.
    for t in (q, k, v) if max(q.numel(), k.numel()) > _INT32_MAX else ():
        if (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) > _INT32_MAX:
            raise ValueError(f"a (batch, head) slice of shape {tuple(t.shape)} spans over 2^31 elements")


def _check_mask(mask: BlockSparseMask, q: torch.Tensor, k: torch.Tensor) -> None:
    if (mask.q_len, mask.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"block_mask is for (N_q, N_k) = {(mask.q_len, mask.kv_len)}, inputs have {(q.shape[2], k.shape[2])}")
    mb, mh = mask.shape
    if mb not in (1, q.shape[0]) or mh not in (1, q.shape[1]):
        raise ValueError(f"block_mask batch/head dims {(mb, mh)} must be 1 or match (B, H) = {tuple(q.shape[:2])}")


def _check_config(config: KernelConfig, q, k, v, out, mask: BlockSparseMask) -> None:
    if config.gluon:  # checked on every device, so that none silently ignores it
        reason = _gluon_unsupported_reason(q, k, v, out, mask, config)
        if reason is not None:
            raise ValueError(f"config.gluon: the Gluon kernel cannot take this call: {reason}") from HOPPER_IMPORT_ERROR
    elif mask.block_size % config.block_m or mask.block_size % config.block_n:
        raise ValueError(f"config tiles {config.block_m}x{config.block_n} must divide the mask's block_size={mask.block_size}")


def _check_scale(scale, dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):  # a tensor would need a device sync
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not 0.0 < scale < math.inf:  # the kernels take the row max of S before scaling: it must keep the order
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return float(scale)


def _launch(q, k, v, out, mask: BlockSparseMask, scale: float, cfg: KernelConfig,
            lse: torch.Tensor | None = None) -> None:
    """Run the forward into `out`; with `lse` ((B, H, N_q) fp32, contiguous) the Triton kernel also writes each row's
    log-sum-exp for the backward (the Gluon kernel writes none: callers that need it never pass a Gluon config)."""
    if cfg.gluon:
        assert lse is None, "the Gluon kernel writes no log-sum-exp"
        return hopper.launch(q, k, v, out, mask, scale, cfg.num_stages)
    bs = mask.block_size
    bsz, heads, n_q, dim = q.shape
    block_d = max(16, triton.next_power_of_2(dim))
    descs = _tma_descriptors(k, v, cfg.block_n, block_d) if cfg.use_tma else None
    q_aux = mask.q_aux if mask.q_aux is not None else mask.full_counts  # unused by the kernel for rule "none"
    k_aux = mask.k_aux if mask.k_aux is not None else mask.full_counts
    tiles = triton.cdiv(n_q, cfg.block_m)
    order = mask.longest_first_order(bsz, heads, cfg.block_m) if cfg.longest_first else None
    grid = (tiles * bsz * heads,) if cfg.longest_first else (tiles, bsz * heads)
    _block_sparse_attention_fwd[grid](
        q, k, v, out, *(descs or (None, None)),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        mask.full_counts, mask.full_indices, mask.partial_counts, mask.partial_indices,
        *table_strides(mask.full_counts, bsz, heads)[:2],
        *table_strides(mask.full_indices, bsz, heads), *table_strides(mask.partial_indices, bsz, heads),
        q_aux, k_aux, *mask.radius, order, out if lse is None else lse,
        n_q, k.shape[2], dim, heads, scale * LOG2E,
        RULE=RULES.index(mask.rule), MASK_BLOCK=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, EVEN_D=block_d == dim, USE_TMA=descs is not None, DOT_F32=INTERPRETED,
        LONGEST_FIRST=cfg.longest_first, STORE_LSE=lse is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask | torch.Tensor,
    scale: float | None = None,
    block_size: int = 128,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    backward_config=None,
) -> torch.Tensor:
    """Softmax attention restricted to the allowed blocks (and token rule) of `block_mask`; differentiable.

    q (B, H, N_q, D), k and v (B, H, N_k, D): float16 or bfloat16, any strides, D <= 128; fp32 accumulation.
    block_mask: a `BlockSparseMask` (see the builders), or a bool block table (B or 1, H or 1,
        ceil(N_q / block_size), ceil(N_k / block_size)) whose listed block pairs are fully allowed.
    scale: defaults to 1 / sqrt(D). A query that may see no key gets zeros (and passes no gradient).
    out: optional output buffer like q (any strides); by default a new tensor. With gradients it is written in place
        and becomes the autograd output.
    config: forward kernel tiles / warps / stages, or the Gluon kernel (default: `choose_config`).
    backward_config: the gradient kernels' tiles (`BackwardConfig`; default: `default_backward_config`).
    On CUDA, and on CPU under TRITON_INTERPRET=1, runs a kernel; on CPU otherwise the PyTorch reference (and autograd
    through it). A mask that allows every pair is dense attention: on CUDA it runs through SDPA (logged once), unless
    `config` is given or the Gluon kernel takes it (`runs_dense_sdpa`).
    Gradients: when q, k or v requires grad with grad mode on, the Triton forward also saves each row's log-sum-exp
    and the backward runs the Triton kernels of backward.py (the Gluon kernel has none: `config.gluon` then raises).
    """
    mask, scale = check_inputs(q, k, v, block_mask, scale, block_size, out, config)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backward_config is not None:
        from .backward import check_backward_config  # noqa: PLC0415  (backward.py imports this module)

        check_backward_config(backward_config, mask)
    if runs_dense_sdpa(q, k, v, mask, config, out):
        _log_once(logging.INFO, DENSE_MESSAGE)
        dense = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return dense if out is None else out.copy_(dense)
    if q.device.type == "cpu" and not INTERPRETED:
        _log_once(logging.WARNING, FALLBACK_MESSAGE)
        out = torch.empty_like(q) if out is None else out
        return out.copy_(block_sparse_attention_reference(q, k, v, mask, scale))  # differentiable (autograd)
    if needs_grad:
        if config is not None and config.gluon:
            raise ValueError("config.gluon: the Gluon kernel has no backward, and q, k or v requires grad; pass a "
                             "Triton KernelConfig or none, or call it under torch.no_grad()")
        from .backward import BlockSparseAttentionFunction  # noqa: PLC0415

        return BlockSparseAttentionFunction.apply(out, q, k, v, mask, scale, config or default_config(q, mask.block_size),
                                                  backward_config)
    if torch.compiler.is_compiling() and out is None and config is None:
        return compiled.forward(q, k, v, mask, scale)  # one graph node, not a graph break
    out = torch.empty_like(q) if out is None else out
    _launch(q, k, v, out, mask, scale, config or choose_config(q, k, v, mask, out))
    return out


from . import compiled  # noqa: E402  (the custom op; it imports this module's launcher)
