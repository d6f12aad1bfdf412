"""The shapes reference pipelines: diffusers `DiffusionPipeline`s in pixel space, trained with flow matching.

Both follow WanPipeline's conventions: classifier-free guidance with the conditional and unconditional
transformer calls under `cache_context("cond")` / `("uncond")`, `num_inference_steps`, generators, a progress
bar, `callback_on_step_end`, `output_type` "pil" / "np" / "pt", `save_pretrained` / `from_pretrained`.
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

from .models import NUM_CLASSES, ShapesDiTTransformer, with_positions
from .text import IMAGE_CAPTIONS, VIDEO_CAPTIONS, check_captions, embed_captions


class _FlowMatchingPipeline(DiffusionPipeline):
    """The denoising loop both pipelines share: Euler steps on the flow, CFG with the branches in cache contexts."""

    _callback_tensor_inputs = ["latents"]

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

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] = ("latents",)):
        captions = check_captions(prompt, IMAGE_CAPTIONS)
        device, dtype = self._execution_device, self.transformer.dtype
        labels = torch.tensor([IMAGE_CAPTIONS[c] for c in captions], device=device).repeat_interleave(num_images_per_prompt)
        size = self.transformer.config.sample_size
        shape = (labels.shape[0], self.transformer.config.in_channels, size, size)
        latents = latents if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=dtype)
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

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 num_frames: int = 17, num_videos_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "np", return_dict: bool = True, callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",)):
        captions = check_captions(prompt, set(VIDEO_CAPTIONS))
        device, dtype = self._execution_device, self.transformer.dtype
        cond = self.encode_prompt(captions, device).to(dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        uncond = torch.zeros_like(cond)
        size = 32
        shape = (cond.shape[0], self.transformer.config.out_channels, num_frames, size, size)
        latents = latents if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        video = self._denoise(latents, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond},
                              num_inference_steps, guidance_scale, callback_on_step_end,
                              list(callback_on_step_end_tensor_inputs))
        frames = self.video_processor.postprocess_video(video.float(), output_type=output_type)
        return WanPipelineOutput(frames=frames) if return_dict else (frames,)
