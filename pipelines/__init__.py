"""Generators built on diffusers: the shipped reference models, long video, HMAR."""

from .reference import reference_classifier, reference_names, reference_pipeline

__all__ = ["reference_names", "reference_pipeline", "reference_classifier"]
