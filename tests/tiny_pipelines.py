"""Real diffusers pipelines around the tiny transformers, built offline: no text encoders (prompt embeddings
are passed instead) and tiny or no VAEs (latent outputs)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
    SanaPipeline,
    SanaVideoPipeline,
)

import tiny_models as tm
from accel.pipelines.tiny import tiny_wan_pipeline


def _kl_vae(latent_channels: int, **config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
        **config,
    ).eval()


def _embeds(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def wan():
    return tiny_wan_pipeline()


def dit():
    pipe = DiTPipeline(transformer=tm.dit(), vae=_kl_vae(4), scheduler=DDIMScheduler())
    return pipe, dict(class_labels=[3], guidance_scale=4.0, output_type="np")


def flux():
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(1, shift_factor=0.06, scaling_factor=1.5),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tm.flux())
    return pipe, dict(prompt_embeds=_embeds(1, 1, 5, 32), pooled_prompt_embeds=_embeds(2, 1, 32), height=8, width=8,
                      output_type="pt")


def _text(width: int) -> dict:
    """Prompt and negative embeddings with their masks (no text encoder needed)."""
    mask = torch.ones(1, 6, dtype=torch.long)
    return dict(prompt_embeds=_embeds(1, 1, 6, width), prompt_attention_mask=mask, negative_prompt=None,
                negative_prompt_embeds=_embeds(2, 1, 6, width), negative_prompt_attention_mask=mask,
                use_resolution_binning=False)


def pixart():
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=tm.pixart(),
                               scheduler=DDIMScheduler())
    return pipe, dict(**_text(32), height=8, width=8, guidance_scale=4.0, output_type="pt")


def sana():
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tm.sana(),
                        scheduler=FlowMatchEulerDiscreteScheduler())
    return pipe, dict(**_text(8), height=256, width=256, guidance_scale=4.5, output_type="latent")


def sana_video():
    pipe = SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tm.sana_video(),
                             scheduler=FlowMatchEulerDiscreteScheduler())
    return pipe, dict(**_text(16), height=64, width=64, frames=5, guidance_scale=6.0, output_type="latent")


PIPELINES = [wan, dit, flux, pixart, sana, sana_video]


def long_sana_video():
    """accel's LongSanaVideoPipeline on the tiny SANA-Video transformer's weights and a tiny Wan VAE, without text
    encoder (prompt embeddings are passed)."""
    from diffusers import AutoencoderKLWan

    from accel.pipelines import LongSanaVideoPipeline
    from accel.pipelines.long_sana_video import CausalSanaVideoTransformer3DModel

    reference = tm.sana_video()
    transformer = CausalSanaVideoTransformer3DModel.from_config(reference.config).eval()
    transformer.load_state_dict(reference.state_dict())
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = LongSanaVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_video():
    """A ShapesVideoPipeline at toy size, random-init: a pixel-space, text-conditioned Wan reading the shapes position
    channels (2 blocks of width 24, 32x32 frames in patches of 4) and the shapes text encoder at width 16."""
    from diffusers import WanTransformer3DModel

    from accel.pipelines.shapes.pipelines import ShapesVideoPipeline
    from accel.pipelines.shapes.text import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=12, in_channels=6, out_channels=3,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    pipe = ShapesVideoPipeline(transformer.eval(), build_text_encoder(16).eval(), build_tokenizer(),
                               FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
