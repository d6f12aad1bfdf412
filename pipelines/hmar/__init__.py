"""VAR (next-scale prediction, arXiv 2404.02905) and HMAR (Markovian next-scale prediction with masked refinement,
arXiv 2506.04421) on diffusers: the multi-scale VQ tokenizer, both transformers, loaders for the public checkpoints,
and their pipelines."""

from .hmar_transformer import HMARTransformer
from .loaders import CheckpointKeyError, load_hmar, load_var, load_var_tokenizer
from .pipeline_hmar import HMAR_MASK_SCHEDULE, HMARPipeline
from .pipeline_var import VARPipeline
from .sampling import NextScalePipelineOutput
from .scales import VAR_SCALES, ScaleLayout
from .tokenizer import VARTokenizer
from .var_transformer import VARTransformer

__all__ = [
    "HMAR_MASK_SCHEDULE", "VAR_SCALES", "CheckpointKeyError", "HMARPipeline", "HMARTransformer", "NextScalePipelineOutput",
    "ScaleLayout", "VARPipeline", "VARTokenizer", "VARTransformer", "load_hmar", "load_var", "load_var_tokenizer",
]
