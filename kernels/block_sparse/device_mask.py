"""Block masks that live on the GPU and are never read by the host: per-call (dynamic) masks without a device sync.

`BlockSparseMask` checks its lists when it is built (index ranges, the ragged last block, whether it is dense), and
`table_mask` sizes its index lists by the longest one: each of those reads the device (a host sync, 0.6-0.8 ms with
the launch gaps it causes on an H200 at FLUX's shape). A mask made per layer and per step (SVG2, XAttention, the
dynamic masks of dynamic_mask.py) cannot afford that, and a CUDA graph cannot contain it.

`DeviceBlockSparseMask` is the same layout with fixed-size lists whose contents are trusted: it checks shapes,
dtypes and devices only (host metadata), never reports itself dense (so no SDPA hand-off is decided on the host),
and launches its query tiles in plain order (the longest-first order would be a sort per call). Its builders
(`device_table_mask` here, `dynamic_block_mask` in dynamic_mask.py) produce lists that satisfy the kernel's
contract by construction: indices in range and ascending, the ragged last key block only in the partial list.
"""

from __future__ import annotations

import dataclasses

import torch

from .mask import BlockSparseMask, check_block_size, check_length, num_blocks

_ORDERS: dict[tuple, torch.Tensor] = {}
_LAST_BLOCK_LISTS: dict[tuple, torch.Tensor] = {}  # read-only, shared by every mask of a shape: no launch per call


def _cached(cache: dict, key: tuple, make) -> torch.Tensor:
    """cache[key], made on first use. Not while a CUDA graph is being captured: a tensor made there is filled only
    when the graph replays, so it is made for that graph alone and not kept."""
    if key in cache:
        return cache[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return make()
    cache[key] = make()
    return cache[key]


class DeviceBlockSparseMask(BlockSparseMask):
    """A rule-"none" `BlockSparseMask` whose lists are built on the device and trusted (see the module docstring)."""

    def __post_init__(self):
        check_length("q_len", self.q_len)
        check_length("kv_len", self.kv_len)
        check_block_size(self.block_size)
        if self.rule != "none" or self.q_aux is not None or self.k_aux is not None:
            raise ValueError("DeviceBlockSparseMask takes rule 'none' only (block tables, no token rule)")
        self._check_tables()  # shapes, dtypes, devices: host metadata only
        for kind in ("full", "partial"):
            if getattr(self, f"{kind}_indices").shape[-1] < 1:
                raise ValueError(f"{kind}_indices must have width >= 1 (pad empty lists)")

    @property
    def allows_all_pairs(self) -> bool:  # deciding it would read the device
        return False

    def longest_first_order(self, batch: int, heads: int, tile_rows: int) -> torch.Tensor:
        """Plain order (b * heads + h) * tiles + tile, cached per shape: no per-call sort."""
        tiles = num_blocks(self.q_len, tile_rows)
        count = batch * heads * tiles
        return _cached(_ORDERS, (self.device, count),
                       lambda: torch.arange(count, dtype=torch.int32, device=self.device))

    def to(self, device) -> "DeviceBlockSparseMask":
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return DeviceBlockSparseMask(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in fields.items()})


def partial_lists(counts_shape: tuple[int, ...], selected_last: torch.Tensor | None, num_kv_blocks: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial lists of a rule-"none" table: only the ragged last key block, where it is selected.

    selected_last: bool/int (B', H', Mq) or None (keys a multiple of the block: no partial block)."""
    if selected_last is None:
        counts = torch.zeros(counts_shape, dtype=torch.int32, device=device)
    else:
        counts = selected_last.to(torch.int32)
    last = _cached(_LAST_BLOCK_LISTS, (torch.device(device), num_kv_blocks),
                   lambda: torch.full((1, 1, 1, 1), num_kv_blocks - 1, dtype=torch.int32, device=device))
    return counts, last.expand(*counts_shape, 1)


def device_table_mask(table: torch.Tensor, q_len: int, kv_len: int | None = None, block_size: int = 128,
                      width: int | None = None) -> DeviceBlockSparseMask:
    """A bool block table (B', H', Mq, Mk) on the device -> a mask, with no host sync (fixed list width).

    width: the index lists' width, at least the longest row's count (default Mk: always enough). A row listing more
    blocks than `width` keeps only its first `width` (in ascending order): pass a width you know bounds the rows."""
    kv_len = q_len if kv_len is None else kv_len
    check_length("q_len", q_len)
    check_length("kv_len", kv_len)
    check_block_size(block_size)
    want = (num_blocks(q_len, block_size), num_blocks(kv_len, block_size))
    if not isinstance(table, torch.Tensor) or table.dtype != torch.bool or table.ndim != 4 or tuple(table.shape[2:]) != want:
        raise ValueError(f"table must be a bool tensor (B', H', {want[0]}, {want[1]}), got "
                         f"{getattr(table, 'dtype', type(table).__name__)} {tuple(getattr(table, 'shape', ()))}")
    mk = want[1]
    width = mk if width is None else width
    if not isinstance(width, int) or not 1 <= width <= mk:
        raise ValueError(f"width must be an int in [1, {mk}], got {width!r}")
    ragged = kv_len % block_size != 0
    full = table
    if ragged:  # the ragged last key block goes to the partial list (only partial blocks mask the sequence end)
        full = table.clone()
        full[..., -1] = False
    counts = full.sum(-1, dtype=torch.int32).clamp_(max=width)
    # A stable sort of "not listed" brings the listed blocks first, ascending.
    indices = torch.sort((~full).to(torch.uint8), dim=-1, stable=True).indices[..., :width].to(torch.int32).contiguous()
    part_counts, part_indices = partial_lists(tuple(counts.shape), table[..., -1] if ragged else None, mk, table.device)
    return DeviceBlockSparseMask(q_len, kv_len, block_size, counts, indices, part_counts, part_indices)
