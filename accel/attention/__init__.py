"""Attention processors that run diffusers' attention layers on accel's kernels (`accel.kernels`)."""
