"""StreamingT2VPipeline: videos of any length from a text-to-video Wan, chunk by chunk, with CAM and APM memories.

Chunk 0 is the base's own generation of F frames. Every later chunk of F frames is generated with CAM fed the last
O frames of the previous chunk, and APM the anchor (the first frame of chunk 0); its first O frames, which overlap
the previous chunk, are dropped: F + k (F - O) frames in all (the paper: F = 16, O = 8). Every chunk starts from
the same initial noise. F and O count the transformer's frames (latent frames): video frames for a pixel-space base
(no VAE, as the shipped shapes-video), and 1 + 4 (L - 1) video frames for L latent frames through Wan's VAE.

Finished chunks stream to `callback_on_chunk_end` and to an mp4 (written beside `output_path` and renamed into
place when complete, removed on error), so a long video never has to sit in memory whole; memory is that of one
chunk whatever the length. `check_inputs` refuses bad arguments before any work.

The base's components are those of WanPipeline or of the shipped ShapesVideoPipeline (transformer, scheduler, text
encoder and tokenizer, optional VAE), plus `cam` and the optional `apm`; `from_base` builds untrained ones for a base
pipeline. APM's image encoder is not a saved component: it is loaded from `ACCEL_CLIP=ARCH:PATH` (see
`image_encoder.py`) or passed as `image_encoder`. Guidance is on the text only: both CFG branches see the same
conditioning frames and anchor.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from ..checks import (
    OUTPUT_TYPES, check_bool, check_callback, check_choice, check_generator, check_int, check_latents,
    check_output_path, check_real, check_step_count, load_checked,
)
from ..shapes.models import with_positions
from ..video_io import StreamingMp4Writer
from .hooks import StreamingState, hooks_installed, install_hooks
from .image_encoder import ENV_VAR, ClipImageEncoder, load_image_encoder
from .modules import AppearancePreservationModule, ConditionalAttentionModule

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's text length; a shorter tokenizer's model_max_length caps it
# How a chunk after the first sees the previous one: through the memories (CAM, and APM where on), or, as the
# training-free baseline, by replacement: its first O frames pinned at every step to the previous chunk's last O
# frames, noised to the step's level (inpainting as SDEdit does it), the memories off.
CONDITIONINGS = ("memory", "replace")


@dataclass
class StreamingT2VOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor | list | None  # when return_frames, as output_type says (np: (B, F, H, W, 3))
    path: str | None  # the mp4, when output_path was given
    num_chunks: int


def check_base(owner: str, transformer, vae) -> None:
    """A text-to-video Wan, and a VAE that makes video of its latents (Wan's) or none (a pixel-space base)."""
    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"{owner}: the base must be a text-to-video model, a WanTransformer3DModel; got "
                        f"{type(transformer).__name__}")
    if transformer.config.image_dim is not None or transformer.config.added_kv_proj_dim is not None:
        raise TypeError(f"{owner}: the base must be a text-to-video Wan; this WanTransformer3DModel is an image-to-video "
                        f"one (image_dim={transformer.config.image_dim}, "
                        f"added_kv_proj_dim={transformer.config.added_kv_proj_dim})")
    if vae is not None and not isinstance(vae, AutoencoderKLWan):
        raise TypeError(f"{owner}: vae must be an AutoencoderKLWan (a video VAE) or None (a pixel-space base), got "
                        f"{type(vae).__name__}")
    if vae is None and transformer.config.out_channels != 3:
        raise ValueError(f"{owner}: without a VAE the transformer's outputs are the RGB frames, so it must return 3 "
                         f"channels; it returns {transformer.config.out_channels}: give the pipeline its VAE")


def check_memories(owner: str, transformer: WanTransformer3DModel, cam, apm) -> None:
    """CAM and APM built for this base (from_base builds them so)."""
    if not isinstance(cam, ConditionalAttentionModule):
        raise TypeError(f"{owner}: cam must be a ConditionalAttentionModule (ConditionalAttentionModule.from_base), "
                        f"got {type(cam).__name__}")
    c = transformer.config
    expected = dict(in_channels=c.in_channels, patch_size=tuple(c.patch_size), num_attention_heads=c.num_attention_heads,
                    attention_head_dim=c.attention_head_dim)
    got = dict(in_channels=cam.config.in_channels, patch_size=tuple(cam.config.patch_size),
               num_attention_heads=cam.config.num_attention_heads, attention_head_dim=cam.config.attention_head_dim)
    if got != expected or cam.config.num_blocks > len(transformer.blocks):
        raise ValueError(f"{owner}: cam does not fit the transformer: cam has {got} and {cam.config.num_blocks} blocks, "
                         f"the transformer {expected} and {len(transformer.blocks)} blocks")
    if apm is None:
        return
    if not isinstance(apm, AppearancePreservationModule):
        raise TypeError(f"{owner}: apm must be an AppearancePreservationModule or None, got {type(apm).__name__}")
    width = c.num_attention_heads * c.attention_head_dim
    if apm.config.context_dim != width or apm.config.num_layers != len(transformer.blocks):
        raise ValueError(f"{owner}: apm does not fit the transformer: apm mixes contexts of width "
                         f"{apm.config.context_dim} in {apm.config.num_layers} layers, the transformer has width {width} "
                         f"and {len(transformer.blocks)} layers")


class StreamingT2VPipeline(DiffusionPipeline):
    """Long text-to-video on a Wan base with StreamingT2V's CAM (short-term) and APM (long-term) memories."""

    _optional_components = ["text_encoder", "tokenizer", "vae", "apm"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: WanTransformer3DModel, scheduler, cam: ConditionalAttentionModule,
                 text_encoder=None, tokenizer=None, vae: AutoencoderKLWan | None = None,
                 apm: AppearancePreservationModule | None = None, image_encoder: ClipImageEncoder | None = None):
        super().__init__()
        owner = type(self).__name__
        check_base(owner, transformer, vae)
        check_memories(owner, transformer, cam, apm)
        if image_encoder is not None and not isinstance(image_encoder, ClipImageEncoder):
            raise TypeError(f"{owner}: image_encoder must be a ClipImageEncoder (load_image_encoder) or None, got "
                            f"{type(image_encoder).__name__}")
        self.register_modules(transformer=transformer, scheduler=scheduler, cam=cam, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae, apm=apm)
        self.image_encoder = image_encoder  # not a saved component: open_clip models have no save_pretrained
        self.video_processor = VideoProcessor(vae_scale_factor=1)
        self._state = StreamingState()
        install_hooks(transformer, self._state)

    @classmethod
    def from_base(cls, base: DiffusionPipeline, num_cam_blocks: int | None = None, image_embed_dim: int | None = None,
                  image_encoder: ClipImageEncoder | None = None,
                  text_tokens: int | None = None) -> "StreamingT2VPipeline":
        """A StreamingT2V pipeline on a base pipeline's components (WanPipeline, ShapesVideoPipeline) with untrained
        memories: a CAM copying the first `num_cam_blocks` blocks (default half of them, as the paper's copy of the
        UNet encoder), and an APM when `image_encoder` or `image_embed_dim` is given, over `text_tokens` text tokens
        (default: the length prompts are padded to). Untrained, they leave the base's generation unchanged. The
        components are shared with `base`, whose transformer then carries the (idle outside calls) hooks."""
        owner = f"{cls.__name__}.from_base"
        transformer = getattr(base, "transformer", None)
        check_base(owner, transformer, getattr(base, "vae", None))
        num_cam_blocks = max(1, len(transformer.blocks) // 2) if num_cam_blocks is None else num_cam_blocks
        cam = ConditionalAttentionModule.from_base(transformer, num_cam_blocks)
        if image_encoder is not None:
            if image_embed_dim not in (None, image_encoder.embed_dim):
                raise ValueError(f"{owner}: image_embed_dim={image_embed_dim} disagrees with the image encoder's "
                                 f"embeddings ({image_encoder.embed_dim}); leave it out")
            image_embed_dim = image_encoder.embed_dim
        tokenizer = getattr(base, "tokenizer", None)
        apm = None
        if image_embed_dim is not None:
            text_tokens = _text_length(tokenizer, MAX_SEQUENCE_LENGTH) if text_tokens is None else text_tokens
            apm = AppearancePreservationModule.from_base(transformer, image_embed_dim, text_tokens)
        return cls(transformer=transformer, scheduler=base.scheduler, cam=cam,
                   text_encoder=getattr(base, "text_encoder", None), tokenizer=tokenizer, vae=getattr(base, "vae", None),
                   apm=apm, image_encoder=image_encoder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, with `dtype` also taken by name and the folder's configs checked against its weights."""
        parent = super()
        return load_checked(cls, pretrained_model_name_or_path, kwargs,
                            lambda folder, kw: parent.from_pretrained(folder, **kw))

    @property
    def vae_scale_factor_temporal(self) -> int:
        return 2 ** sum(self.vae.config.temperal_downsample) if self.vae is not None else 1

    @property
    def vae_scale_factor_spatial(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample) if self.vae is not None else 1

    def frame_count(self, num_chunks: int, chunk_frames: int = 16, overlap_frames: int = 8) -> int:
        """Video frames of `num_chunks` chunks: L = F + (num_chunks - 1)(F - O) latent frames, decoded."""
        latent_frames = chunk_frames + (num_chunks - 1) * (chunk_frames - overlap_frames)
        return 1 + self.vae_scale_factor_temporal * (latent_frames - 1)

    # Checks ----------------------------------------------------------------------------------------------------------

    def _check_prompt(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
        """Returns the batch size."""
        owner = type(self).__name__
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(f"{owner}: give exactly one of prompt and prompt_embeds")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError(f"{owner}: prompt must be a str or a non-empty list of str, got {prompt!r}")
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError(f"{owner}: this pipeline has no text encoder or tokenizer: pass prompt_embeds")
        if negative_prompt is not None:
            if not isinstance(negative_prompt, str):
                raise TypeError(f"{owner}: negative_prompt must be a str or None, got {negative_prompt!r}")
            if negative_prompt_embeds is not None or self.text_encoder is None:
                raise ValueError(f"{owner}: negative_prompt needs the text encoder and no negative_prompt_embeds")
        width = self.transformer.config.text_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3
                                       or embeds.shape[-1] != width):
                raise ValueError(f"{owner}: {name} must be a tensor (batch, tokens, {width}), got "
                                 f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
        if negative_prompt_embeds is not None and (prompt_embeds is None
                                                   or negative_prompt_embeds.shape != prompt_embeds.shape):
            raise ValueError(f"{owner}: negative_prompt_embeds must come with prompt_embeds of the same shape")
        return prompt_embeds.shape[0] if prompt_embeds is not None else 1 if isinstance(prompt, str) else len(prompt)

    def _check_chunking(self, num_chunks, num_frames, chunk_frames, overlap_frames) -> int:
        """F, O and the length; returns the number of chunks."""
        owner = type(self).__name__
        check_int(owner, "chunk_frames", chunk_frames, minimum=1)
        check_int(owner, "overlap_frames", overlap_frames, minimum=1)
        if overlap_frames >= chunk_frames:
            raise ValueError(f"{owner}: overlap_frames must be smaller than chunk_frames ({chunk_frames}): every chunk "
                             f"must add new frames; got overlap_frames={overlap_frames}")
        p_t = self.transformer.config.patch_size[0]
        if chunk_frames % p_t or overlap_frames % p_t:
            raise ValueError(f"{owner}: chunk_frames and overlap_frames must be multiples of the patch size in time "
                             f"({p_t}), got {chunk_frames} and {overlap_frames}")
        if chunk_frames // p_t > self.transformer.config.rope_max_seq_len:
            raise ValueError(f"{owner}: chunk_frames={chunk_frames} is past the transformer's RoPE table "
                             f"({self.transformer.config.rope_max_seq_len} frame positions)")
        if (num_chunks is None) == (num_frames is None):
            raise ValueError(f"{owner}: give exactly one of num_chunks and num_frames, got num_chunks={num_chunks!r} "
                             f"and num_frames={num_frames!r}")
        if num_chunks is not None:
            return check_int(owner, "num_chunks", num_chunks, minimum=1)
        check_int(owner, "num_frames", num_frames, minimum=1)
        stride = chunk_frames - overlap_frames
        latent_frames, rest = divmod(num_frames - 1, self.vae_scale_factor_temporal)
        latent_frames += 1
        if rest or latent_frames < chunk_frames or (latent_frames - chunk_frames) % stride:
            form = "F + k (F - O)" if self.vae_scale_factor_temporal == 1 else (
                f"1 + {self.vae_scale_factor_temporal} (L - 1) for L = F + k (F - O) latent frames")
            examples = ", ".join(str(self.frame_count(n, chunk_frames, overlap_frames)) for n in range(1, 5))
            raise ValueError(f"{owner}: num_frames must be {form} = {examples}, ... (chunks of F={chunk_frames} frames "
                             f"overlapping by O={overlap_frames}), got {num_frames}")
        return (latent_frames - chunk_frames) // stride + 1

    def _check_size(self, height, width) -> None:
        owner = type(self).__name__
        _, p_h, p_w = self.transformer.config.patch_size
        for name, value, patch in (("height", height, p_h), ("width", width, p_w)):
            unit = self.vae_scale_factor_spatial * patch
            check_int(owner, name, value, minimum=unit)
            if value % unit:
                raise ValueError(f"{owner}: {name} must be a multiple of {unit} (the VAE's factor times the patch size), "
                                 f"got {value}")
            if value // unit > self.transformer.config.rope_max_seq_len:
                raise ValueError(f"{owner}: {name}={value} is past the transformer's RoPE table "
                                 f"({self.transformer.config.rope_max_seq_len} positions of {unit} pixels)")

    def _check_apm(self, use_apm, text_length: int) -> bool:
        """Whether APM runs; when it does, its text length and an image encoder of its width (loaded from ACCEL_CLIP
        when none is set). Returns it."""
        owner = type(self).__name__
        if use_apm is not None:
            check_bool(owner, "use_apm", use_apm)
        if use_apm is None:
            use_apm = self.apm is not None
        if not use_apm:
            return False
        if self.apm is None:
            raise ValueError(f"{owner}: use_apm=True but this pipeline has no apm module (from_base with an "
                             "image_encoder or image_embed_dim builds one)")
        if text_length != self.apm.config.text_tokens:
            raise ValueError(f"{owner}: APM mixes {self.apm.config.text_tokens} text tokens; the prompts give "
                             f"{text_length} (max_sequence_length or prompt_embeds' length must be "
                             f"{self.apm.config.text_tokens})")
        if self.image_encoder is None:
            try:
                self.image_encoder = load_image_encoder()
            except ValueError as error:
                raise ValueError(f"{owner}: APM reads the anchor frame with an open_clip image encoder, and none is "
                                 f"loaded ({error}). Set {ENV_VAR}=ARCH:PATH (an open_clip architecture and a local "
                                 "checkpoint), pass image_encoder= to the pipeline, or call with use_apm=False.") from None
        if self.image_encoder.embed_dim != self.apm.config.image_embed_dim:
            raise ValueError(f"{owner}: the image encoder gives {self.image_encoder.embed_dim}-d embeddings; the apm "
                             f"module takes {self.apm.config.image_embed_dim}-d ones ({ENV_VAR} names another model?)")
        return True

    def check_inputs(self, prompt, negative_prompt, num_chunks, num_frames, chunk_frames, overlap_frames, height, width,
                     num_inference_steps, guidance_scale, use_apm, generator, latents, prompt_embeds,
                     negative_prompt_embeds, output_type, return_dict, output_path, fps, return_frames,
                     callback_on_chunk_end, callback_on_step_end, callback_on_step_end_tensor_inputs,
                     max_sequence_length, conditioning="memory") -> tuple[int, bool]:
        """Refuses bad arguments before any work (an mp4 that could not be written, and APM without its image
        encoder, included); returns the number of chunks and whether APM runs."""
        owner = type(self).__name__
        check_base(owner, self.transformer, self.vae)
        check_memories(owner, self.transformer, self.cam, self.apm)
        batch_size = self._check_prompt(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        chunks = self._check_chunking(num_chunks, num_frames, chunk_frames, overlap_frames)
        self._check_size(height, width)
        check_step_count(owner, num_inference_steps)
        check_real(owner, "guidance_scale", guidance_scale, minimum=0.0)
        check_generator(owner, generator, batch_size)
        check_latents(owner, latents, self._latent_shape(batch_size, chunk_frames, height, width))
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
        text_length = (prompt_embeds.shape[1] if prompt_embeds is not None
                       else _text_length(self.tokenizer, max_sequence_length))
        check_choice(owner, "conditioning", conditioning, CONDITIONINGS)
        if conditioning == "replace":
            self._check_replacement(use_apm)
            return chunks, False
        return chunks, self._check_apm(use_apm, text_length)

    def _check_replacement(self, use_apm) -> None:
        """Replacement conditioning: memories off, and a scheduler whose noise levels say how to re-noise the frames."""
        owner = type(self).__name__
        if use_apm:
            raise ValueError(f"{owner}: conditioning='replace' runs without the memories; use_apm=True asks for APM")
        if getattr(self.scheduler, "sigmas", None) is None:
            raise ValueError(f"{owner}: conditioning='replace' re-noises frames at the scheduler's noise levels, and "
                             f"{type(self.scheduler).__name__} has no `sigmas` (a flow-matching scheduler has them)")

    @contextlib.contextmanager
    def conditioned(self, cam_input: torch.Tensor, image_tokens: torch.Tensor | None = None):
        """The transformer's calls inside see CAM fed `cam_input` (the conditioning frames in the transformer's input
        form, `_transformer_input`) and, with `image_tokens` (APM's tokens of the anchor), APM: the conditioning of
        a later chunk, for training the memories on the frozen base."""
        if not hooks_installed(self.transformer, self._state):
            install_hooks(self.transformer, self._state)
        state = self._state
        state.cam, state.cam_input = self.cam, cam_input
        state.apm, state.image_tokens = (self.apm, image_tokens) if image_tokens is not None else (None, None)
        try:
            yield
        finally:
            state.clear()

    # Generation ------------------------------------------------------------------------------------------------------

    def _latent_shape(self, batch_size: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        s = self.vae_scale_factor_spatial
        return batch_size, self.transformer.config.out_channels, frames, height // s, width // s

    def _transformer_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents and, for a transformer that reads more channels than it returns, the shapes models' position
        channels (identity for Wan)."""
        return with_positions(self.transformer, latents)

    def _encode_text(self, prompts: list[str], max_sequence_length: int, device) -> torch.Tensor:
        """Text embeddings padded to a fixed length, the padding zeroed as WanPipeline pads them."""
        length = _text_length(self.tokenizer, max_sequence_length)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    def encode_prompt(self, prompt, negative_prompt, do_classifier_free_guidance: bool, prompt_embeds,
                      negative_prompt_embeds, max_sequence_length: int,
                      device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) in the transformer's dtype; uncond (when guiding) from negative_prompt (default ""), as long
        as cond, or zeros without a text encoder (what "" encodes to, its padding zeroed)."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self._encode_text(prompts, max_sequence_length, device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if self.text_encoder is not None:
                negative = [negative_prompt or ""] * prompt_embeds.shape[0]
                negative_prompt_embeds = self._encode_text(negative, prompt_embeds.shape[1], device)
            else:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        dtype = self.transformer.dtype
        uncond = negative_prompt_embeds.to(device, dtype) if do_classifier_free_guidance else None
        return prompt_embeds.to(device, dtype), uncond

    def _denoise_chunk(self, noise, cond, uncond, guidance_scale: float, num_inference_steps: int,
                       step_end: Callable, pinned: torch.Tensor | None = None) -> torch.Tensor:
        """The base's denoising loop (WanPipeline's): the scheduler's steps, CFG branches in cache contexts. With
        `pinned` (replacement conditioning), the chunk's first frames are those clean frames noised to each step's
        level with the chunk's own noise (flow matching: x_t = (1 - sigma) x0 + sigma noise)."""
        self.scheduler.set_timesteps(num_inference_steps, device=noise.device)
        timesteps = self.scheduler.timesteps
        latents = noise
        pin = _pinning(pinned, noise, self.scheduler.sigmas)
        latents = pin(0, latents)
        for i, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0])
            model_input = self._transformer_input(latents)
            context = dict(step_index=i, num_inference_steps=len(timesteps))
            with self.transformer.cache_context("cond", **context):
                velocity = self.transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=cond,
                                            return_dict=False)[0]
            if uncond is not None:
                with self.transformer.cache_context("uncond", **context):
                    v_uncond = self.transformer(hidden_states=model_input, timestep=timestep,
                                                encoder_hidden_states=uncond, return_dict=False)[0]
                velocity = v_uncond + guidance_scale * (velocity - v_uncond)
            latents = step_end(i, t, pin(i + 1, self.scheduler.step(velocity, t, latents, return_dict=False)[0]))
        return latents

    def _step_end(self, bar, first_step: int, callback: Callable | None, tensor_inputs) -> Callable:
        """What follows each denoising step of a chunk: the progress bar and diffusers' `callback_on_step_end`,
        which may replace the latents."""
        def step_end(i: int, t, latents: torch.Tensor) -> torch.Tensor:
            bar.update()
            if callback is None:
                return latents
            local = {"latents": latents}
            outputs = callback(self, first_step + i, t, {k: local[k] for k in tensor_inputs}) or {}
            return outputs.pop("latents", latents)

        return step_end

    def _stream(self):
        """Wan's VAE decoder carrying its causal cache across chunks (None for a pixel-space base)."""
        if self.vae is None:
            return None
        from ..long_sana_video.decoding import StreamingWanDecoder  # imported here: it pulls in the Triton kernels

        return StreamingWanDecoder(self.vae)

    def _decode(self, latents: torch.Tensor, stream) -> np.ndarray:
        """Consecutive latent frames -> video frames (B, F, H, W, 3) in [0, 1]."""
        if stream is None:  # pixel space: the latents are the frames in [-1, 1]
            video = latents
        else:
            config = self.vae.config
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            video = stream.decode((latents * std + mean).to(self.vae.dtype))
        return self.video_processor.postprocess_video(video.float(), output_type="np")

    def _anchor_tokens(self, frames: np.ndarray, device) -> torch.Tensor:
        """APM's tokens of the anchor, the first frame of the video (B, H, W, 3) in [0, 1]."""
        anchor = torch.from_numpy(np.ascontiguousarray(frames[:, 0])).permute(0, 3, 1, 2).to(device)
        return self.apm.image_tokens(self.image_encoder.to(device)(anchor))

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

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        num_chunks: int | None = None,
        num_frames: int | None = None,
        chunk_frames: int = 16,
        overlap_frames: int = 8,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        use_apm: bool | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        output_path: str | os.PathLike | None = None,
        fps: int = 16,
        return_frames: bool | None = None,
        callback_on_chunk_end: Callable[["StreamingT2VPipeline", int, np.ndarray], None] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        conditioning: str = "memory",
    ) -> StreamingT2VOutput | tuple:
        """Generates `num_chunks` chunks (or `num_frames` frames: F + k (F - O), through Wan's VAE 1 + 4 (L - 1) for L
        such latent frames) of `chunk_frames` = F frames overlapping by `overlap_frames` = O.

        `use_apm`: None runs APM when the pipeline has one; False switches it off (no image encoder needed).
        `latents`: the initial noise every chunk starts from (B, C, F, h, w); drawn from `generator` by default.
        Each finished chunk's new frames (np, (B, f, H, W, 3) in [0, 1]) go to `callback_on_chunk_end(pipe, chunk,
        frames)` and the first video's to the mp4 at `output_path`. `callback_on_step_end(pipe, step, t, tensors)` is
        diffusers' convention, `step` counting across chunks (chunk * num_inference_steps + i). `output_type` ("np",
        "pt", "pil" or "latent") shapes the returned `frames` (kept when `return_frames`, by default when there is
        no `output_path`); "latent" returns the latents (B, C, L, h, w). `return_dict=False` returns `(frames,)`.
        `conditioning`: "memory" (CAM and APM) or "replace", the training-free baseline: each later chunk's first O
        frames pinned to the previous chunk's last O frames, noised to each step's level; CAM and APM off.
        """
        chunks, apm_on = self.check_inputs(
            prompt=prompt, negative_prompt=negative_prompt, num_chunks=num_chunks, num_frames=num_frames,
            chunk_frames=chunk_frames, overlap_frames=overlap_frames, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, use_apm=use_apm,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, output_type=output_type, return_dict=return_dict,
            output_path=output_path, fps=fps, return_frames=return_frames, callback_on_chunk_end=callback_on_chunk_end,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, conditioning=conditioning,
        )
        if not hooks_installed(self.transformer, self._state):  # a transformer swapped in after construction
            install_hooks(self.transformer, self._state)
        return_frames = output_path is None if return_frames is None else return_frames
        device, dtype = self._execution_device, self.transformer.dtype
        cond, uncond = self.encode_prompt(prompt, negative_prompt, guidance_scale > 1, prompt_embeds,
                                          negative_prompt_embeds, max_sequence_length, device)
        shape = self._latent_shape(cond.shape[0], chunk_frames, height, width)
        noise = (latents.to(device, dtype) if latents is not None
                 else randn_tensor(shape, generator=generator, device=device, dtype=dtype))
        decode = output_path is not None or callback_on_chunk_end is not None or apm_on or (
            return_frames and output_type != "latent")
        state, kept, writer, stream = self._state, [], None, None
        try:
            writer = StreamingMp4Writer(output_path, fps) if output_path is not None else None
            stream = self._stream() if decode else None
            replace = conditioning == "replace"
            state.cam, state.apm = (None, None) if replace else (self.cam, self.apm if apm_on else None)
            pinned = None
            with self.progress_bar(total=chunks * num_inference_steps) as bar:
                for chunk in range(chunks):
                    # Each chunk is a denoising run of its own for caches: diffusers' (enable_cache) keep their state
                    # until reset, and would otherwise carry the previous chunk's into this one.
                    HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
                    bar.set_postfix(chunk=f"{chunk + 1}/{chunks}")
                    step_end = self._step_end(bar, chunk * num_inference_steps, callback_on_step_end,
                                              callback_on_step_end_tensor_inputs)
                    chunk_latents = self._denoise_chunk(noise.clone(), cond, uncond, guidance_scale,
                                                        num_inference_steps, step_end, pinned)
                    # The overlap repeats the previous chunk's last frames: only chunk 0 keeps its first O.
                    new = chunk_latents if chunk == 0 else chunk_latents[:, :, overlap_frames:]
                    frames = self._decode(new, stream) if decode else None
                    if chunk == 0 and apm_on:
                        state.image_tokens = self._anchor_tokens(frames, device)
                    if replace:
                        pinned = chunk_latents[:, :, -overlap_frames:]
                    else:
                        state.cam_input = self._transformer_input(chunk_latents[:, :, -overlap_frames:])
                    if writer:
                        writer.append(frames)
                    if callback_on_chunk_end is not None:
                        callback_on_chunk_end(self, chunk, frames)
                    if return_frames:
                        kept.append(new if output_type == "latent" else frames)
            path = writer.close() if writer else None
        finally:
            state.clear()
            if writer:
                writer.abort()
            if stream:
                stream.close()
        self.maybe_free_model_hooks()
        frames = self._frames_as(kept, output_type)
        return StreamingT2VOutput(frames=frames, path=path, num_chunks=chunks) if return_dict else (frames,)


def _pinning(pinned: torch.Tensor | None, noise: torch.Tensor, sigmas: torch.Tensor | None) -> Callable:
    """latents after `i` steps -> the same with their first frames set to `pinned` noised to sigmas[i] (identity
    without `pinned`)."""
    if pinned is None:
        return lambda i, latents: latents

    frames = pinned.shape[2]

    def pin(i: int, latents: torch.Tensor) -> torch.Tensor:
        sigma = sigmas[i].to(latents.device, latents.dtype)
        latents = latents.clone()
        latents[:, :, :frames] = (1 - sigma) * pinned + sigma * noise[:, :, :frames]
        return latents

    return pin


def _text_length(tokenizer, max_sequence_length: int) -> int:
    """The length prompts are padded to: max_sequence_length, capped by the tokenizer's own limit."""
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(max_sequence_length, limit) if isinstance(limit, int) else max_sequence_length


