"""What the caches need to know about a diffusers transformer: its blocks, in order, and its CFG batch layout.

Block inputs and outputs are described by diffusers' own `TransformerBlockRegistry` (which output index holds
the image hidden states, which the text tokens); this module adds the models' block lists and registers the
SANA block classes that diffusers does not.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import torch

from . import diffusers_internals as internals
from .diffusers_internals import TransformerBlockMetadata, TransformerBlockRegistry

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


_BUILTIN_SPECS: dict[str, ModelSpec] = {  # diffusers class name -> spec; resolved to the classes on first use
    "FluxTransformer2DModel": ModelSpec(("transformer_blocks", "single_transformer_blocks"), "flux"),
    "DiTTransformer2DModel": ModelSpec(("transformer_blocks",), "dit", _dit_cond_half),
    "WanTransformer3DModel": ModelSpec(("blocks",), "wan"),
    "SanaTransformer2DModel": ModelSpec(("transformer_blocks",), "sana"),
    "SanaVideoTransformer3DModel": ModelSpec(("transformer_blocks",), "sana_video"),
    "PixArtTransformer2DModel": ModelSpec(("transformer_blocks",), "pixart"),
}
_SPECS: dict[type, ModelSpec] = {}  # keyed by class, never by name: a user class may share a diffusers name

# Pipelines that batch CFG as [uncond, cond] and expose `do_classifier_free_guidance`.
COND_LAST_PIPELINES = ("SanaPipeline", "SanaSprintPipeline", "SanaVideoPipeline", "SanaImageToVideoPipeline")


def _specs() -> dict[type, ModelSpec]:
    if not _SPECS:
        _SPECS.update({getattr(diffusers, name): spec for name, spec in _BUILTIN_SPECS.items()})
    return _SPECS


def is_cond_last_pipeline(pipeline) -> bool:
    # The class itself, not its subclasses: accel's long-video pipelines derive from SanaVideoPipeline but run the
    # two branches as separate calls in cache contexts.
    return type(pipeline) in tuple(getattr(diffusers, name) for name in COND_LAST_PIPELINES)


def _register_sana_blocks() -> None:
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
    from diffusers.models.transformers.transformer_sana_video import SanaVideoTransformerBlock

    for cls in (SanaTransformerBlock, SanaVideoTransformerBlock):
        if not internals.block_is_registered(cls):
            TransformerBlockRegistry.register(cls, TransformerBlockMetadata(return_hidden_states_index=0))


def _check_registration(model_cls, block_lists, family, cond_half, block_metadata) -> None:
    from .cg_taylor import PRESETS

    if not (isinstance(model_cls, type) and issubclass(model_cls, torch.nn.Module)):
        raise TypeError(f"register_model: model_cls must be a class (a torch.nn.Module subclass), got {model_cls!r}")
    if isinstance(block_lists, str) or not isinstance(block_lists, (tuple, list)) or not block_lists or not all(
        isinstance(name, str) and name.isidentifier() for name in block_lists
    ):
        raise TypeError(f"register_model: block_lists must be a non-empty tuple of attribute names, got "
                        f"{block_lists!r} (one list: ({block_lists!r},))")
    if family not in PRESETS:
        raise ValueError(f"register_model: family must name a CG-Taylor preset ({', '.join(PRESETS)}), got {family!r}")
    if cond_half is not None and not callable(cond_half):
        raise TypeError(f"register_model: cond_half must be None or a callable (args, kwargs, model), got {cond_half!r}")
    for block_cls, metadata in (block_metadata or {}).items():
        if not isinstance(block_cls, type) or not isinstance(metadata, TransformerBlockMetadata):
            raise TypeError(f"register_model: block_metadata maps block classes to TransformerBlockMetadata, got "
                            f"{block_cls!r}: {metadata!r}")


def register_model(
    model_cls: type,
    block_lists: tuple[str, ...],
    family: str = "generic",
    cond_half: CondHalf | None = None,
    block_metadata: dict[type, TransformerBlockMetadata] | None = None,
) -> None:
    """Teach accel a transformer class it does not know.

    `block_lists` names its `nn.ModuleList`s of blocks in execution order; `family` picks the CG-Taylor preset;
    `block_metadata` describes, for block classes diffusers has not registered, which output index holds the hidden
    states (and the text tokens).
    """
    _check_registration(model_cls, block_lists, family, cond_half, block_metadata)
    for block_cls, metadata in (block_metadata or {}).items():
        TransformerBlockRegistry.register(block_cls, metadata)
    _specs()[model_cls] = ModelSpec(tuple(block_lists), family, cond_half)


def spec_for(model: torch.nn.Module) -> ModelSpec:
    specs = _specs()
    for cls in type(model).__mro__:
        if cls in specs:
            return specs[cls]
    known = ", ".join(sorted(cls.__name__ for cls in specs))
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
    positions: dict[str, int]  # forward's parameter names -> positional index, read once outside torch.compile


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
            blocks.append(Block(f"{list_name}.{i}", block, metadata, _positions(type(block))))
    return blocks


def _positions(block_cls: type) -> dict[str, int]:
    # Read here, eagerly: diffusers reads the signature on a hook's first call, which under torch.compile is a
    # graph break (Dynamo cannot trace inspect.signature).
    return {name: i for i, name in enumerate(list(inspect.signature(block_cls.forward).parameters)[1:])}


def block_input(block: Block, name: str, args: tuple, kwargs: dict) -> Any:
    """An argument of a block call by its role ("hidden_states" / "encoder_hidden_states")."""
    meta = block.metadata
    arg = meta.hidden_states_argument_name if name == "hidden_states" else meta.encoder_hidden_states_argument_name
    return kwargs[arg] if arg in kwargs else args[block.positions[arg]]
