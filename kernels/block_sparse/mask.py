"""Which key blocks each query block of a block-sparse attention sees, without any N x N mask.

Layout (FlexAttention's BlockMask in spirit). For every (batch, head, query block) two lists of key blocks:
- full: every (query, key) token pair of the block pair is allowed, so the kernel runs them unmasked;
- partial: a token-level rule decides inside the block pair; the kernel also masks the sequence end here,
  so the last key block is always partial when the key length is not a multiple of the block size.
Each list is a count (B', H', Mq) int32 and ascending block indices (B', H', Mq, W) int32, padded to W, the
longest list; B' (H') is 1 when all batches (heads) share the pattern. Memory is O(B' H' Mq W).

Token-level rules (one per mask):
- "none": every pair of a listed block pair is allowed (up to the sequence end);
- "interval": query i sees keys j with lo[i] <= j < hi[i] (segments, causal and sliding 1-D windows);
- "box3d": tokens on a (frames, height, width) grid see the keys within per-axis radii; global tokens (packed
  coordinate -1, e.g. text) see every key and are seen by every query.
Semantics: query i sees key j iff (i's block, j's block) is listed and the rule allows (i, j).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

RULES = ("none", "interval", "box3d")
COORD_BITS = 10  # box3d packs (frame, row, col) into one int32, 10 bits each
COORD_LIMIT = 1 << COORD_BITS


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_block_size(block_size: int) -> None:
    # Power of two so that kernel tiles (powers of two, >= 16 for tensor cores) divide it.
    if not is_int(block_size):
        raise TypeError(f"block_size must be an int (a power of two in [16, 256]), got {block_size!r}")
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size!r}")


def check_length(name: str, length: int) -> None:
    """A sequence length: a positive int (an empty sequence has no blocks to list)."""
    if not is_int(length):
        raise TypeError(f"{name} must be an int, got {length!r}")
    if length < 1:
        raise ValueError(f"{name} must be >= 1, got {length}")


@dataclass(frozen=True)
class BlockSparseMask:
    """A block-sparse attention pattern for q_len queries and kv_len keys (see the module docstring)."""

    q_len: int
    kv_len: int
    block_size: int
    full_counts: torch.Tensor
    full_indices: torch.Tensor
    partial_counts: torch.Tensor
    partial_indices: torch.Tensor
    rule: str = "none"
    q_aux: torch.Tensor | None = None  # interval: (q_len, 2) [lo, hi); box3d: (q_len,) packed coordinates
    k_aux: torch.Tensor | None = None  # box3d: (kv_len,) packed coordinates
    radius: tuple[int, int, int] = (0, 0, 0)  # box3d: window half-extents along (frames, height, width)

    def __post_init__(self):
        check_length("q_len", self.q_len)
        check_length("kv_len", self.kv_len)
        check_block_size(self.block_size)
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        self._check_tables()
        self._check_lists()
        self._check_aux()
        self.allows_all_pairs  # noqa: B018  (computed here, where the checks sync anyway: never inside a compiled call)

    def _check_tables(self) -> None:
        for name in ("full_counts", "full_indices", "partial_counts", "partial_indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
                raise TypeError(f"{name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        lead = tuple(self.full_counts.shape)
        if len(lead) != 3 or lead[2] != self.num_q_blocks:
            raise ValueError(f"full_counts must have shape (B', H', {self.num_q_blocks}), got {lead}")
        for name in ("full_counts", "full_indices", "partial_counts", "partial_indices"):
            t = getattr(self, name)
            ndim = 4 if name.endswith("indices") else 3
            if t.device != self.device or tuple(t.shape[:3]) != lead or t.ndim != ndim:
                raise ValueError(f"{name} must be on {self.device} with shape {lead}{' + (W,)' * (ndim == 4)}, "
                                 f"got {tuple(t.shape)} on {t.device}")

    def _check_lists(self) -> None:
        # The kernel trusts the lists: indices in range, and full blocks never past the sequence end.
        for kind in ("full", "partial"):
            counts, indices = getattr(self, f"{kind}_counts"), getattr(self, f"{kind}_indices")
            if indices.shape[-1] < 1:  # the Gluon kernel reads entry 0 even of an empty list
                raise ValueError(f"{kind}_indices must have width >= 1 (pad empty lists)")
            if bool((counts < 0).any()) or bool((counts > indices.shape[-1]).any()):
                raise ValueError(f"{kind}_counts must be in [0, {indices.shape[-1]}] (the width of {kind}_indices)")
            listed = _listed(counts, indices)
            if listed.numel() and not (0 <= int(listed.min()) and int(listed.max()) < self.num_kv_blocks):
                raise ValueError(f"{kind}_indices must be key block indices in [0, {self.num_kv_blocks})")
        ragged = self.kv_len % self.block_size != 0
        if ragged and bool((_listed(self.full_counts, self.full_indices) == self.num_kv_blocks - 1).any()):
            raise ValueError("the ragged last key block must be listed as partial (only partial blocks mask the sequence end)")

    def _check_aux(self) -> None:
        want = {"none": (None, None), "interval": ((self.q_len, 2), None), "box3d": ((self.q_len,), (self.kv_len,))}
        for name, shape in zip(("q_aux", "k_aux"), want[self.rule]):
            t = getattr(self, name)
            fits = t is None if shape is None else (
                isinstance(t, torch.Tensor) and (tuple(t.shape), t.dtype, t.device) == (shape, torch.int32, self.device))
            if not fits:
                got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
                raise ValueError(f"rule {self.rule!r} needs {name} of shape {shape} (int32, on {self.device}), got {got}")
        # The kernel relies on these bounds (one unsigned compare per pair).
        if self.rule == "interval":
            lo, hi = self.q_aux[:, 0], self.q_aux[:, 1]
            if not bool(((0 <= lo) & (lo <= hi) & (hi <= self.kv_len)).all()):
                raise ValueError(f"interval bounds must satisfy 0 <= lo <= hi <= kv_len={self.kv_len}")
        if self.rule == "box3d" and not all(0 <= r < COORD_LIMIT for r in self.radius):
            raise ValueError(f"box3d radius must be in [0, {COORD_LIMIT}), got {self.radius}")

    @classmethod
    def trusted(cls, *fields) -> "BlockSparseMask":
        """The mask of fields taken from a checked mask, without the checks (their host syncs): for the custom op
        (compiled.py), which receives a mask as its tensors."""
        mask = object.__new__(cls)
        for field, value in zip(dataclasses.fields(cls), fields, strict=True):
            object.__setattr__(mask, field.name, value)
        return mask

    @property
    def device(self) -> torch.device:
        return self.full_counts.device

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(B', H'): 1 where the pattern is shared."""
        return tuple(self.full_counts.shape[:2])

    @functools.cached_property
    def allows_all_pairs(self) -> bool:
        """Every query sees every key: the pattern is dense attention (computed once, with one host sync).

        Only rule "none" is checked: a token rule could allow everything too, but telling needs N^2 work."""
        if self.rule != "none" or not bool((self.full_counts + self.partial_counts >= self.num_kv_blocks).all()):
            return False  # most masks stop here, before the (B', H', Mq, Mk) tables are built
        full, partial = self.block_tables()
        return bool((full | partial).all())

    def longest_first_order(self, batch: int, heads: int, tile_rows: int) -> torch.Tensor:
        """The kernel's launch order: int32 ids (b * heads + h) * tiles + tile of its tile_rows-row query tiles.

        Heads in order (tiles running together share their head's K/V in L2), each head's tiles by the length of
        their block lists, longest first (a partial block counts 1.5 full ones: it also masks), ties in tile order.
        Built once per argument set."""
        key = (batch, heads, tile_rows)
        if key not in self._launch_orders:
            cost = (2 * self.full_counts + 3 * self.partial_counts).expand(batch, heads, -1)
            tiles = num_blocks(self.q_len, tile_rows)
            cost = cost.repeat_interleave(self.block_size // tile_rows, dim=2)[..., :tiles]
            order = torch.sort(-cost.reshape(batch * heads, tiles), dim=1, stable=True).indices  # within each head
            order += tiles * torch.arange(batch * heads, device=order.device)[:, None]
            self._launch_orders[key] = order.reshape(-1).to(torch.int32)
        return self._launch_orders[key]

    @functools.cached_property
    def _launch_orders(self) -> dict:
        return {}

    @functools.cached_property
    def query_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transposed pattern, for the backward's dK / dV kernel: for every (batch, head, key block) the query
        blocks that see it, as (full_counts (B', H', Mk), full_indices (B', H', Mk, W), partial_counts, partial_indices),
        the same layout as the forward's lists with the roles of queries and keys swapped.

        A block pair is full (or partial) here exactly when it is in the forward's lists, except that the ragged last
        query block is always partial: there only partial blocks mask the query end. Built once per mask (one host
        sync, O(B' H' Mq Mk)); `block_sparse_attention` builds it in the forward of a call that needs gradients."""
        full, partial = (t.transpose(-1, -2).contiguous() for t in self.block_tables())
        if self.q_len % self.block_size:
            partial[..., -1] |= full[..., -1]
            full[..., -1] = False
        return (*_compact(full), *_compact(partial))

    def to(self, device) -> "BlockSparseMask":
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # not the cached properties
        return BlockSparseMask(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in fields.items()})

    def block_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial) boolean tables (B', H', Mq, Mk): O(N^2 / block^2), for tests and FlexAttention."""
        return _expand(self.full_counts, self.full_indices, self.num_kv_blocks), _expand(
            self.partial_counts, self.partial_indices, self.num_kv_blocks
        )

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """Token-level mask of query rows [start, stop): bool (B', H', stop - start, kv_len)."""
        full, partial = self.block_tables()
        rows = torch.arange(start, stop, device=self.device)
        cols = torch.arange(self.kv_len, device=self.device)
        listed = full | partial
        allowed = listed[:, :, rows // self.block_size][..., cols // self.block_size]
        return allowed & self.token_rule(rows, cols)

    def to_dense(self) -> torch.Tensor:
        """Token-level mask, bool (B', H', q_len, kv_len). Materialises N^2: small sizes only."""
        return self.dense_rows(0, self.q_len)

    def token_rule(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The rule alone on a grid of query rows x key columns: bool (len(rows), len(cols))."""
        if self.rule == "none":
            return torch.ones(len(rows), len(cols), dtype=torch.bool, device=self.device)
        if self.rule == "interval":
            lo, hi = self.q_aux[rows, 0, None], self.q_aux[rows, 1, None]
            return (cols[None, :] >= lo) & (cols[None, :] < hi)
        qc, kc = self.q_aux[rows], self.k_aux[cols]
        near = torch.ones(len(rows), len(cols), dtype=torch.bool, device=self.device)
        for axis, r in enumerate(self.radius):
            shift = COORD_BITS * (2 - axis)
            qa, ka = (qc >> shift) & (COORD_LIMIT - 1), (kc >> shift) & (COORD_LIMIT - 1)
            near &= (qa[:, None] - ka[None, :]).abs() <= r
        return near | (qc[:, None] < 0) | (kc[None, :] < 0)

    def computed_pairs(self) -> int:
        """(query, key) token pairs inside the listed block pairs, summed over B' and H' (FLOP counting)."""
        full, partial = self.block_tables()
        bs = self.block_size
        q_sizes = torch.full((self.num_q_blocks,), bs, device=self.device)
        q_sizes[-1] = self.q_len - bs * (self.num_q_blocks - 1)
        k_sizes = torch.full((self.num_kv_blocks,), bs, device=self.device)
        k_sizes[-1] = self.kv_len - bs * (self.num_kv_blocks - 1)
        return int(((full | partial).long() * (q_sizes[:, None] * k_sizes[None, :])).sum())

    def density(self) -> float:
        """Fraction of block pairs computed (per batch and head)."""
        b, h = self.shape
        listed = int(self.full_counts.sum()) + int(self.partial_counts.sum())
        return listed / (b * h * self.num_q_blocks * self.num_kv_blocks)


def table_strides(t: torch.Tensor, bsz: int, heads: int) -> tuple[int, int, int]:
    """(batch, head, row) strides of a per-(B', H') table, 0 on the shared dims (no expand: launch overhead)."""
    return (t.stride(0) if t.shape[0] == bsz > 1 else 0), (t.stride(1) if t.shape[1] == heads > 1 else 0), t.stride(2)


def _listed(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The listed entries of padded index lists, flattened."""
    return indices[torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]]


def _expand(counts: torch.Tensor, indices: torch.Tensor, width: int) -> torch.Tensor:
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None].long()
    table = torch.zeros(*counts.shape, width + 1, dtype=torch.bool, device=counts.device)
    table.scatter_(-1, torch.where(valid, indices.long(), width), True)  # padding lands in a spare column
    return table[..., :width]


def _compact(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean table (..., Mk) -> count (...) and ascending listed indices (..., W), W = max(1, longest list)."""
    counts = table.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    # A stable sort of "not listed" puts the listed blocks first, in ascending block order (sequential reads).
    order = torch.sort((~table).to(torch.uint8), dim=-1, stable=True).indices
    return counts, order[..., :width].to(torch.int32).contiguous()


def from_block_tables(
    full: torch.Tensor,
    partial: torch.Tensor,
    q_len: int,
    kv_len: int,
    block_size: int,
    rule: str = "none",
    q_aux: torch.Tensor | None = None,
    k_aux: torch.Tensor | None = None,
    radius: tuple[int, int, int] = (0, 0, 0),
) -> BlockSparseMask:
    """Build the compact mask from block-level tables of full and partial block pairs (B', H', Mq, Mk).

    The builders give exact classes; here the ragged last key block is moved to the partial list, because
    only partial blocks mask the sequence end.
    """
    check_block_size(block_size)
    want = (num_blocks(q_len, block_size), num_blocks(kv_len, block_size))
    for name, t in (("full", full), ("partial", partial)):
        if t.dtype != torch.bool or t.ndim != 4 or tuple(t.shape[2:]) != want:
            raise ValueError(f"{name} table must be bool (B', H', {want[0]}, {want[1]}), got {t.dtype} {tuple(t.shape)}")
    full, partial = torch.broadcast_tensors(full, partial)
    partial = partial & ~full
    if kv_len % block_size:
        partial = partial.clone()
        partial[..., -1] |= full[..., -1]
        full = full.clone()
        full[..., -1] = False
    full_counts, full_indices = _compact(full)
    partial_counts, partial_indices = _compact(partial)
    return BlockSparseMask(
        q_len, kv_len, block_size, full_counts, full_indices, partial_counts, partial_indices, rule,
        None if q_aux is None else q_aux.to(torch.int32).contiguous(),
        None if k_aux is None else k_aux.to(torch.int32).contiguous(),
        tuple(int(r) for r in radius),
    )


def table_mask(table: torch.Tensor, q_len: int, kv_len: int | None = None, block_size: int = 128) -> BlockSparseMask:
    """An arbitrary boolean block table (B or 1, H or 1, ceil(q_len / block), ceil(kv_len / block)).

    Every token pair of a listed block pair is allowed.
    """
    kv_len = q_len if kv_len is None else kv_len
    check_length("q_len", q_len)
    check_length("kv_len", kv_len)
    check_block_size(block_size)
    if not isinstance(table, torch.Tensor) or table.dtype != torch.bool:
        raise TypeError(f"block table must be a bool tensor (B, H, Mq, Mk), got {getattr(table, 'dtype', type(table).__name__)}")
    if table.ndim != 4:
        raise ValueError(f"block table must be 4-D (B, H, Mq, Mk), got shape {tuple(table.shape)}")
    want = (num_blocks(q_len, block_size), num_blocks(kv_len, block_size))
    if tuple(table.shape[2:]) != want:
        raise ValueError(
            f"block table has {tuple(table.shape[2:])} blocks; q_len={q_len}, kv_len={kv_len} with block_size="
            f"{block_size} need {want} (ceil(N / block_size))"
        )
    return from_block_tables(table, torch.zeros_like(table), q_len, kv_len, block_size)


def pad_to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pad dim 0 to a multiple of block_size by repeating the last entry (neutral for all/any reductions)."""
    extra = math.ceil(x.shape[0] / block_size) * block_size - x.shape[0]
    return torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]) if extra else x
