"""Randomized blending (StreamingT2V, arXiv 2403.14773): one long latent denoised as overlapping chunks.

A video of `num_frames = F + k (F - O)` frames is covered by chunks of F frames starting every F - O frames, so
chunk n overlaps chunk n - 1 on O frames. The chunks are slices of one latent (overlapping frames share their noise
and their state). At every step each chunk is predicted on its own; for chunk n > 0 an offset r_n ~ U{0..O-1} is
drawn and, in the overlap, the frames before offset r_n keep chunk n - 1's prediction and the frames from r_n on
take chunk n's. A new r every step moves the seam, so no fixed boundary is left in the result.

What is blended: the model output. The paper blends the x0 predictions; at one step every chunk sees the same
latent frames x_t and the same timestep, and x0 is an affine function of the model output with coefficients that
depend on those alone (flow matching: x0 = x_t - sigma v; epsilon: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)), so
blending the model output and then converting gives exactly the blended x0. Blending the output lets the result go
to any diffusers scheduler's `step` unchanged.

In a denoising loop:

    for t in scheduler.timesteps:
        output = predict_blended(latents, lambda chunk, n: transformer(chunk, t, ...), F, O, generator)
        latents = scheduler.step(output, t, latents).prev_sample
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from accel.validation import check_int

_OWNER = "randomized blending"


def _check_chunking(chunk_frames, overlap) -> None:
    check_int(_OWNER, "chunk_frames", chunk_frames, minimum=1)
    check_int(_OWNER, "overlap", overlap, minimum=0)
    if overlap >= chunk_frames:
        raise ValueError(f"{_OWNER}: overlap must be smaller than chunk_frames ({chunk_frames}), got {overlap}")


def chunk_starts(num_frames: int, chunk_frames: int, overlap: int) -> list[int]:
    """The first frame of each chunk: 0, F - O, 2 (F - O), ...; `num_frames` must be F + k (F - O)."""
    _check_chunking(chunk_frames, overlap)
    check_int(_OWNER, "num_frames", num_frames, minimum=1)
    stride = chunk_frames - overlap
    if num_frames < chunk_frames or (num_frames - chunk_frames) % stride:
        examples = ", ".join(str(chunk_frames + k * stride) for k in range(4))
        raise ValueError(f"{_OWNER}: num_frames must be F + k (F - O) = {examples}, ... (chunks of F={chunk_frames} "
                         f"frames overlapping by O={overlap}), got {num_frames}")
    return list(range(0, num_frames - chunk_frames + 1, stride))


def draw_offsets(num_chunks: int, overlap: int, generator: torch.Generator | None = None) -> list[int]:
    """r_n ~ U{0..O-1} for chunks n = 1..N-1, from `generator`; all 0 without drawing when O = 0 (nothing to
    blend) or for a single chunk."""
    check_int(_OWNER, "num_chunks", num_chunks, minimum=1)
    check_int(_OWNER, "overlap", overlap, minimum=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OWNER}: generator must be a torch.Generator or None, got {generator!r}")
    if overlap == 0 or num_chunks == 1:
        return [0] * (num_chunks - 1)
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, overlap, (num_chunks - 1,), generator=generator, device=device).tolist()


def blend_chunks(chunks: Sequence[torch.Tensor], overlap: int, offsets: Sequence[int], dim: int = 2) -> torch.Tensor:
    """The chunks' predictions (each with F frames along `dim`) composed into one tensor of F + (N-1)(F - O)
    frames: chunk 0 whole, then each chunk n from its frame r_n = offsets[n - 1] on (over chunk n - 1's)."""
    if not chunks or not all(isinstance(c, torch.Tensor) for c in chunks):
        raise TypeError(f"{_OWNER}: chunks must be a non-empty sequence of tensors")
    shape = chunks[0].shape
    if any(c.shape != shape for c in chunks):
        raise ValueError(f"{_OWNER}: every chunk must have the same shape, got {[tuple(c.shape) for c in chunks]}")
    frames = shape[dim]
    _check_chunking(frames, overlap)
    if len(offsets) != len(chunks) - 1:
        raise ValueError(f"{_OWNER}: offsets must hold one offset per chunk after the first ({len(chunks) - 1}), "
                         f"got {len(offsets)}")
    if any(not 0 <= r < max(overlap, 1) for r in offsets):
        raise ValueError(f"{_OWNER}: offsets must lie in 0..{max(overlap - 1, 0)} (the overlap), got {list(offsets)}")
    stride = frames - overlap
    out_shape = list(shape)
    out_shape[dim] = frames + (len(chunks) - 1) * stride
    out = chunks[0].new_empty(out_shape)
    for n, chunk in enumerate(chunks):
        r = offsets[n - 1] if n else 0
        out.narrow(dim, n * stride + r, frames - r).copy_(chunk.narrow(dim, r, frames - r))
    return out


def predict_blended(latents: torch.Tensor, predict: Callable[[torch.Tensor, int], torch.Tensor], chunk_frames: int,
                    overlap: int, generator: torch.Generator | None = None, dim: int = 2) -> torch.Tensor:
    """One step's blended prediction for the whole latent: `predict(chunk_latents, n)` for each chunk (a slice of
    `latents` along `dim`), composed by `blend_chunks` with offsets freshly drawn from `generator`."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{_OWNER}: latents must be a tensor, got {type(latents).__name__}")
    starts = chunk_starts(latents.shape[dim], chunk_frames, overlap)
    predictions = [predict(latents.narrow(dim, start, chunk_frames), n) for n, start in enumerate(starts)]
    return blend_chunks(predictions, overlap, draw_offsets(len(starts), overlap, generator), dim)
