"""The long-video shapes reference model: a block-causal SANA-Video in pixel space, generated chunk by chunk.

`ShapesLongVideoPipeline` is `LongSanaVideoPipeline` with the shapes text encoder in place of Gemma and no VAE
(pixels are the latents), sampled with Euler steps on the flow (the model is trained with plain flow matching,
not distilled to the released few-step schedule: `num_inference_steps` Euler steps, 20 by default). Everything else (memory per CFG branch, the t=0 pass that
writes the memory, streaming to a callback and an mp4, `check_inputs`, `accel.patch`) is the long pipeline's.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from ..checks import check_fixed_size
from ..long_sana_video import CausalSanaVideoTransformer3DModel, LongSanaVideoPipeline
from .text import VIDEO_CAPTIONS, check_captions, embed_captions

CHUNK_FRAMES = 4
SIZE = 32


def long_video_transformer(text_dim: int) -> CausalSanaVideoTransformer3DModel:
    """Pixel-space SANA-Video: chunks of 4 frames of 32x32x3 in patches of 1x4x4 (256 tokens), 6 blocks of width 192."""
    return CausalSanaVideoTransformer3DModel(
        in_channels=3, out_channels=3, num_attention_heads=6, attention_head_dim=32, num_layers=6,
        num_cross_attention_heads=6, cross_attention_head_dim=32, cross_attention_dim=192, caption_channels=text_dim,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 4, 4), qk_norm="rms_norm_across_heads", rope_max_seq_len=4096,
    )


def euler_timesteps(steps: int) -> tuple[float, ...]:
    """The flow-matching Euler schedule (shift 1): t = 1000 ... 1000 / steps, evenly spaced."""
    return tuple(float(t) for t in np.linspace(1000.0, 1000.0 / steps, steps))


class ShapesLongVideoPipeline(LongSanaVideoPipeline):
    """Videos of "a <colour> <shape> moving <direction>" of any length, 4 frames per chunk."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: CausalSanaVideoTransformer3DModel, text_encoder: UMT5EncoderModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: FlowMatchEulerDiscreteScheduler):
        DiffusionPipeline.__init__(self)  # SanaVideoPipeline's own __init__ wants a VAE
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.vae_scale_factor_temporal = self.vae_scale_factor_spatial = 1
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    def encode_prompt(self, prompt, do_classifier_free_guidance: bool, device=None, **unused):
        """(cond, mask, uncond, mask) as SanaVideoPipeline returns them; uncond is all zeros, as in training."""
        captions = check_captions(prompt, VIDEO_CAPTIONS)
        cond = embed_captions(self.tokenizer, self.text_encoder, captions, device).to(self.transformer.dtype)
        uncond = torch.zeros_like(cond) if do_classifier_free_guidance else None
        return cond, None, uncond, None

    def _timesteps(self, num_inference_steps: int) -> tuple[float, ...]:
        return euler_timesteps(num_inference_steps)

    def check_inputs(self, prompt, negative_prompt, chunk_frames, height, width, prompt_embeds,
                     negative_prompt_embeds, **kwargs) -> int:
        """The long pipeline's checks, for captions of the shapes vocabulary at 32x32 in chunks of 4 frames."""
        owner = type(self).__name__
        if negative_prompt or prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError(f"{owner}: the shapes model takes captions only: no negative_prompt, prompt_embeds or "
                             "negative_prompt_embeds")
        check_captions(prompt, VIDEO_CAPTIONS)
        check_fixed_size(owner, "height", height, SIZE)
        check_fixed_size(owner, "width", width, SIZE)
        if chunk_frames != CHUNK_FRAMES:
            raise ValueError(f"{owner}: chunk_frames must be {CHUNK_FRAMES} (the model's chunk), got {chunk_frames!r}")
        return super().check_inputs(prompt=prompt, negative_prompt=negative_prompt, chunk_frames=chunk_frames,
                                    height=height, width=width, prompt_embeds=prompt_embeds,
                                    negative_prompt_embeds=negative_prompt_embeds, **kwargs)

    def _decode(self, latents: torch.Tensor, stream=None) -> np.ndarray:
        return self.video_processor.postprocess_video(latents.float(), output_type="np")

    def _denoise_chunk(self, shape, timesteps, texts, masks, guidance_scale, memories, generator, step_end) -> torch.Tensor:
        """Deterministic Euler steps on the flow from t = timesteps[0] to 0."""
        latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        sigmas = [t / 1000.0 for t in timesteps] + [0.0]
        for i, t in enumerate(timesteps):
            velocity = self._flow(latents, t, texts, masks, guidance_scale, memories, i, len(timesteps))
            latents = step_end(i, t, latents + (sigmas[i + 1] - sigmas[i]) * velocity)
        return latents

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_chunks: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 20, guidance_scale: float = 4.0, height: int | None = None,
                 width: int | None = None, chunk_frames: int = CHUNK_FRAMES, **kwargs):
        """As LongSanaVideoPipeline, at 32x32 (`height` / `width`: None or 32) with chunks of 4 frames and
        `num_inference_steps` Euler steps per chunk."""
        return super().__call__(prompt, num_chunks=num_chunks, num_frames=num_frames, chunk_frames=chunk_frames,
                                height=SIZE if height is None else height, width=SIZE if width is None else width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)
