"""Long video with SANA-Video: a block-causal transformer with a constant-memory state."""

from .pipeline import LongSanaVideoPipeline, LongVideoOutput
from .transformer import CausalSanaVideoTransformer3DModel, LongVideoMemory

__all__ = ["CausalSanaVideoTransformer3DModel", "LongSanaVideoPipeline", "LongVideoMemory", "LongVideoOutput"]
