"""Generators built on diffusers: the shipped reference models and long video."""

from .reference import reference_classifier, reference_names, reference_pipeline


def __getattr__(name: str):
    # The long-video pipeline pulls in the Triton kernels: imported on first use only.
    if name == "LongSanaVideoPipeline":
        from .long_sana_video import LongSanaVideoPipeline

        return LongSanaVideoPipeline
    raise AttributeError(name)


__all__ = ["reference_names", "reference_pipeline", "reference_classifier", "LongSanaVideoPipeline"]
