"""LongSanaVideoPipeline: any number of chunks, generated one after another against a constant-size memory.

Same components as diffusers' SanaVideoPipeline (it loads from a local SANA-Video folder; the transformer is
loaded as `CausalSanaVideoTransformer3DModel`). Per chunk of latent frames: a few-step schedule (predict the
flow, convert to x0, re-noise to the next timestep), then one pass at t=0 on the finished chunk that writes the
memory. Each finished chunk is decoded (Wan's VAE keeps its temporal cache across chunks, so the frames are those of
the whole video decoded at once) and handed to the caller (`callback_on_chunk_end`) and to an mp4
(`output_path`, written to a temporary file and renamed at the end), so a long video never sits in memory whole.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKLLTX2Video, AutoencoderKLWan, SanaVideoPipeline
from diffusers.hooks import HookRegistry
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .decoding import StreamingWanDecoder
from .transformer import CausalSanaVideoTransformer3DModel

logger = logging.getLogger("accel")

LONG_SANA_TIMESTEPS = (1000.0, 960.0, 889.0, 727.0)  # the released few-step schedule per chunk
# The instruction SanaVideoPipeline puts before a prompt by default: prompts are encoded as it encodes them.
SANA_VIDEO_INSTRUCTION = inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default


@dataclass
class LongVideoOutput(BaseOutput):
    frames: np.ndarray | None  # (B, F, H, W, 3) in [0, 1], when return_frames
    path: str | None  # the mp4, when output_path was given
    num_chunks: int


class LongSanaVideoPipeline(SanaVideoPipeline):
    """Block-causal long-video generation on SANA-Video's components."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs.setdefault("local_files_only", True)
        if "transformer" not in kwargs:
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if isinstance(dtype, dict):  # per component, as diffusers takes it
                dtype = dtype.get("transformer", dtype.get("default"))
            loading = {k: kwargs[k] for k in ("local_files_only", "variant", "revision", "cache_dir", "use_safetensors")
                       if k in kwargs}
            kwargs["transformer"] = CausalSanaVideoTransformer3DModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="transformer", dtype=dtype, **loading)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _decode(self, latents: torch.Tensor, stream: StreamingWanDecoder | None) -> np.ndarray:
        """One chunk of latents -> frames (B, F, H, W, 3) in [0, 1]; through `stream` (Wan's VAE), the chunks
        together are exactly the frames of the whole video decoded at once."""
        latents = latents.to(self.vae.dtype)
        if isinstance(self.vae, AutoencoderKLWan):  # the latents' normalisation, undone as SanaVideoPipeline does
            mean, std = torch.tensor(self.vae.config.latents_mean), torch.tensor(self.vae.config.latents_std)
        elif isinstance(self.vae, AutoencoderKLLTX2Video):
            mean, std = self.vae.latents_mean, self.vae.latents_std
        else:
            mean, std = torch.zeros(latents.shape[1]), torch.ones(latents.shape[1])
        latents = latents * std.view(1, -1, 1, 1, 1).to(latents) + mean.view(1, -1, 1, 1, 1).to(latents)
        video = stream.decode(latents) if stream is not None else self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type="np")

    def _stream(self) -> StreamingWanDecoder | None:
        return StreamingWanDecoder(self.vae) if isinstance(getattr(self, "vae", None), AutoencoderKLWan) else None

    def _flow(self, latents, t: float, texts, masks, guidance_scale: float, memories, step: int, steps: int):
        """The guided velocity at t, each branch against its own memory, under diffusers' cache contexts."""
        timestep = torch.full((latents.shape[0],), t, device=latents.device)
        velocities = []
        for name, text, mask, memory in zip(("cond", "uncond"), texts, masks, memories):
            with self.transformer.cache_context(name, step_index=step, num_inference_steps=steps):
                velocities.append(self.transformer(latents, text, timestep, memory=memory, encoder_attention_mask=mask,
                                                   return_dict=False)[0])
        return velocities[1] + guidance_scale * (velocities[0] - velocities[1]) if len(velocities) == 2 else velocities[0]

    def _write_memory(self, clean, texts, masks, memories) -> None:
        timestep = torch.zeros(clean.shape[0], device=clean.device)
        # A one-step run in a context of its own per branch: caches compute it whole (step 0), and the chunk's
        # denoising and memory passes stay one generation for them (a second "memory" pass would start another).
        for name, text, mask, memory in zip(("cond", "uncond"), texts, masks, memories):
            with self.transformer.cache_context(f"{name}_memory", step_index=0, num_inference_steps=1):
                self.transformer(clean, text, timestep, memory=memory, write_memory=True, encoder_attention_mask=mask)

    def _chunk_count(self, num_chunks: int | None, num_frames: int | None, chunk_frames: int) -> int:
        if (num_chunks is None) == (num_frames is None):
            raise ValueError("give exactly one of num_chunks and num_frames")
        if num_chunks is not None:
            if num_chunks < 1:
                raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
            return num_chunks
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        chunks = max(1, math.ceil(latent_frames / chunk_frames))
        if chunks * chunk_frames != latent_frames:
            logger.warning("num_frames=%d is %d latent frames: rounded to %d whole chunks of %d latent frames",
                           num_frames, latent_frames, chunks, chunk_frames)
        return chunks

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str = "",
        num_chunks: int | None = None,
        num_frames: int | None = None,
        chunk_frames: int = 10,
        height: int = 480,
        width: int = 832,
        timesteps: tuple[float, ...] = LONG_SANA_TIMESTEPS,
        guidance_scale: float = 1.0,
        keep_last_chunks: int | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_path: str | None = None,
        fps: int = 16,
        return_frames: bool | None = None,
        callback_on_chunk_end: Callable[["LongSanaVideoPipeline", int, np.ndarray], None] | None = None,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = SANA_VIDEO_INSTRUCTION,
    ) -> LongVideoOutput:
        if not isinstance(self.transformer, CausalSanaVideoTransformer3DModel):
            raise TypeError("LongSanaVideoPipeline needs a CausalSanaVideoTransformer3DModel (from_pretrained loads one)")
        chunks = self._chunk_count(num_chunks, num_frames, chunk_frames)
        unit = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % unit or width % unit:
            raise ValueError(f"height and width must be multiples of {unit} (the VAE's factor times the patch size), "
                             f"got {height} x {width}")
        return_frames = output_path is None if return_frames is None else return_frames
        device = self._execution_device
        cfg = guidance_scale > 1
        cond, cond_mask, uncond, uncond_mask = self.encode_prompt(
            prompt, cfg, negative_prompt=negative_prompt, device=device, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask, max_sequence_length=max_sequence_length,
            complex_human_instruction=complex_human_instruction,
        )
        texts = [t.to(self.transformer.dtype) for t in ((cond, uncond) if cfg else (cond,))]
        masks = [cond_mask, uncond_mask] if cfg else [cond_mask]
        memories = [self.transformer.new_memory(keep_last_chunks) for _ in texts]
        shape = (cond.shape[0], self.transformer.config.in_channels, chunk_frames,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        writer = _Mp4Writer(output_path, fps) if output_path else None
        stream = self._stream()
        kept = []
        try:
            with self.progress_bar(total=chunks * (len(timesteps) + 1)) as bar:
                for chunk in range(chunks):
                    # Each chunk is a denoising run of its own for caches: diffusers' (enable_cache) keep their
                    # state until reset, and would otherwise skip blocks of a memory pass like an earlier one's.
                    HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
                    clean = self._denoise_chunk(shape, timesteps, texts, masks, guidance_scale, memories, generator, bar)
                    self._write_memory(clean, texts, masks, memories)
                    bar.update()
                    frames = self._decode(clean, stream)
                    if writer:
                        writer.append(frames)
                    if callback_on_chunk_end is not None:
                        callback_on_chunk_end(self, chunk, frames)
                    if return_frames:
                        kept.append(frames)
            path = writer.close() if writer else None
        finally:
            if writer:
                writer.abort()
            if stream:
                stream.close()
        self.maybe_free_model_hooks()
        return LongVideoOutput(frames=np.concatenate(kept, axis=1) if kept else None, path=path, num_chunks=chunks)

    def _denoise_chunk(self, shape, timesteps, texts, masks, guidance_scale, memories, generator, bar) -> torch.Tensor:
        device, dtype = self._execution_device, self.transformer.dtype
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        for i, t in enumerate(timesteps):
            sigma = t / 1000.0
            velocity = self._flow(latents, t, texts, masks, guidance_scale, memories, i, len(timesteps))
            clean = latents - sigma * velocity  # flow matching: x_t = (1 - s) x0 + s noise, v = noise - x0
            if i + 1 < len(timesteps):
                nxt = timesteps[i + 1] / 1000.0
                latents = (1 - nxt) * clean + nxt * randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            bar.update()
        return clean


class _Mp4Writer:
    """Frames appended chunk by chunk into `path + ".partial.mp4"`, renamed to `path` only when complete."""

    def __init__(self, path: str, fps: int):
        import imageio

        self.path, self.tmp = path, f"{path}.partial.mp4"
        self.writer = imageio.get_writer(self.tmp, fps=fps, macro_block_size=1)
        self.done = False

    def append(self, frames: np.ndarray) -> None:
        for frame in frames[0]:  # the first video of the batch
            self.writer.append_data((frame * 255).round().clip(0, 255).astype(np.uint8))

    def close(self) -> str:
        self.writer.close()
        os.replace(self.tmp, self.path)
        self.done = True
        return self.path

    def abort(self) -> None:
        """After an interruption: stop the encoder (it writes the file only then) and delete what it wrote."""
        if not self.done:
            self.writer.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
