"""How CAM and APM enter a WanTransformer3DModel: diffusers hooks on its blocks, no edited classes.

Every block gets a CAM hook (block 0's also runs the CAM on the conditioning frames, with the time embedding and
text the block receives; blocks i < K add CAM's residual to their output) and every block's cross-attention
`attn2` an APM hook (it swaps the text context for APM's). The hooks read a `StreamingState` that the pipeline
fills for the chunk being generated and empties after the call: with nothing in it they pass everything through,
so the transformer is the plain base outside StreamingT2V's calls and for chunk 0.

The hooks go on before any cache (`accel.patch`, diffusers' `enable_cache`): a cache's hooks then wrap them, and a
block the cache skips skips its CAM residual too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook

from accel.diffusers_internals import remove_hook

from .modules import AppearancePreservationModule, ConditionalAttentionModule

CAM_HOOK = "accel_streaming_t2v_cam"
APM_HOOK = "accel_streaming_t2v_apm"


@dataclass
class StreamingState:
    """What the hooks read during one chunk; all None outside StreamingT2V's calls."""

    cam: ConditionalAttentionModule | None = None
    cam_input: torch.Tensor | None = None  # the conditioning frames (B, C, O, h, w), in the transformer's input form
    apm: AppearancePreservationModule | None = None
    image_tokens: torch.Tensor | None = None  # APM's tokens of the anchor frame (B, 16, D)
    cam_features: list[torch.Tensor] = field(default_factory=list)  # of the current transformer call (block 0 fills)

    def clear(self) -> None:
        self.cam = self.cam_input = self.apm = self.image_tokens = None
        self.cam_features = []


class CAMHook(ModelHook):
    """On base block `index`: (block 0) run the CAM on the conditioning frames; (index < K) add CAM's residual."""

    def __init__(self, state: StreamingState, index: int, block: torch.nn.Module):
        super().__init__()
        self.state, self.index = state, index
        self.signature = inspect.signature(type(block).forward)  # read once, not per call

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.state
        if state.cam_input is None or self.index >= state.cam.config.num_blocks:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.index == 0:
            inputs = self.signature.bind(module, *args, **kwargs).arguments
            state.cam_features = state.cam.encode(state.cam_input, inputs["encoder_hidden_states"], inputs["temb"])
        output = self.fn_ref.original_forward(*args, **kwargs)
        context_frames = state.cam_input.shape[2] // state.cam.config.patch_size[0]
        return state.cam.fuse(self.index, output, state.cam_features[self.index], context_frames)


class APMHook(ModelHook):
    """On cross-attention layer `layer`: the context becomes APM's mix of the text and the anchor's image tokens."""

    def __init__(self, state: StreamingState, layer: int):
        super().__init__()
        self.state, self.layer = state, layer

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.state.image_tokens is None:
            return args, kwargs
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = self._context(kwargs["encoder_hidden_states"])
        else:  # WanTransformerBlock calls attn2(hidden_states, encoder_hidden_states, None, None)
            args = (args[0], self._context(args[1]), *args[2:])
        return args, kwargs

    def _context(self, text: torch.Tensor) -> torch.Tensor:
        return self.state.apm.context(self.layer, text, self.state.image_tokens)


def hooks_installed(transformer: WanTransformer3DModel, state: StreamingState) -> bool:
    """Whether every block of `transformer` carries the hooks that read `state`."""
    for block in transformer.blocks:
        cam = getattr(block, "_diffusers_hook", None) and block._diffusers_hook.get_hook(CAM_HOOK)
        apm = getattr(block.attn2, "_diffusers_hook", None) and block.attn2._diffusers_hook.get_hook(APM_HOOK)
        if not cam or not apm or cam.state is not state or apm.state is not state:
            return False
    return True


def install_hooks(transformer: WanTransformer3DModel, state: StreamingState) -> None:
    """Put the CAM and APM hooks reading `state` on every block of `transformer` (replacing those of an earlier
    StreamingT2V pipeline on the same transformer). Refuses a transformer whose blocks already carry other hooks:
    those would run inside ours (a cache's skipped block would still get its CAM residual)."""
    for name in (CAM_HOOK, APM_HOOK):
        remove_hook(transformer, name)
    foreign = sorted({name for block in transformer.blocks for module in (block, block.attn2)
                      for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})})
    if foreign:
        raise RuntimeError(
            f"StreamingT2VPipeline: the transformer's blocks already carry hooks {foreign} (accel.patch, a diffusers "
            "cache or offloading): build the StreamingT2VPipeline on the plain transformer first, then apply them "
            "to the StreamingT2VPipeline")
    for index, block in enumerate(transformer.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(CAMHook(state, index, block), CAM_HOOK)
        HookRegistry.check_if_exists_or_initialize(block.attn2).register_hook(APMHook(state, index), APM_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
