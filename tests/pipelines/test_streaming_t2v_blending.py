"""Randomized blending: the composition of overlapping chunks' predictions, exactly, on small tensors."""

import pytest
import torch

from accel.pipelines.streaming_t2v import blend_chunks, chunk_starts, draw_offsets, predict_blended


def _marked(n: int, frames: int) -> torch.Tensor:
    """Chunk n's prediction: 100 n + the frame's index in the chunk, (1, 1, frames, 1, 1)."""
    return (100.0 * n + torch.arange(frames, dtype=torch.float32)).view(1, 1, frames, 1, 1)


def test_chunks_start_every_f_minus_o_frames_and_other_lengths_are_refused():
    assert chunk_starts(16, 16, 8) == [0]
    assert chunk_starts(32, 16, 8) == [0, 8, 16]
    assert chunk_starts(12, 4, 0) == [0, 4, 8]
    with pytest.raises(ValueError, match=r"F \+ k \(F - O\) = 16, 24, 32, 40"):
        chunk_starts(20, 16, 8)
    with pytest.raises(ValueError, match="overlap must be smaller than chunk_frames"):
        chunk_starts(16, 16, 16)


def test_previous_chunk_before_the_offset_and_the_new_chunk_from_it():
    # F = 6, O = 3: chunks start at 0, 3, 6; r_1 = 1, r_2 = 2.
    out = blend_chunks([_marked(n, 6) for n in range(3)], overlap=3, offsets=[1, 2])
    assert out.flatten().tolist() == [0, 1, 2, 3, 101, 102, 103, 104, 202, 203, 204, 205]


def test_composition_equals_the_slices_of_the_paper_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    frames, overlap, stride = 8, 4, 4
    chunks = [torch.randn(2, 3, frames, 2, 2, generator=g) for _ in range(4)]
    r = draw_offsets(4, overlap, torch.Generator().manual_seed(1))
    bounds = [0] + [n * stride + r[n - 1] for n in range(1, 4)] + [frames + 3 * stride]
    expected = torch.cat([c[:, :, bounds[n] - n * stride: bounds[n + 1] - n * stride] for n, c in enumerate(chunks)], dim=2)
    assert torch.equal(blend_chunks(chunks, overlap, r), expected)


def test_with_more_than_half_overlap_each_frame_takes_the_last_chunk_started_before_it():
    frames, overlap, offsets = 4, 3, [2, 0, 1]  # stride 1: a frame lies in up to 4 chunks
    out = blend_chunks([_marked(n, frames) for n in range(4)], overlap, offsets).flatten().tolist()
    starts = [0] + [n + offsets[n - 1] for n in range(1, 4)]
    for f, value in enumerate(out):
        n = max(i for i, s in enumerate(starts) if s <= f)
        assert value == 100 * n + (f - n)


def test_offsets_are_seeded_by_the_generator_and_cover_the_overlap():
    first = draw_offsets(50, 8, torch.Generator().manual_seed(3))
    assert first == draw_offsets(50, 8, torch.Generator().manual_seed(3))
    assert first != draw_offsets(50, 8, torch.Generator().manual_seed(4))
    assert set(first) == set(range(8))
    g = torch.Generator().manual_seed(0)
    steps = [predict_blended(torch.zeros(1, 1, 24, 1, 1), lambda x, n: _marked(n, 16), 16, 8, g) for _ in range(2)]
    assert not torch.equal(*steps)  # a new r every step: the seam moves


def test_without_overlap_or_with_one_chunk_nothing_is_drawn():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    latents = torch.arange(12.0).view(1, 1, 12, 1, 1)
    out = predict_blended(latents, lambda x, n: x * 2 + n, 4, 0, g)  # O = 0: chunks side by side
    assert torch.equal(out, torch.cat([latents[:, :, 4 * n: 4 * n + 4] * 2 + n for n in range(3)], dim=2))
    one = predict_blended(latents[:, :, :4], lambda x, n: x * 3, 4, 2, g)  # a single chunk: its prediction
    assert torch.equal(one, latents[:, :, :4] * 3)
    assert draw_offsets(3, 0, g) == [0, 0] and draw_offsets(1, 5, g) == []
    assert torch.equal(g.get_state(), state)


def test_chunks_are_slices_of_the_one_latent():
    latents = torch.randn(1, 2, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    seen = []

    def predict(chunk, n):
        seen.append((n, chunk))
        return chunk

    out = predict_blended(latents, predict, 8, 4, torch.Generator().manual_seed(0))
    assert [n for n, _ in seen] == [0, 1, 2]
    assert all(torch.equal(chunk, latents[:, :, 4 * n: 4 * n + 8]) for n, chunk in seen)
    assert torch.equal(out, latents)  # overlapping frames share their state: any blend of slices is the latent


def test_blending_the_model_output_is_blending_x0():
    """Flow matching: x0 = x_t - sigma v per chunk, with x_t and sigma shared by the chunks at a step."""
    g = torch.Generator().manual_seed(0)
    x_t, sigma = torch.randn(1, 2, 12, 2, 2, generator=g), 0.7
    velocities = [torch.randn(1, 2, 6, 2, 2, generator=g) for _ in range(3)]
    offsets = [2, 1]
    x0_chunks = [x_t[:, :, 3 * n: 3 * n + 6] - sigma * v for n, v in enumerate(velocities)]
    assert torch.equal(x_t - sigma * blend_chunks(velocities, 3, offsets), blend_chunks(x0_chunks, 3, offsets))


def test_bad_inputs_are_refused():
    chunks = [_marked(n, 6) for n in range(3)]
    with pytest.raises(ValueError, match="one offset per chunk after the first"):
        blend_chunks(chunks, 3, [1])
    with pytest.raises(ValueError, match=r"offsets must lie in 0\.\.2"):
        blend_chunks(chunks, 3, [1, 3])
    with pytest.raises(ValueError, match="same shape"):
        blend_chunks([chunks[0], _marked(1, 5)], 3, [0])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        draw_offsets(3, 2, 7)
