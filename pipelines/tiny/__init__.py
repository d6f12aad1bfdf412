"""Tiny random-init diffusers pipelines, built offline: for tests and the patching demonstration only.

Random weights make noise, not pictures; they exercise the code paths of the real models at toy sizes.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel


def tiny_wan_transformer(layers: int = 3) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def tiny_wan_pipeline(layers: int = 3) -> tuple[WanPipeline, dict]:
    """A WanPipeline without text encoder (prompt embeddings are passed) and the keyword arguments of a call."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=tiny_wan_transformer(layers),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  height=16, width=16, num_frames=5, guidance_scale=5.0, output_type="pt")
    return pipe, kwargs
