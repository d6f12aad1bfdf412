"""StreamingT2V on the shipped shapes-video base: the `shapes-streaming` reference pipeline.

The shipped folder holds what training added (CAM, APM, the scheduler and model_index.json); the frozen base's
components (transformer, text encoder, tokenizer) are those of the shipped `shapes-video`, loaded from there when
the folder has no copy of them, so the base ships once. APM's image encoder is the shipped open_clip `shapes-clip`
unless ACCEL_CLIP names another or `image_encoder` is given.
"""

from __future__ import annotations

import os

import torch

from ..checks import check_fixed_size
from ..shapes.text import VIDEO_CAPTIONS, check_captions
from .image_encoder import ENV_VAR, load_image_encoder
from .pipeline import StreamingT2VPipeline

BASE = "shapes-video"
CLIP = "shapes-clip"
BASE_COMPONENTS = ("transformer", "text_encoder", "tokenizer")
SIZE = 32


def shapes_clip_spec() -> str:
    """ACCEL_CLIP's value (ARCH:PATH) for the shipped open_clip shapes model."""
    from ..shapes.reference import clip_checkpoint

    return f"{CLIP}:{clip_checkpoint()}"


class ShapesStreamingT2VPipeline(StreamingT2VPipeline):
    """Long videos of "a <colour> <shape> moving <direction>": chunks of 16 frames of 32x32 from shapes-video,
    each later one through CAM and APM trained on the shapes data."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As StreamingT2VPipeline's, the base's components missing from the folder taken from shipped shapes-video,
        and the image encoder from ACCEL_CLIP or the shipped shapes-clip."""
        from ..shapes.reference import reference_pipeline

        folder = os.fspath(pretrained_model_name_or_path)
        missing = [name for name in BASE_COMPONENTS if name not in kwargs and not os.path.isdir(os.path.join(folder, name))]
        if missing:
            base = reference_pipeline(BASE, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")))
            kwargs.update({name: getattr(base, name) for name in missing})
        if "image_encoder" not in kwargs:
            kwargs["image_encoder"] = load_image_encoder(os.environ.get(ENV_VAR) or shapes_clip_spec())
        return super().from_pretrained(folder, **kwargs)

    def check_inputs(self, prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds, **kwargs):
        """StreamingT2VPipeline's checks, for captions of the shapes vocabulary at 32x32."""
        owner = type(self).__name__
        if negative_prompt or prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError(f"{owner}: the shapes model takes captions only: no negative_prompt, prompt_embeds or "
                             "negative_prompt_embeds")
        check_captions(prompt, VIDEO_CAPTIONS)
        check_fixed_size(owner, "height", height, SIZE)
        check_fixed_size(owner, "width", width, SIZE)
        return super().check_inputs(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                    **kwargs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_chunks: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 20, guidance_scale: float = 4.0, height: int | None = None,
                 width: int | None = None, **kwargs):
        """As StreamingT2VPipeline, at 32x32 (`height` / `width`: None or 32) with the base's 20 steps and guidance
        4 by default. Captions are normalised as the base's pipeline does (case, full stops)."""
        captions = check_captions(prompt, VIDEO_CAPTIONS)
        prompt = captions[0] if isinstance(prompt, str) else captions
        return super().__call__(prompt, num_chunks=num_chunks, num_frames=num_frames,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                height=SIZE if height is None else height, width=SIZE if width is None else width,
                                **kwargs)
