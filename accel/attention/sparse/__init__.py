"""Block-sparse self-attention for diffusers video transformers (WanTransformer3DModel's `attn1` layers; the
image-image part of HunyuanVideoTransformer3DModel's joint image-text attention).

    restore = apply_sparse_attention(transformer, pattern="preset")     # or "local_3d", local_3d(radius=(2, 8, 8)), ...
    ...
    restore()                                                           # the original processor objects, exactly

The replacement processor keeps diffusers' projections, q/k RMS norms, rotary embedding and output projection,
and runs the attention through `accel.kernels.block_sparse_attention`. A pattern turns the latent token grid
(frames, height, width after patching) and the head count into a `BlockSparseMask`; the mask is built once per
grid and reused by every layer and step. The grid is read from the transformer's input by a forward pre-hook.
Cross-attention (`attn2`) is left alone. Blocks are not touched, so block-level caches (`cg_taylor`) compose.
SANA / SANA-Video self-attention is linear (no softmax): refused, pointing to the `linear_attention_kernels` method.

From the public API down to the kernel: `accel.patch(pipe, method="sparse_attention")` calls apply_sparse_attention
(here), which
- turns the pattern into a `SparsePattern`: factories.py (the factories, PATTERNS, "name(key=value)" strings) and
  presets.py (SPARSE_PRESETS per model family, the "preset" pattern resolved per latent grid);
- hooks the latent grid and caches what the pattern builds per grid: state.py;
- sets the attention processors: wan.py (WanTransformer3DModel), hunyuan_video.py (HunyuanVideo's joint image-text
  attention); under diffusers' Ulysses context parallelism they attend between the all-to-alls of ulysses.py.
The processors attend through the pattern classes of patterns.py (tile order, dynamic masks, PBS, hybrid layers,
joint masks), down to `accel.kernels.block_sparse_attention`.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from accel.kernels.block_sparse import BlockSparseMask
from accel.parallel import context_parallel

from .factories import (
    PATTERNS, _as_pattern, criss_cross, dense, dynamic, hybrid, local_3d, pbs, strided_shards, tiled_3d,
    window_global_random,
)
from .hunyuan_video import HunyuanVideoSparseAttnProcessor
from .patterns import (
    PAD_COORD, DynamicPattern, Grid, HybridPattern, MaskPattern, Pattern, PBSPattern, SparsePattern, TiledPattern,
    joint_mask,
)
from .presets import SPARSE_PRESETS, PresetPattern, SparsePreset, _bind_family, preset, resolve_preset
from .state import _GridState
from .ulysses import _heads_to_sequence, _sequence_to_heads, _ulysses  # noqa: F401 (the all-to-alls: tests import them)
from .wan import WanSparseAttnProcessor, _rotate  # noqa: F401 (_rotate: tests import it)

__all__ = [
    "apply_sparse_attention", "PATTERNS", "SPARSE_PRESETS", "SUPPORTED", "FAMILIES", "LINEAR_ATTENTION_MODELS",
    "local_3d", "strided_shards", "dense", "tiled_3d", "dynamic", "criss_cross", "window_global_random", "pbs",
    "hybrid", "preset", "SparsePattern", "MaskPattern", "TiledPattern", "DynamicPattern", "PBSPattern",
    "HybridPattern", "PresetPattern", "SparsePreset", "resolve_preset", "joint_mask", "PAD_COORD", "Grid", "Pattern",
    "WanSparseAttnProcessor", "HunyuanVideoSparseAttnProcessor",
]

SUPPORTED = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel")
FAMILIES = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan_video"}
# Models whose self-attention is linear (ReLU kernels, no softmax): block-sparse softmax masks do not apply.
LINEAR_ATTENTION_MODELS = ("SanaVideoTransformer3DModel", "SanaTransformer2DModel", "CausalSanaVideoTransformer3DModel")

_PROCESSORS = (WanSparseAttnProcessor, HunyuanVideoSparseAttnProcessor)


def _check_model(model) -> None:
    name = type(model).__name__
    if name in LINEAR_ATTENTION_MODELS:
        raise NotImplementedError(
            f"sparse attention does not apply to {name}: its self-attention is linear (ReLU kernels, no softmax), so "
            f"block-sparse softmax masks have nothing to mask; use accel.patch(pipe, method=\"linear_attention_kernels\") "
            f"(accel's Triton linear-attention kernels) instead"
        )
    if name not in SUPPORTED:
        raise NotImplementedError(
            f"sparse attention supports {', '.join(SUPPORTED)}, not model={name} (for a pipeline, use "
            f"accel.patch(pipe, method='sparse_attention') or pass pipe.transformer)"
        )


def apply_sparse_attention(
    model: torch.nn.Module, pattern: Union[str, Pattern, BlockSparseMask] = "preset"
) -> Callable[[], None]:
    """Run the self-attention of `model` (WanTransformer3DModel's `attn1`; HunyuanVideoTransformer3DModel's joint
    attention, image-image part) through block-sparse attention.

    pattern: a name of PATTERNS ("local_3d", "strided_shards", "dense", "tiled_3d", "dynamic", "criss_cross",
        "window_global_random", "pbs", "hybrid", "preset": the defaults of the factories of the same names), such a
        name with keyword arguments ("dynamic(budget=0.1)"), a pattern built by those factories, any callable
        (grid, heads, device) -> BlockSparseMask, or a fixed mask. Hybrid patterns replace only their sparse layers.
        "preset" (the default): the model family's preset (SPARSE_PRESETS), its tile chosen per grid and logged.
        On HunyuanVideo, patterns chosen from q and k ("dynamic", "pbs") are refused.
    Returns `restore()`, which puts back the original processor objects and removes the grid hook.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    _check_model(model)
    family = FAMILIES[type(model).__name__]
    _ulysses(model)  # ring attention refused now where parallelism came first
    if family == "wan":
        layers, patch_size, processor_cls = [block.attn1 for block in model.blocks], tuple(model.config.patch_size), WanSparseAttnProcessor
    else:
        if context_parallel(model) is not None:
            raise NotImplementedError("sparse attention on HunyuanVideo does not run under context parallelism")
        layers = [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
        patch_size = (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)
        processor_cls = HunyuanVideoSparseAttnProcessor
    if any(isinstance(layer.processor, _PROCESSORS) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} already runs sparse attention; call the restore function first")
    sparse_pattern = _bind_family(_as_pattern(pattern), family)
    if family == "hunyuan_video":
        probe = sparse_pattern.inner if isinstance(sparse_pattern, HybridPattern) else sparse_pattern
        if type(probe).joint is SparsePattern.joint:
            probe.joint(None, 1)  # raises: the pattern has no joint form
    state = _GridState(sparse_pattern, patch_size)
    chosen = state.pattern.sparse_layers(len(layers))
    layers = [layer for layer, sparse in zip(layers, chosen) if sparse]
    originals = [layer.processor for layer in layers]
    hook = model.register_forward_pre_hook(state.record, with_kwargs=True)
    processor = processor_cls(state)
    for layer in layers:
        layer.set_processor(processor)

    def restore() -> None:
        hook.remove()
        config = getattr(model, "_parallel_config", None)
        for layer, original in zip(layers, originals):
            if getattr(config, "context_parallel_config", None) is not None and hasattr(original, "_parallel_config"):
                # What enable_parallelism gives the processors in place, had it run while ours were: without it the
                # original processor would attend over its rank's shard of the tokens only.
                original._parallel_config = config
            layer.set_processor(original)

    return restore
