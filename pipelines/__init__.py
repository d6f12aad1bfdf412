"""Generators built on diffusers: long video (SANA-Video, StreamingT2V), HMAR, and the shipped reference models."""
