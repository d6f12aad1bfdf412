"""Generators built on diffusers: the shipped reference models and long video. The index of `accel.pipelines`.

The code lives in the repository's top-level `pipelines/` folder, which has no `__init__.py` of its own (see
`pyproject.toml`): so it never shadows an installed top-level package of the same name when Python runs from
the repository root.
"""

from .shapes.reference import reference_classifier, reference_names, reference_pipeline


def __getattr__(name: str):
    # The long-video pipelines are imported on first use only (LongSANA pulls in the Triton kernels).
    if name == "LongSanaVideoPipeline":
        from .long_sana_video import LongSanaVideoPipeline

        return LongSanaVideoPipeline
    if name in ("StreamingT2VPipeline", "ShapesStreamingT2VPipeline"):
        from . import streaming_t2v

        return getattr(streaming_t2v, name)
    if name in ("VARPipeline", "HMARPipeline"):
        from . import hmar

        return getattr(hmar, name)
    raise AttributeError(name)


__all__ = ["reference_names", "reference_pipeline", "reference_classifier", "LongSanaVideoPipeline",
           "StreamingT2VPipeline", "ShapesStreamingT2VPipeline", "VARPipeline", "HMARPipeline"]
