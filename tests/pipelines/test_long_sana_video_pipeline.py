"""LongSanaVideoPipeline on tiny offline components: chunks, streaming, memory, composability."""

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

import accel
import tiny_models as tm
import tiny_pipelines as tp
from accel.pipelines import LongSanaVideoPipeline
from accel.pipelines.long_sana_video import CausalSanaVideoTransformer3DModel


@pytest.fixture(scope="module")
def pipe():
    return tp.long_sana_video()


def _embeds():
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(1, 6, dtype=torch.long)
    return dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_attention_mask=mask,
                negative_prompt=None, chunk_frames=2, height=64, width=64)


def _run(pipe, **kw):
    return pipe(**_embeds(), generator=torch.Generator().manual_seed(0), **kw)


def test_chunks_stream_to_callback_and_mp4_and_the_first_chunk_does_not_depend_on_later_ones(pipe, tmp_path):
    seen = []
    out = _run(pipe, num_chunks=3, output_path=str(tmp_path / "v.mp4"), return_frames=True,
               callback_on_chunk_end=lambda p, i, frames: seen.append((i, frames.shape)))
    assert out.num_chunks == 3 and [i for i, _ in seen] == [0, 1, 2]
    per_chunk = seen[0][1][1]  # the first chunk: 1 + 4 (2 - 1) frames; the others 4 per latent frame
    assert [shape[1] for _, shape in seen] == [per_chunk, 8, 8] and per_chunk == 5
    assert out.frames.shape == (1, 21, 64, 64, 3) and 0 <= out.frames.min() and out.frames.max() <= 1
    assert (tmp_path / "v.mp4").stat().st_size > 0 and not list(tmp_path.glob("*.partial.mp4"))
    one = _run(pipe, num_chunks=1)
    np.testing.assert_allclose(one.frames, out.frames[:, :per_chunk], atol=1e-6)


def test_classifier_free_guidance_keeps_a_memory_per_branch(pipe):
    guided = _run(pipe, num_chunks=2, guidance_scale=3.0).frames
    plain = _run(pipe, num_chunks=2).frames
    assert np.isfinite(guided).all() and guided.shape == plain.shape and not np.allclose(guided, plain, atol=1e-3)


def test_num_frames_is_rounded_to_whole_chunks_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="accel"):
        out = _run(pipe, num_frames=9)  # 3 latent frames -> 2 chunks of 2
    assert out.num_chunks == 2 and "rounded" in caplog.text
    with pytest.raises(ValueError, match="exactly one"):
        _run(pipe, num_chunks=2, num_frames=9)
    with pytest.raises(ValueError, match=">= 1"):
        _run(pipe, num_frames=0)


SIX_STEPS = (1000.0, 950.0, 900.0, 850.0, 800.0, 750.0)


def test_composes_with_cg_taylor(pipe):
    plain = _run(pipe, num_chunks=2).frames
    with accel.patch(pipe, method="cg_taylor", threshold=0.0) as handle:  # skips nothing: changes nothing
        out = _run(pipe, num_chunks=2)
        assert handle.stats()["steps"] > 0 and handle.stats()["computed"] == handle.stats()["steps"]
    np.testing.assert_allclose(out.frames, plain, atol=1e-6)
    with accel.patch(pipe, method="cg_taylor", threshold=1e9, warmup_steps=1) as handle:  # skips what it may
        skipped = _run(pipe, num_chunks=2, timesteps=SIX_STEPS)
        stats = handle.stats()
    six = _run(pipe, num_chunks=2, timesteps=SIX_STEPS).frames
    assert stats["computed"] < stats["steps"] and not np.allclose(skipped.frames, six, atol=1e-4)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_totals_count_every_chunk_and_stats_the_last(pipe, guidance_scale):
    with accel.patch(pipe, method="cg_taylor", threshold=1e9, warmup_steps=1) as handle:
        _run(pipe, num_chunks=3, timesteps=SIX_STEPS, guidance_scale=guidance_scale)
        last, totals = handle.stats(), handle.totals()
        assert totals["generations"] == 3 and totals["context"] == "cond"  # a chunk's memory passes join its run
        assert last["steps"] == 6 and totals["steps"] == 18 and 0 < totals["computed"] < 18
        assert totals["per_context"]["cond_memory"] == {"steps": 3, "computed": 3}  # the memory is always computed
        assert ("uncond_memory" in totals["per_context"]) == (guidance_scale > 1)
        handle.reset()
        assert handle.totals()["steps"] == 0 and handle.totals()["generations"] == 0


@pytest.mark.parametrize("method", ["first_block_cache", "taylorseer"])
def test_diffusers_caches_reach_the_causal_blocks(pipe, method):
    plain = _run(pipe, num_chunks=2, timesteps=SIX_STEPS).frames
    options = {"first_block_cache": {"threshold": 1e9},
               "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 1}}[method]
    last = pipe.transformer.transformer_blocks[-1]
    runs = {"attn1": 0, "ff": 0}  # real runs of the last block's self-attention and feed-forward
    hooks = [last.attn1.to_q.register_forward_hook(lambda *_: runs.update(attn1=runs["attn1"] + 1)),
             last.ff.conv_inverted.register_forward_hook(lambda *_: runs.update(ff=runs["ff"] + 1))]
    with accel.patch(pipe, method=method, **options) as handle:
        cached = _run(pipe, num_chunks=2, timesteps=SIX_STEPS)
        stats = handle.stats()
    for hook in hooks:
        hook.remove()
    assert stats["computed"] < stats["steps"] and not np.allclose(cached.frames, plain, atol=1e-4)
    calls = 2 * (len(SIX_STEPS) + 1)  # per chunk: its steps and its memory pass
    assert runs["attn1"] < calls and runs["ff"] < calls  # the skipped steps skip them


def test_interrupted_generation_leaves_no_video_file(pipe, tmp_path):
    def boom(p, i, frames):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, num_chunks=2, output_path=str(tmp_path / "v.mp4"), callback_on_chunk_end=boom)
    assert list(tmp_path.iterdir()) == []


def test_loads_from_a_local_sana_video_folder(tmp_path):
    from diffusers import SanaVideoPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tm.sana_video(),
                      scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path)
    pipe = LongSanaVideoPipeline.from_pretrained(tmp_path, tokenizer=None, text_encoder=None)  # saved without them
    assert isinstance(pipe.transformer, CausalSanaVideoTransformer3DModel)
    expected = tm.sana_video().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.transformer.state_dict().items())
    per_component = LongSanaVideoPipeline.from_pretrained(
        tmp_path, tokenizer=None, text_encoder=None, dtype={"transformer": torch.bfloat16, "default": torch.float32})
    assert (per_component.transformer.dtype, per_component.vae.dtype) == (torch.bfloat16, torch.float32)


def test_prompt_embeddings_take_the_transformers_dtype(pipe):
    import copy

    half = copy.deepcopy(pipe)
    half.transformer.to(torch.bfloat16)
    frames = _run(half, num_chunks=1).frames  # float32 prompt_embeds, as a user hands them
    np.testing.assert_allclose(frames, _run(pipe, num_chunks=1).frames, atol=0.05)  # bf16 of the same video


def test_sizes_the_patches_do_not_divide_are_refused(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(**{**_embeds(), "height": 72}, num_chunks=1)


def test_diffusers_own_cache_never_skips_a_memory_pass(pipe):
    from diffusers import FirstBlockCacheConfig

    last = pipe.transformer.transformer_blocks[-1]
    call, runs = {}, []  # whether each time the last block really ran, it was writing the memory
    hooks = [last.register_forward_pre_hook(lambda m, args, kwargs: call.update(write=kwargs["write_memory"]),
                                            with_kwargs=True),
             last.ff.conv_inverted.register_forward_hook(lambda *_: runs.append(call["write"]))]
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # would skip every block it may
    try:
        _run(pipe, num_chunks=3, timesteps=SIX_STEPS)
    finally:
        pipe.transformer.disable_cache()
        for hook in hooks:
            hook.remove()
    assert runs.count(True) == 3  # every chunk written to memory by the last block too
    assert runs.count(False) < 3 * len(SIX_STEPS)  # while denoising steps were skipped


def test_chunks_decode_to_exactly_the_frames_of_the_whole_video(pipe):
    """Wan's VAE is causal in time: decoded chunk by chunk through its carried cache, the frames equal decoding all
    latents at once (1 + 4 (N - 1) frames, no seam)."""
    from accel.pipelines.long_sana_video.decoding import StreamingWanDecoder

    latents = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = pipe.vae.decode(latents, return_dict=False)[0]
        stream = StreamingWanDecoder(pipe.vae)
        chunked = torch.cat([stream.decode(latents[:, :, :2]), stream.decode(latents[:, :, 2:])], dim=2)
        stream.close()
    assert whole.shape[2] == chunked.shape[2] == 1 + 4 * 4
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    frames = _run(pipe, num_chunks=2, return_frames=True).frames
    assert frames.shape[1] == 1 + 4 * (2 * 2 - 1)


def test_streamed_decoding_moves_an_offloaded_vae_as_its_own_decode_would(pipe):
    class OffloadHook:  # what enable_model_cpu_offload attaches: pre_forward puts the module on the GPU
        calls = 0

        def pre_forward(self, module):
            OffloadHook.calls += 1

    pipe.vae._hf_hook = OffloadHook()
    try:
        _run(pipe, num_chunks=2)
    finally:
        del pipe.vae._hf_hook
    assert OffloadHook.calls >= 2  # before each chunk's decoding
