"""The shapes reference pipelines: diffusers `DiffusionPipeline`s in pixel space, trained with flow matching.

Both follow WanPipeline's conventions: classifier-free guidance with the conditional and unconditional
transformer calls under `cache_context("cond")` / `("uncond")`, `num_inference_steps`, generators, a progress
bar, `callback_on_step_end`, `output_type` "pil" / "np" / "pt" / "latent" (pixels are the latents: the raw output in
[-1, 1]), `save_pretrained` / `from_pretrained`. `check_inputs` refuses bad arguments before any work, and
`from_pretrained` a folder whose configs and weights disagree.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from ..checks import (
    OUTPUT_TYPES, check_bool, check_callback, check_choice, check_fixed_size, check_generator, check_int, check_latents,
    check_real, check_step_count, load_checked,
)
from .models import NUM_CLASSES, ShapesDiTTransformer, with_positions
from .text import IMAGE_CAPTIONS, VIDEO_CAPTIONS, check_captions, embed_captions


class _FlowMatchingPipeline(DiffusionPipeline):
    """The denoising loop both pipelines share: Euler steps on the flow, CFG with the branches in cache contexts."""

    _callback_tensor_inputs = ["latents"]
    SIZE = 32  # pixels: both models make 32x32 frames only

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, with `dtype` also taken by name and the folder's configs checked against its weights."""
        parent = super()
        return load_checked(cls, pretrained_model_name_or_path, kwargs, lambda folder, kw: parent.from_pretrained(folder, **kw))

    def _check_sampling(self, num_inference_steps, guidance_scale, batch_size: int, generator, output_type, return_dict,
                        callback_on_step_end, callback_on_step_end_tensor_inputs) -> None:
        """The arguments both pipelines take alike."""
        owner = type(self).__name__
        check_step_count(owner, num_inference_steps)
        check_real(owner, "guidance_scale", guidance_scale, minimum=0.0)
        check_generator(owner, generator, batch_size)
        check_choice(owner, "output_type", output_type, OUTPUT_TYPES)
        check_bool(owner, "return_dict", return_dict)
        check_callback(owner, callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

    def _transformer_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def _denoise(self, latents, cond: dict, uncond: dict, num_inference_steps: int, guidance_scale: float,
                 callback_on_step_end: Callable | None, callback_tensor_inputs: list[str]) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                timestep = t.expand(latents.shape[0])
                context = {"step_index": i, "num_inference_steps": len(timesteps)}
                model_input = self._transformer_input(latents)
                with self.transformer.cache_context("cond", **context):
                    velocity = self.transformer(hidden_states=model_input, timestep=timestep, **cond, return_dict=False)[0]
                if guidance_scale > 1:
                    with self.transformer.cache_context("uncond", **context):
                        v_uncond = self.transformer(hidden_states=model_input, timestep=timestep, **uncond, return_dict=False)[0]
                    velocity = v_uncond + guidance_scale * (velocity - v_uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        self.maybe_free_model_hooks()
        return latents


class ShapesImagePipeline(_FlowMatchingPipeline):
    """32x32 images of "a <colour> <shape>": a class-conditional DiT in pixel space."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: ShapesDiTTransformer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.transformer.config.sample_size
        return batch_size, self.transformer.config.in_channels, size, size

    def check_inputs(self, prompt, num_inference_steps, guidance_scale, num_images_per_prompt, height, width, generator,
                     latents, output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs) -> list[str]:
        """Refuses bad arguments before any work; returns the normalised captions."""
        owner = type(self).__name__
        captions = check_captions(prompt, IMAGE_CAPTIONS)
        check_int(owner, "num_images_per_prompt", num_images_per_prompt, minimum=1)
        batch_size = len(captions) * num_images_per_prompt
        check_fixed_size(owner, "height", height, self.transformer.config.sample_size)
        check_fixed_size(owner, "width", width, self.transformer.config.sample_size)
        check_latents(owner, latents, self._latent_shape(batch_size))
        self._check_sampling(num_inference_steps, guidance_scale, batch_size, generator, output_type, return_dict,
                             callback_on_step_end, callback_on_step_end_tensor_inputs)
        return captions

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] = ("latents",)):
        """`height` / `width`: None or the model's size (32). `output_type` "latent": the raw (B, 3, 32, 32) in [-1, 1]."""
        captions = self.check_inputs(prompt, num_inference_steps, guidance_scale, num_images_per_prompt, height, width,
                                     generator, latents, output_type, return_dict, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs)
        device, dtype = self._execution_device, self.transformer.dtype
        labels = torch.tensor([IMAGE_CAPTIONS[c] for c in captions], device=device).repeat_interleave(num_images_per_prompt)
        shape = self._latent_shape(labels.shape[0])
        latents = (latents.to(device, dtype) if latents is not None
                   else randn_tensor(shape, generator=generator, device=device, dtype=dtype))
        null = torch.full_like(labels, NUM_CLASSES)  # the class-dropout label the model learned as "unconditional"
        images = self._denoise(latents, {"class_labels": labels}, {"class_labels": null}, num_inference_steps,
                               guidance_scale, callback_on_step_end, list(callback_on_step_end_tensor_inputs))
        images = self.image_processor.postprocess(images.float(), output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ShapesVideoPipeline(_FlowMatchingPipeline):
    """17-frame 32x32 videos of "a <colour> <shape> moving <direction>": a text-conditioned Wan in pixel space."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: WanTransformer3DModel, text_encoder: UMT5EncoderModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    def encode_prompt(self, captions: list[str], device) -> torch.Tensor:
        return embed_captions(self.tokenizer, self.text_encoder, captions, device)

    def _transformer_input(self, latents: torch.Tensor) -> torch.Tensor:
        return with_positions(self.transformer, latents)

    def _latent_shape(self, batch_size: int, num_frames: int) -> tuple[int, ...]:
        return batch_size, self.transformer.config.out_channels, num_frames, self.SIZE, self.SIZE

    def check_inputs(self, prompt, num_inference_steps, guidance_scale, num_frames, num_videos_per_prompt, height, width,
                     generator, latents, output_type, return_dict, callback_on_step_end,
                     callback_on_step_end_tensor_inputs) -> list[str]:
        """Refuses bad arguments before any work; returns the normalised captions."""
        owner = type(self).__name__
        captions = check_captions(prompt, VIDEO_CAPTIONS)
        max_frames = self.transformer.config.rope_max_seq_len * self.transformer.config.patch_size[0]  # RoPE's table
        check_int(owner, "num_frames", num_frames, minimum=1)
        if num_frames > max_frames:
            raise ValueError(f"{owner}: num_frames must be between 1 and {max_frames} (the transformer's RoPE table; "
                             f"it was trained on 17), got {num_frames}")
        check_int(owner, "num_videos_per_prompt", num_videos_per_prompt, minimum=1)
        batch_size = len(captions) * num_videos_per_prompt
        check_fixed_size(owner, "height", height, self.SIZE)
        check_fixed_size(owner, "width", width, self.SIZE)
        check_latents(owner, latents, self._latent_shape(batch_size, num_frames))
        self._check_sampling(num_inference_steps, guidance_scale, batch_size, generator, output_type, return_dict,
                             callback_on_step_end, callback_on_step_end_tensor_inputs)
        return captions

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 num_frames: int = 17, num_videos_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] = ("latents",)):
        """`height` / `width`: None or 32. `output_type` "latent": the raw (B, 3, F, 32, 32) in [-1, 1]."""
        captions = self.check_inputs(prompt, num_inference_steps, guidance_scale, num_frames, num_videos_per_prompt,
                                     height, width, generator, latents, output_type, return_dict, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs)
        device, dtype = self._execution_device, self.transformer.dtype
        cond = self.encode_prompt(captions, device).to(dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        uncond = torch.zeros_like(cond)
        shape = self._latent_shape(cond.shape[0], num_frames)
        latents = (latents.to(device, dtype) if latents is not None
                   else randn_tensor(shape, generator=generator, device=device, dtype=dtype))
        video = self._denoise(latents, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond},
                              num_inference_steps, guidance_scale, callback_on_step_end,
                              list(callback_on_step_end_tensor_inputs))
        frames = (video if output_type == "latent"
                  else self.video_processor.postprocess_video(video.float(), output_type=output_type))
        return WanPipelineOutput(frames=frames) if return_dict else (frames,)
