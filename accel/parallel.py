"""diffusers' context parallelism (`model.enable_parallelism(config=ContextParallelConfig(...))`), as accel sees it.

diffusers records the config on the model (`_parallel_config`, set by `enable_parallelism` or by
`from_pretrained(parallel_config=...)`) and splits the sequence over the ranks of the context-parallel mesh where the
model's `_cp_plan` says (for Wan: the input of the first block, and the rotary embedding): each rank's blocks see a
shard of the tokens, and the output is gathered after the last block. The model's field and the config's mesh fields
are private: checked here at import, as accel/diffusers_internals.py checks the others. A diffusers without context
parallelism at all (no `ContextParallelConfig`) is fine: no model can then run split, and `context_parallel` is
always None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import diffusers
import torch
import torch.distributed as dist
from diffusers import ModelMixin

from .diffusers_internals import CHECKED_VERSIONS

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig

PRIVATE_NAMES = (("ModelMixin", "_parallel_config"), ("ContextParallelConfig", "_flattened_mesh"),
                 ("ContextParallelConfig", "_ulysses_mesh"))


def check_private_names(owners: dict[str, type], names=PRIVATE_NAMES) -> None:
    """ImportError naming each of `names` (owner name, attribute) that its owner in `owners` lacks."""
    missing = [f"{owner}.{name}" for owner, name in names if not hasattr(owners[owner], name)]
    if missing:
        raise ImportError(
            f"accel relies on diffusers' private {', '.join(missing)} (context parallelism), checked with diffusers "
            f"{', '.join(CHECKED_VERSIONS)}; this diffusers ({diffusers.__version__}) has no such name"
        )


HAS_CONTEXT_PARALLEL = hasattr(diffusers, "ContextParallelConfig")
if HAS_CONTEXT_PARALLEL:
    check_private_names({"ModelMixin": ModelMixin, "ContextParallelConfig": diffusers.ContextParallelConfig})


def context_parallel(model: torch.nn.Module) -> ContextParallelConfig | None:
    """The model's context-parallel config while it runs split over more than one process, else None."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or not dist.is_available() or not dist.is_initialized():
        return None
    mesh = cp._flattened_mesh  # None until the config is set up (diffusers sets it up before recording it)
    return None if mesh is None or mesh.size() < 2 else cp


def context_parallel_group(model: torch.nn.Module) -> dist.ProcessGroup | None:
    """The process group over which the model's sequence is split (ring and Ulysses ranks together), or None."""
    cp = context_parallel(model)
    return None if cp is None else cp._flattened_mesh.get_group()


def sequence_shard(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """This rank's share of a whole sequence `x` (B, N, ...), as diffusers' context parallelism splits it (equal chunks
    of dim 1 over the flattened mesh: `EquipartitionSharder`), or None while the model does not run split."""
    cp = context_parallel(model)
    if cp is None:
        return None
    mesh = cp._flattened_mesh
    return x.chunk(mesh.size(), dim=1)[dist.get_rank(mesh.get_group())]
