"""What the caches need to know about a diffusers transformer: its blocks, in order, and its CFG batch layout.

Block inputs and outputs are described by diffusers' own `TransformerBlockRegistry` (which output index holds
the image hidden states, which the text tokens); this module adds the models' block lists and registers the
SANA block classes that diffusers does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

# (args, kwargs, model) -> which half of the batch is the conditional branch when the pipeline batches CFG
# ("first" / "last"), or None when the batch is not a CFG pair.
CondHalf = Callable[[tuple, dict, torch.nn.Module], "str | None"]


@dataclass(frozen=True)
class ModelSpec:
    """How to walk one transformer class.

    block_lists: names of the `nn.ModuleList` attributes holding the transformer blocks, in execution order
        (FLUX: double-stream then single-stream blocks).
    family: key of the CG-Taylor preset to use by default (see `accel.cg_taylor.PRESETS`).
    cond_half: tells, from the model's inputs, where the conditional half of a batched CFG call is.
    """

    block_lists: tuple[str, ...]
    family: str = "generic"
    cond_half: CondHalf | None = None


def _dit_cond_half(args: tuple, kwargs: dict, model: torch.nn.Module) -> str | None:
    # DiTPipeline batches [cond, uncond] and labels the unconditional half with the null class id.
    labels = kwargs.get("class_labels")
    if labels is None or labels.ndim != 1 or labels.shape[0] % 2:
        return None
    null_id = model.config.num_embeds_ada_norm
    return "first" if bool((labels[labels.shape[0] // 2 :] == null_id).all()) else None


_SPECS: dict[str, ModelSpec] = {
    "FluxTransformer2DModel": ModelSpec(("transformer_blocks", "single_transformer_blocks"), "flux"),
    "DiTTransformer2DModel": ModelSpec(("transformer_blocks",), "dit", _dit_cond_half),
    "WanTransformer3DModel": ModelSpec(("blocks",), "wan"),
    "SanaTransformer2DModel": ModelSpec(("transformer_blocks",), "sana"),
    "SanaVideoTransformer3DModel": ModelSpec(("transformer_blocks",), "sana_video"),
    "PixArtTransformer2DModel": ModelSpec(("transformer_blocks",), "pixart"),
}

# Pipelines that batch CFG as [uncond, cond] and expose `do_classifier_free_guidance`.
COND_LAST_PIPELINES = ("SanaPipeline", "SanaSprintPipeline", "SanaVideoPipeline", "SanaImageToVideoPipeline")


def _register_sana_blocks() -> None:
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
    from diffusers.models.transformers.transformer_sana_video import SanaVideoTransformerBlock

    for cls in (SanaTransformerBlock, SanaVideoTransformerBlock):
        if cls not in TransformerBlockRegistry._registry:
            TransformerBlockRegistry.register(cls, TransformerBlockMetadata(return_hidden_states_index=0))


def register_model(
    model_cls: type,
    block_lists: tuple[str, ...],
    family: str = "generic",
    cond_half: CondHalf | None = None,
    block_metadata: dict[type, TransformerBlockMetadata] | None = None,
) -> None:
    """Teach accel a transformer class it does not know.

    `block_lists` names its `nn.ModuleList`s of blocks in execution order; `block_metadata` describes, for block
    classes diffusers has not registered, which output index holds the hidden states (and the text tokens).
    """
    for block_cls, metadata in (block_metadata or {}).items():
        TransformerBlockRegistry.register(block_cls, metadata)
    _SPECS[model_cls.__name__] = ModelSpec(tuple(block_lists), family, cond_half)


def spec_for(model: torch.nn.Module) -> ModelSpec:
    for cls in type(model).__mro__:
        if cls.__name__ in _SPECS:
            return _SPECS[cls.__name__]
    known = ", ".join(sorted(_SPECS))
    raise NotImplementedError(
        f"accel does not know how to walk the blocks of {type(model).__name__}. Known: {known}. Describe it with "
        f"accel.register_model({type(model).__name__}, block_lists=('blocks',), block_metadata={{BlockClass: "
        f"TransformerBlockMetadata(return_hidden_states_index=0)}}): the names of its nn.ModuleList attributes of "
        "transformer blocks in execution order, and which output of a block is the hidden state."
    )


@dataclass(frozen=True)
class Block:
    name: str  # qualified name inside the model, e.g. "blocks.3"
    module: torch.nn.Module
    metadata: TransformerBlockMetadata


def blocks_of(model: torch.nn.Module) -> list[Block]:
    """The model's transformer blocks in execution order, each with diffusers' description of its outputs."""
    _register_sana_blocks()
    spec = spec_for(model)
    blocks = []
    for list_name in spec.block_lists:
        module_list = getattr(model, list_name, None)
        if not isinstance(module_list, torch.nn.ModuleList):
            raise NotImplementedError(f"{type(model).__name__}.{list_name} is not an nn.ModuleList of blocks")
        for i, block in enumerate(module_list):
            try:
                metadata = TransformerBlockRegistry.get(type(block))
            except ValueError:
                raise NotImplementedError(
                    f"block class {type(block).__name__} of {type(model).__name__} is not in diffusers' "
                    "TransformerBlockRegistry; pass block_metadata to accel.register_model"
                ) from None
            blocks.append(Block(f"{list_name}.{i}", block, metadata))
    return blocks


def block_input(block: Block, name: str, args: tuple, kwargs: dict) -> Any:
    """An argument of a block call by its role ("hidden_states" / "encoder_hidden_states")."""
    meta = block.metadata
    arg = meta.hidden_states_argument_name if name == "hidden_states" else meta.encoder_hidden_states_argument_name
    return meta._get_parameter_from_args_kwargs(arg, args, kwargs)
