"""LongSanaVideoPipeline: any number of chunks, generated one after another against a constant-size memory.

Same components as diffusers' SanaVideoPipeline (it loads from a local SANA-Video folder; the transformer is
loaded as `CausalSanaVideoTransformer3DModel`). Per chunk of latent frames: a few-step schedule (predict the
flow, convert to x0, re-noise to the next timestep), then one pass at t=0 on the finished chunk that writes the
memory. `num_inference_steps` steps follow SANA-Video's shifted flow schedule (`few_step_timesteps`): the default 4
is the released schedule (1000, 960, 889, 727); other counts are that curve sampled more or less densely (the
released model is distilled for 4), and `timesteps` takes any schedule. Each finished chunk is decoded (Wan's VAE keeps its temporal cache across chunks, so the frames are those of
the whole video decoded at once) and handed to the caller (`callback_on_chunk_end`) and to an mp4
(`output_path`, written to a temporary file and renamed at the end), so a long video never sits in memory whole.
`check_inputs` refuses bad arguments (an unwritable output path included) before any work.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLLTX2Video, AutoencoderKLWan, SanaVideoPipeline
from diffusers.hooks import HookRegistry
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..checks import (
    OUTPUT_TYPES, check_bool, check_callback, check_choice, check_generator, check_int, check_output_path, check_real,
    check_step_count, load_checked,
)
from ..video_io import StreamingMp4Writer
from .decoding import StreamingWanDecoder
from .transformer import CausalSanaVideoTransformer3DModel

logger = logging.getLogger("accel")

LONG_SANA_TIMESTEPS = (1000.0, 960.0, 889.0, 727.0)  # the released few-step schedule per chunk
SANA_VIDEO_SHIFT = 8.0  # the flow shift the released schedule follows
# The instruction SanaVideoPipeline puts before a prompt by default: prompts are encoded as it encodes them.
SANA_VIDEO_INSTRUCTION = inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default


def few_step_timesteps(steps: int, shift: float = SANA_VIDEO_SHIFT) -> tuple[float, ...]:
    """`steps` timesteps of the shifted flow schedule, t = 1000 s' with s' = shift s / (1 + (shift - 1) s) at
    s = 1, 1 - 1/steps, ..., 1/steps, rounded to whole timesteps: 4 steps give the released (1000, 960, 889, 727)."""
    s = 1.0 - np.arange(steps) / steps
    return tuple(float(round(1000.0 * shift * x / (1.0 + (shift - 1.0) * x))) for x in s)


@dataclass
class LongVideoOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor | list | None  # when return_frames, as output_type says (np: (B, F, H, W, 3))
    path: str | None  # the mp4, when output_path was given
    num_chunks: int


class LongSanaVideoPipeline(SanaVideoPipeline):
    """Block-causal long-video generation on SANA-Video's components."""

    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A local SANA-Video folder, its transformer as `CausalSanaVideoTransformer3DModel`; `dtype` also by name,
        and the folder's configs checked against its weights (`load_checked`)."""
        kwargs.setdefault("local_files_only", True)
        parent = super()

        def load(folder, kwargs):
            if "transformer" not in kwargs:
                dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
                if isinstance(dtype, dict):  # per component, as diffusers takes it
                    dtype = dtype.get("transformer", dtype.get("default"))
                loading = {k: kwargs[k] for k in ("local_files_only", "variant", "revision", "cache_dir", "use_safetensors")
                           if k in kwargs}
                kwargs["transformer"] = CausalSanaVideoTransformer3DModel.from_pretrained(
                    folder, subfolder="transformer", dtype=dtype, **loading)
            return parent.from_pretrained(folder, **kwargs)

        return load_checked(cls, pretrained_model_name_or_path, kwargs, load)

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
        if num_chunks is not None:
            return num_chunks
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        chunks = max(1, math.ceil(latent_frames / chunk_frames))
        if chunks * chunk_frames != latent_frames:
            logger.warning("num_frames=%d is %d latent frames: rounded to %d whole chunks of %d latent frames",
                           num_frames, latent_frames, chunks, chunk_frames)
        return chunks

    def _timesteps(self, num_inference_steps: int) -> tuple[float, ...]:
        """The schedule of `num_inference_steps` steps per chunk."""
        return few_step_timesteps(num_inference_steps)

    def _check_prompt(self, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                      negative_prompt_attention_mask) -> int:
        """diffusers' SanaVideoPipeline rules for prompts and embeddings; returns the batch size."""
        owner = type(self).__name__
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(f"{owner}: give exactly one of prompt and prompt_embeds")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError(f"{owner}: prompt must be a str or a non-empty list of str, got {prompt!r}")
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError(f"{owner}: this pipeline has no text encoder or tokenizer: pass prompt_embeds")
        if negative_prompt and negative_prompt_embeds is not None:
            raise ValueError(f"{owner}: give at most one of negative_prompt and negative_prompt_embeds")
        width = self.transformer.config.caption_channels
        for name, embeds, mask in (("prompt_embeds", prompt_embeds, prompt_attention_mask),
                                   ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
                raise ValueError(f"{owner}: {name} must be a tensor (batch, tokens, {width}), got "
                                 f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
            mask_name = name.replace("embeds", "attention_mask")
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"{owner}: {mask_name} must be a tensor of shape {tuple(embeds.shape[:2])} beside "
                                 f"{name}, got {tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask!r}")
        if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"{owner}: prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        return prompt_embeds.shape[0] if prompt_embeds is not None else 1 if isinstance(prompt, str) else len(prompt)

    def _check_timesteps(self, timesteps) -> None:
        owner = type(self).__name__
        valid = (isinstance(timesteps, (list, tuple)) and len(timesteps) > 0
                 and all(isinstance(t, numbers.Real) and not isinstance(t, bool) and 0 < t <= 1000 for t in timesteps)
                 and all(a > b for a, b in zip(timesteps, timesteps[1:])))
        if not valid:
            raise ValueError(f"{owner}: timesteps must be a non-empty list of decreasing numbers in (0, 1000] "
                             f"(t = 0 is the memory pass), got {timesteps!r}")

    def _check_length(self, num_chunks, num_frames, chunk_frames) -> int:
        """The number of chunks, within the transformer's RoPE table; returns it."""
        owner = type(self).__name__
        if (num_chunks is None) == (num_frames is None):
            raise ValueError(f"{owner}: give exactly one of num_chunks and num_frames, got num_chunks={num_chunks!r} "
                             f"and num_frames={num_frames!r}")
        if num_chunks is not None:
            check_int(owner, "num_chunks", num_chunks, minimum=1)
        else:
            check_int(owner, "num_frames", num_frames, minimum=1)
        check_int(owner, "chunk_frames", chunk_frames, minimum=1)
        p_t = self.transformer.config.patch_size[0]
        if chunk_frames % p_t:
            raise ValueError(f"{owner}: chunk_frames must be a multiple of the patch size in time ({p_t}), got {chunk_frames}")
        chunks = self._chunk_count(num_chunks, num_frames, chunk_frames)
        positions = chunks * chunk_frames // p_t
        if positions > self.transformer.config.rope_max_seq_len:
            raise ValueError(
                f"{owner}: {chunks} chunks of {chunk_frames} latent frames are {positions} frame positions, past the "
                f"model's RoPE table ({self.transformer.config.rope_max_seq_len}): generate fewer chunks or load the "
                "model with a larger rope_max_seq_len")
        return chunks

    def _check_size(self, height, width) -> None:
        owner = type(self).__name__
        unit = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            check_int(owner, name, value, minimum=unit)
            if value % unit:
                raise ValueError(f"{owner}: height and width must be multiples of {unit} (the VAE's factor times the "
                                 f"patch size), got {name}={value}")

    def check_inputs(self, prompt, negative_prompt, num_chunks, num_frames, chunk_frames, height, width,
                     num_inference_steps, timesteps, guidance_scale, keep_last_chunks, generator, prompt_embeds,
                     prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask, output_type,
                     return_dict, output_path, fps, return_frames, callback_on_chunk_end, callback_on_step_end,
                     callback_on_step_end_tensor_inputs, max_sequence_length) -> int:
        """Refuses bad arguments before any work (an mp4 that could not be written included); returns the number
        of chunks."""
        owner = type(self).__name__
        if not isinstance(self.transformer, CausalSanaVideoTransformer3DModel):
            raise TypeError(f"{owner} needs a CausalSanaVideoTransformer3DModel (from_pretrained loads one)")
        batch_size = self._check_prompt(prompt, negative_prompt, prompt_embeds, prompt_attention_mask,
                                        negative_prompt_embeds, negative_prompt_attention_mask)
        chunks = self._check_length(num_chunks, num_frames, chunk_frames)
        self._check_size(height, width)
        check_step_count(owner, num_inference_steps)
        if timesteps is not None:
            self._check_timesteps(timesteps)
        check_real(owner, "guidance_scale", guidance_scale, minimum=0.0)
        if keep_last_chunks is not None:
            check_int(owner, "keep_last_chunks", keep_last_chunks, minimum=1)
        check_generator(owner, generator, batch_size)
        check_choice(owner, "output_type", output_type, OUTPUT_TYPES)
        check_bool(owner, "return_dict", return_dict)
        check_output_path(owner, output_path)
        check_real(owner, "fps", fps, minimum=1)
        if return_frames is not None:
            check_bool(owner, "return_frames", return_frames)
        if callback_on_chunk_end is not None and not callable(callback_on_chunk_end):
            raise TypeError(f"{owner}: callback_on_chunk_end must be a callable or None, got {callback_on_chunk_end!r}")
        if return_frames is False and output_path is None and callback_on_chunk_end is None:
            raise ValueError(f"{owner}: return_frames=False with no output_path and no callback_on_chunk_end would "
                             "throw the video away")
        check_callback(owner, callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        check_int(owner, "max_sequence_length", max_sequence_length, minimum=1)
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
        num_inference_steps: int = 4,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 1.0,
        keep_last_chunks: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        output_path: str | os.PathLike | None = None,
        fps: int = 16,
        return_frames: bool | None = None,
        callback_on_chunk_end: Callable[["LongSanaVideoPipeline", int, np.ndarray], None] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = SANA_VIDEO_INSTRUCTION,
    ) -> LongVideoOutput | tuple:
        """Generates `num_chunks` chunks of `chunk_frames` latent frames (or enough for `num_frames` frames).

        `num_inference_steps` steps per chunk on `few_step_timesteps` (4: the released schedule), or the given
        `timesteps`; then the memory pass at t = 0. Each finished chunk's frames (np, (B, F, H, W, 3) in [0, 1]) go
        to `callback_on_chunk_end(pipe, chunk, frames)` and the first video's to the mp4 at `output_path`.
        `callback_on_step_end(pipe, step, t, tensors)` is diffusers' convention, `step` counting across chunks
        (chunk * steps + i). `output_type` ("np", "pt", "pil" or "latent") shapes the returned `frames` (kept when
        `return_frames`, by default when no `output_path`); "latent" returns the latents (B, C, T, h, w) and decodes
        only for the callback and the mp4. `return_dict=False` returns `(frames,)`.
        """
        chunks = self.check_inputs(
            prompt=prompt, negative_prompt=negative_prompt, num_chunks=num_chunks, num_frames=num_frames,
            chunk_frames=chunk_frames, height=height, width=width, num_inference_steps=num_inference_steps,
            timesteps=timesteps, guidance_scale=guidance_scale, keep_last_chunks=keep_last_chunks, generator=generator,
            prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
            negative_prompt_embeds=negative_prompt_embeds, negative_prompt_attention_mask=negative_prompt_attention_mask,
            output_type=output_type, return_dict=return_dict, output_path=output_path, fps=fps,
            return_frames=return_frames, callback_on_chunk_end=callback_on_chunk_end,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        timesteps = tuple(float(t) for t in timesteps) if timesteps is not None else self._timesteps(num_inference_steps)
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
        writer = StreamingMp4Writer(output_path, fps) if output_path is not None else None
        decode = writer is not None or callback_on_chunk_end is not None or (return_frames and output_type != "latent")
        stream = self._stream() if decode else None
        kept = []
        try:
            with self.progress_bar(total=chunks * (len(timesteps) + 1)) as bar:
                for chunk in range(chunks):
                    # Each chunk is a denoising run of its own for caches: diffusers' (enable_cache) keep their
                    # state until reset, and would otherwise skip blocks of a memory pass like an earlier one's.
                    HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
                    step_end = self._step_end(bar, chunk * len(timesteps), callback_on_step_end,
                                              callback_on_step_end_tensor_inputs)
                    clean = self._denoise_chunk(shape, timesteps, texts, masks, guidance_scale, memories, generator,
                                                step_end)
                    self._write_memory(clean, texts, masks, memories)
                    bar.update()
                    frames = self._decode(clean, stream) if decode else None
                    if writer:
                        writer.append(frames)
                    if callback_on_chunk_end is not None:
                        callback_on_chunk_end(self, chunk, frames)
                    if return_frames:
                        kept.append(clean if output_type == "latent" else frames)
            path = writer.close() if writer else None
        finally:
            if writer:
                writer.abort()
            if stream:
                stream.close()
        self.maybe_free_model_hooks()
        frames = self._frames_as(kept, output_type)
        return LongVideoOutput(frames=frames, path=path, num_chunks=chunks) if return_dict else (frames,)

    def _step_end(self, bar, first_step: int, callback: Callable | None, tensor_inputs) -> Callable:
        """What follows each denoising step of a chunk: the progress bar and diffusers' `callback_on_step_end`,
        which may replace the latents."""
        def step_end(i: int, t: float, latents: torch.Tensor) -> torch.Tensor:
            bar.update()
            if callback is None:
                return latents
            local = {"latents": latents}
            outputs = callback(self, first_step + i, t, {k: local[k] for k in tensor_inputs}) or {}
            return outputs.pop("latents", latents)

        return step_end

    @staticmethod
    def _frames_as(kept: list, output_type: str):
        """The kept chunks joined along time, as `output_type` says (np chunks are (B, F, H, W, 3) in [0, 1])."""
        if not kept:
            return None
        if output_type == "latent":
            return torch.cat(kept, dim=2)
        frames = np.concatenate(kept, axis=1)
        if output_type == "pt":  # (B, F, 3, H, W), as WanPipeline's "pt"
            return torch.from_numpy(frames).permute(0, 1, 4, 2, 3)
        if output_type == "pil":
            return [VaeImageProcessor.numpy_to_pil(video) for video in frames]
        return frames

    def _denoise_chunk(self, shape, timesteps, texts, masks, guidance_scale, memories, generator, step_end) -> torch.Tensor:
        device, dtype = self._execution_device, self.transformer.dtype
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        for i, t in enumerate(timesteps):
            sigma = t / 1000.0
            velocity = self._flow(latents, t, texts, masks, guidance_scale, memories, i, len(timesteps))
            latents = latents - sigma * velocity  # x0: flow matching, x_t = (1 - s) x0 + s noise, v = noise - x0
            if i + 1 < len(timesteps):  # re-noised to the next timestep
                nxt = timesteps[i + 1] / 1000.0
                latents = (1 - nxt) * latents + nxt * randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = step_end(i, t, latents)
        return latents
