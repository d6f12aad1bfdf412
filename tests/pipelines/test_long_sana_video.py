"""The block-causal SANA-Video transformer against diffusers' model and an independent whole-sequence formula."""

import pytest
import torch
from torch.nn import functional as F

import tiny_models as tm
from accel.attention.linear import EPS, _output, _project
from accel.kernels.linear_attention import RotaryTables, naive
from accel.pipelines.long_sana_video import CausalSanaVideoTransformer3DModel
from accel.pipelines.long_sana_video import transformer as causal_module

FRAMES_PER_CHUNK = 2  # tiny model: patch 1 in time, latent frames of 4x4 tokens


def _models():
    reference = tm.sana_video()
    causal = CausalSanaVideoTransformer3DModel.from_config(reference.config).eval()
    causal.load_state_dict(reference.state_dict())
    return reference, causal


def _video(frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, 8, 8, generator=g), torch.randn(1, 6, 16, generator=g)


def _chunked(model, video, text, t, chunks, keep=None):
    memory = model.new_memory(keep)
    outs = []
    with torch.no_grad():
        for i in range(0, video.shape[2], chunks):
            outs.append(model(video[:, :, i : i + chunks], text, t, memory=memory, write_memory=True, return_dict=False)[0])
    return torch.cat(outs, dim=2), memory


def test_a_single_chunk_equals_diffusers_bidirectional_model():
    reference, causal = _models()
    video, text = _video(FRAMES_PER_CHUNK)
    t = torch.full((1,), 700.0)
    with torch.no_grad():
        expected = reference(video, text, t, return_dict=False)[0]
        got = causal(video, text, t, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _whole_sequence_block_causal(model, video, text, t, chunk_frames):
    """The same model over the whole sequence at once: attention through the explicit block-causal token mask,
    the temporal conv with each chunk's right neighbour cut; no memory anywhere."""
    tokens_per_frame = (video.shape[3] // 2) * (video.shape[4] // 2)
    sizes = [tokens_per_frame * min(chunk_frames, video.shape[2] - s) for s in range(0, video.shape[2], chunk_frames)]

    def attention(attn, x, rotary, memory, layer, write):
        q, k, v = _project(attn, x, None)
        tables = RotaryTables.from_diffusers(*rotary, k.shape[2], k.shape[3])
        out = naive.block_causal_quadratic(q, k, v, sizes, eps=EPS, rotary=tables, dtype=torch.float64)
        return _output(attn, out.float(), x.dtype)

    def conv(conv, x, previous):
        full = F.conv2d(x, conv.weight, conv.bias, padding=(1, 0))
        ends = torch.arange(chunk_frames - 1, x.shape[2] - 1, chunk_frames)  # last frames of all but the last chunk
        right_tap = F.conv2d(x[:, :, ends + 1], conv.weight[:, :, 2:3])
        full[:, :, ends] -= right_tap
        return full

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(causal_module, "_causal_attention", attention)
        mp.setattr(causal_module, "causal_temporal_conv", conv)
        with torch.no_grad():
            return model(video, text, t, return_dict=False)[0]


def test_chunk_by_chunk_equals_the_whole_sequence_block_causal_forward():
    _, causal = _models()
    video, text = _video(7, seed=1)  # 7 frames in chunks of 2: the last chunk is short
    t = torch.full((1,), 0.0)
    chunked, memory = _chunked(causal, video, text, t, FRAMES_PER_CHUNK)
    whole = _whole_sequence_block_causal(causal, video, text, t, FRAMES_PER_CHUNK)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert memory.frames == 7


def test_temporal_conv_cache_equals_the_conv_over_concatenated_chunks():
    conv = torch.nn.Conv2d(8, 8, kernel_size=(3, 1), padding=(1, 0))
    x = torch.randn(2, 8, 9, 5)
    sizes = [4, 2, 3]
    parts, previous = [], None
    for chunk in x.split(sizes, dim=2):
        parts.append(causal_module.causal_temporal_conv(conv, chunk, previous))
        previous = chunk[:, :, -1:]
    with torch.no_grad():
        full = F.conv2d(x, conv.weight, conv.bias, padding=(1, 0))
        for end in (3, 5):  # a chunk's last frame may not look at the next chunk's first
            full[:, :, end] -= F.conv2d(x[:, :, end + 1 : end + 2], conv.weight[:, :, 2:3])[:, :, 0]
        torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=1e-5, atol=1e-6)


def test_memory_size_is_the_same_after_1_and_20_chunks():
    _, causal = _models()
    video, text = _video(20, seed=2)  # 20 one-frame chunks (the tiny model's RoPE covers 32 frames)
    t = torch.full((1,), 0.0)
    _, one = _chunked(causal, video[:, :, :1], text, t, 1)
    _, twenty = _chunked(causal, video, text, t, 1)
    assert one.nbytes() == twenty.nbytes() > 0 and twenty.frames == 20


def test_keep_last_chunks_forgets_older_chunks():
    _, causal = _models()
    video, text = _video(4 * FRAMES_PER_CHUNK, seed=3)
    t = torch.full((1,), 0.0)
    c = FRAMES_PER_CHUNK
    everything, _ = _chunked(causal, video, text, t, c)
    enough, _ = _chunked(causal, video, text, t, c, keep=4)
    torch.testing.assert_close(enough, everything, rtol=1e-5, atol=1e-5)  # nothing to forget yet
    last_only, memory = _chunked(causal, video, text, t, c, keep=1)
    torch.testing.assert_close(last_only[:, :, : 2 * c], everything[:, :, : 2 * c], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last_only[:, :, 2 * c :], everything[:, :, 2 * c :], atol=1e-4)  # chunk 0 forgotten
    for layer in memory.layers:  # the sums hold exactly the last chunk's own contribution
        assert len(layer.chunks) == 1
        torch.testing.assert_close(layer.attention.kv, layer.chunks[0].kv, rtol=1e-4, atol=1e-5)


def test_a_training_memory_carries_gradients_to_the_chunks_that_wrote_it():
    _, causal = _models()
    video, text = _video(2 * FRAMES_PER_CHUNK, seed=4)
    first, second = video.split(FRAMES_PER_CHUNK, dim=2)
    first.requires_grad_()
    t = torch.full((1,), 0.0)
    for track, carries in ((True, True), (False, False)):
        memory = causal.new_memory(track_gradients=track)
        causal(first, text, t, memory=memory, write_memory=True)
        out = causal(second, text, t, memory=memory, return_dict=False)[0]
        (grad,) = torch.autograd.grad(out.sum(), first, allow_unused=True)
        assert (grad is not None and grad.abs().sum() > 0) == carries


def test_bad_use_is_refused():
    _, causal = _models()
    video, text = _video(2)
    with pytest.raises(ValueError, match="write_memory needs a memory"):
        causal(video, text, torch.zeros(1), write_memory=True)
    memory = causal.new_memory()
    memory.frames = causal.config.rope_max_seq_len
    with pytest.raises(ValueError, match="RoPE"):
        causal(video, text, torch.zeros(1), memory=memory)
    with pytest.raises(ValueError, match="keep_last_chunks"):
        causal.new_memory(0)
    with pytest.raises(NotImplementedError, match="attention_kwargs"):
        causal(video, text, torch.zeros(1), attention_kwargs={"scale": 0.5})


def test_rope_tables_of_a_chunk_are_diffusers_rows_for_its_frames():
    """The chunk's tables are built for its own frames (constant memory), equal to the rows of diffusers' table."""
    _, causal = _models()
    chunk = torch.empty(1, 16, 3, 8, 8)
    for offset in (0, 5):
        cos, sin = causal._rotary(chunk, offset)
        whole_cos, whole_sin = causal.rope(torch.empty(1, 16, offset + 3, 8, 8))
        rows = cos.shape[1]
        assert rows == 3 * 4 * 4
        torch.testing.assert_close(cos, whole_cos[:, -rows:], rtol=0, atol=0)
        torch.testing.assert_close(sin, whole_sin[:, -rows:], rtol=0, atol=0)
