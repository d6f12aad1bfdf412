"""StreamingT2V (arXiv 2403.14773) on diffusers video models: long video by chunks with CAM (short-term) and APM
(long-term) memories, and randomized blending as a denoising-loop utility."""

from .blending import blend_chunks, chunk_starts, draw_offsets, predict_blended
from .image_encoder import ClipImageEncoder, load_image_encoder
from .modules import AppearancePreservationModule, ConditionalAttentionModule
from .pipeline import StreamingT2VOutput, StreamingT2VPipeline
from .shapes import ShapesStreamingT2VPipeline

__all__ = [
    "AppearancePreservationModule", "ClipImageEncoder", "ConditionalAttentionModule", "ShapesStreamingT2VPipeline", "StreamingT2VOutput",
    "StreamingT2VPipeline", "blend_chunks", "chunk_starts", "draw_offsets", "load_image_encoder", "predict_blended",
]
