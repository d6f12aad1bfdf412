"""Decoding a long video chunk by chunk exactly as Wan's VAE decodes it all at once.

AutoencoderKLWan's decoder is causal in time: it runs latent frame by latent frame, every temporal conv keeping the
last frames it saw in a cache; the first latent frame gives 1 video frame, every later one 4. `vae.decode` clears
that cache at each call, so decoding chunks separately would restart it at every chunk: 3 frames lost per chunk
and a visible seam. `StreamingWanDecoder` runs the VAE's own per-frame loop but keeps the cache across chunks.
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKLWan

from accel.diffusers_internals import wan_vae_unpatchify as unpatchify

logger = logging.getLogger("accel")


class StreamingWanDecoder:
    """`decode(chunk)` for consecutive chunks of latents (B, C, T, h, w), already denormalised; `close()` at the end."""

    def __init__(self, vae: AutoencoderKLWan):
        if vae.use_tiling:
            logger.warning("accel long video: decoding chunk by chunk without the VAE's tiling (its cache spans chunks)")
        self.vae = vae
        self.first = True
        vae.clear_cache()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if hasattr(vae, "_hf_hook") and hasattr(vae._hf_hook, "pre_forward"):  # model CPU offload, as `vae.decode` does
            vae._hf_hook.pre_forward(vae)
        x = vae.post_quant_conv(latents)  # kernel 1 in time: per frame
        frames = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                      first_chunk=self.first))
            self.first = False
        video = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        return video.clamp(-1.0, 1.0)

    def close(self) -> None:
        self.vae.clear_cache()
