"""Tiny random-init diffusers transformers (configs from diffusers' own tests) and the inputs of one step."""

from __future__ import annotations

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SanaVideoTransformer3DModel,
    WanTransformer3DModel,
)

from accel.pipelines.tiny import tiny_wan_transformer


def _seeded(build):
    def wrapper(*args, **kwargs):
        torch.manual_seed(0)
        return build(*args, **kwargs).eval()

    return wrapper


def wan(layers: int = 3) -> WanTransformer3DModel:
    return tiny_wan_transformer(layers)


@_seeded
def flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )


@_seeded
def dit(layers: int = 3) -> DiTTransformer2DModel:
    # num_embeds_ada_norm=1000: DiTPipeline labels the unconditional branch with class 1000.
    return DiTTransformer2DModel(
        in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=4, num_layers=layers,
        norm_type="ada_norm_zero", num_embeds_ada_norm=1000, patch_size=2, sample_size=8,
    )


@_seeded
def pixart() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )


@_seeded
def sana() -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=4, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32,
    )


@_seeded
def sana_video() -> SanaVideoTransformer3DModel:
    return SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def inputs(model: torch.nn.Module, batch: int = 1, seed: int = 0) -> dict:
    """Keyword inputs of one transformer call, without the timestep."""
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "WanTransformer3DModel":
        return {"hidden_states": r(batch, 4, 2, 8, 8), "encoder_hidden_states": r(batch, 6, 16)}
    if name == "FluxTransformer2DModel":
        h = w = 4
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1)
        return {
            "hidden_states": r(batch, h * w, 4), "encoder_hidden_states": r(batch, 5, 32),
            "pooled_projections": r(batch, 32), "img_ids": img_ids.reshape(-1, 3).float(),
            "txt_ids": torch.zeros(5, 3),
        }
    if name == "DiTTransformer2DModel":
        return {"hidden_states": r(batch, 4, 8, 8), "class_labels": torch.arange(batch) % 10}
    if name == "PixArtTransformer2DModel":
        return {
            "hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 32),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if name == "SanaTransformer2DModel":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 8)}
    if name == "SanaVideoTransformer3DModel":
        return {"hidden_states": r(batch, 16, 2, 8, 8), "encoder_hidden_states": r(batch, 6, 16)}
    raise KeyError(name)


def timestep(model: torch.nn.Module, t: float, batch: int = 1) -> torch.Tensor:
    scale = 1e-3 if type(model).__name__ == "FluxTransformer2DModel" else 1.0
    return torch.full((batch,), t * scale)
