"""Triton kernels (IO-aware attention). Each op lives in its own module with a PyTorch reference beside it."""
