"""Block-sparse self-attention for diffusers video transformers (WanTransformer3DModel's `attn1` layers).

    restore = apply_sparse_attention(transformer, pattern="local_3d")   # or local_3d(radius=(2, 8, 8)), ...
    ...
    restore()                                                           # the original processor objects, exactly

The replacement processor keeps diffusers' projections, q/k RMS norms, rotary embedding and output projection,
and runs the attention through `accel.kernels.block_sparse_attention`. A pattern turns the latent token grid
(frames, height, width after patching) and the head count into a `BlockSparseMask`; the mask is built once per
grid and reused by every layer and step. The grid is read from the transformer's input by a forward pre-hook.
Cross-attention (`attn2`) is left alone. Blocks are not touched, so block-level caches (`cg_taylor`) compose.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch

from accel.diffusers_internals import get_wan_qkv_projections
from accel.kernels.block_sparse import BlockSparseMask, block_sparse_attention, local_3d_mask, strided_shards_mask, table_mask
from accel.kernels.block_sparse.mask import check_block_size, num_blocks
from accel.kernels.block_sparse.patterns import check_shards, check_window

Grid = tuple[int, int, int]
Pattern = Callable[[Grid, int, torch.device], BlockSparseMask]  # (grid, heads, device) -> mask
SUPPORTED = ("WanTransformer3DModel",)


def local_3d(radius: tuple[int, int, int] = (2, 8, 8), block_size: int = 128) -> Pattern:
    """Each latent token sees the tokens within `radius` (frames, rows, cols) of it (video DiT locality)."""
    check_window(None, radius)  # here, not at the first forward
    check_block_size(block_size)
    return lambda grid, heads, device: local_3d_mask(grid, radius, block_size, device=device)


def strided_shards(num_shards: int = 4, local_blocks: int = 1, block_size: int = 128) -> Pattern:
    """S2-Attention-style: head h sees key blocks j = h (mod num_shards), plus the blocks around the diagonal.
    num_shards must not exceed the model's head count (checked when the mask is built)."""
    check_shards(num_shards, local_blocks)
    check_block_size(block_size)
    return lambda grid, heads, device: strided_shards_mask(heads, math.prod(grid), num_shards, local_blocks, block_size, device)


def dense(block_size: int = 128) -> Pattern:
    """Every block: exact dense attention, for checks and baselines (on CUDA block_sparse_attention hands a mask
    that allows every pair to SDPA; the interpreter runs the kernel)."""
    check_block_size(block_size)

    def build(grid: Grid, heads: int, device: torch.device) -> BlockSparseMask:
        m = num_blocks(math.prod(grid), block_size)
        return table_mask(torch.ones(1, 1, m, m, dtype=torch.bool, device=device), math.prod(grid), block_size=block_size)

    return build


PATTERNS: dict[str, Callable[[], Pattern]] = {"local_3d": local_3d, "strided_shards": strided_shards, "dense": dense}


def _as_pattern(pattern: Union[str, Pattern, BlockSparseMask]) -> Pattern:
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise ValueError(f"unknown sparse attention pattern {pattern!r}; available: {', '.join(map(repr, PATTERNS))}")
        return PATTERNS[pattern]()
    if isinstance(pattern, BlockSparseMask):
        return lambda grid, heads, device: pattern.to(device)
    if callable(pattern):
        return pattern
    raise TypeError(
        f"pattern must be a name ({', '.join(map(repr, PATTERNS))}), a BlockSparseMask or a callable "
        f"(grid, heads, device) -> mask, got {type(pattern).__name__}"
    )


class _GridState:
    """The current latent grid (set by the model's pre-hook) and the masks built for it."""

    def __init__(self, pattern: Pattern, patch_size: tuple[int, int, int]):
        self.pattern, self.patch_size = pattern, patch_size
        self.grid: Grid | None = None
        self.masks: dict[tuple, BlockSparseMask] = {}

    def record(self, module, args, kwargs) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.grid = tuple(s // p for s, p in zip(latents.shape[2:], self.patch_size))

    def mask(self, num_tokens: int, heads: int, device: torch.device) -> BlockSparseMask:
        if self.grid is None or math.prod(self.grid) != num_tokens:
            raise RuntimeError(f"sparse attention got {num_tokens} tokens but the latent grid is {self.grid}")
        key = (self.grid, heads, device)
        if key not in self.masks:
            mask = self.pattern(self.grid, heads, device)
            if not isinstance(mask, BlockSparseMask):
                raise TypeError(f"the sparse attention pattern must return a BlockSparseMask, got {type(mask).__name__}")
            if (mask.q_len, mask.kv_len) != (num_tokens, num_tokens):
                raise ValueError(f"pattern built a mask for {(mask.q_len, mask.kv_len)} tokens, the layer has {num_tokens}")
            self.masks[key] = mask
        return self.masks[key]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding (interleaved pairs), in the same arithmetic."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor:
    """WanAttnProcessor for self-attention with the attention itself block-sparse."""

    def __init__(self, state: _GridState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("WanSparseAttnProcessor is for self-attention without an attention mask")
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"sparse attention needs float16 or bfloat16 activations, got {hidden_states.dtype}: run the model in bf16"
            )
        query, key, value = get_wan_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        mask = self.state.mask(query.shape[1], attn.heads, query.device)
        # (B, N, H, D) -> (B, H, N, D) views; the kernel's output keeps q's strides, so flattening heads back is a view.
        out = block_sparse_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def apply_sparse_attention(
    model: torch.nn.Module, pattern: Union[str, Pattern, BlockSparseMask] = "local_3d"
) -> Callable[[], None]:
    """Run the self-attention of `model` (WanTransformer3DModel) through block-sparse attention.

    pattern: "local_3d", "strided_shards", "dense" (defaults of the factories of the same names), a pattern
        built by those factories, any callable (grid, heads, device) -> BlockSparseMask, or a fixed mask.
    Returns `restore()`, which puts back the original processor objects and removes the grid hook.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    if type(model).__name__ not in SUPPORTED:
        raise NotImplementedError(
            f"sparse attention supports {', '.join(SUPPORTED)}, not model={type(model).__name__} (for a pipeline, use "
            f"accel.patch(pipe, method='sparse_attention') or pass pipe.transformer)"
        )
    layers = [block.attn1 for block in model.blocks]
    if any(isinstance(layer.processor, WanSparseAttnProcessor) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} already runs sparse attention; call the restore function first")
    state = _GridState(_as_pattern(pattern), tuple(model.config.patch_size))
    originals = [layer.processor for layer in layers]
    hook = model.register_forward_pre_hook(state.record, with_kwargs=True)
    processor = WanSparseAttnProcessor(state)
    for layer in layers:
        layer.set_processor(processor)

    def restore() -> None:
        hook.remove()
        for layer, original in zip(layers, originals):
            layer.set_processor(original)

    return restore
