"""VAR on tiny random-init models (CPU, float64 where exactness is checked): the tokenizer, the transformer, the
KV-cached sampler against the block-causal full forward, and the pipeline's checks."""

import numpy as np
import PIL.Image
import pytest
import torch

from accel.pipelines import VARPipeline
from accel.pipelines.hmar import VARTokenizer, VARTransformer

SCALES = (1, 2, 4)  # 21 tokens; latent 4x4, images 8x8


def tiny_tokenizer(scales=SCALES) -> VARTokenizer:
    return VARTokenizer(vocab_size=64, codebook_dim=8, scales=scales, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                        norm_num_groups=4)


def tiny_var(scales=SCALES) -> VARTransformer:
    return VARTransformer(num_classes=5, depth=2, width=32, num_heads=2, vocab_size=64, codebook_dim=8, scales=scales)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = VARPipeline(tiny_var().double().eval(), tiny_tokenizer().double().eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(n=2, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_tokenizer_round_trip_and_pyramid(pipe, tmp_path):
    tok = pipe.tokenizer
    indices = tok.encode(images())
    assert [tuple(i.shape) for i in indices] == [(2, 1), (2, 4), (2, 16)]
    tok.save_pretrained(tmp_path)
    loaded = VARTokenizer.from_pretrained(tmp_path).double()
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(images()), indices))
    assert torch.equal(loaded.decode(indices), tok.decode(indices))
    # Scale k's input is f_hat after scales < k, area-downsampled: the first scale-1 input is the 1x1 map, upsampled.
    f_hats = tok.cumulative_reconstructions(indices)
    forcing = tok.teacher_forcing_input(indices)
    assert forcing.shape == (2, 20, 8)
    assert torch.allclose(forcing[:, :4], torch.nn.functional.interpolate(f_hats[0], size=(2, 2), mode="area").flatten(2).mT)


def test_sliced_decode_equals_the_batched_one(pipe):
    tok = pipe.tokenizer
    f_hat = tok.cumulative_reconstructions(tok.encode(images(n=5)))[-1]
    whole = tok.decode_latents(f_hat)
    try:
        for size in (1, 2, 5):
            tok.enable_slicing(size)
            assert torch.allclose(tok.decode_latents(f_hat), whole, rtol=0, atol=1e-12)
    finally:
        tok.disable_slicing()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="slice_size"):
            tok.enable_slicing(bad)


def test_transformer_save_load_round_trip(pipe, tmp_path):
    indices = pipe.tokenizer.encode(images())
    inputs, labels = pipe.tokenizer.teacher_forcing_input(indices), torch.tensor([1, 4])
    pipe.transformer.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = VARTransformer.from_pretrained(tmp_path).double()
    assert loaded.config.depth == 2 and loaded.config.scales == list(SCALES)
    assert torch.equal(loaded(labels, inputs), pipe.transformer(labels, inputs))


def test_kv_cached_scale_logits_equal_the_block_causal_forward(pipe):
    """Each scale against the cache gives the logits the masked full forward gives that scale."""
    model, tok = pipe.transformer, pipe.tokenizer
    indices = tok.encode(images())
    labels = torch.tensor([0, 3])
    full = model(labels, tok.teacher_forcing_input(indices))
    cond, cache = model.embeddings.condition(labels), model.new_cache()
    f_hats = tok.cumulative_reconstructions(indices)
    for k in range(len(SCALES)):
        scale_input = None if k == 0 else tok.scale_input(k, f_hats[k - 1])
        cached = model.scale_logits(k, cond, scale_input, cache)
        torch.testing.assert_close(cached, full[:, model.layout.span(k)], rtol=1e-10, atol=1e-10)


def test_kv_cache_sampling_draws_the_tokens_of_the_masked_full_forward(pipe):
    kw = dict(guidance_scale=2.0, top_k=20, top_p=0.9, output_type="pt")
    cached = pipe([1, 2, 3], generator=torch.Generator().manual_seed(7), **kw)
    uncached = pipe([1, 2, 3], generator=torch.Generator().manual_seed(7), use_kv_cache=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(cached.token_indices, uncached.token_indices))
    torch.testing.assert_close(cached.images, uncached.images)


def test_outputs_generators_and_batches(pipe):
    pt = pipe([0, 4], generator=torch.Generator().manual_seed(0), output_type="pt").images
    np_ = pipe([0, 4], generator=torch.Generator().manual_seed(0), output_type="np").images
    pil = pipe(2, output_type="pil").images
    assert pt.shape == (2, 3, 8, 8) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    assert isinstance(np_, np.ndarray) and np_.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(np_, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil) == 1 and isinstance(pil[0], PIL.Image.Image)
    # One generator per sample: a sample's tokens do not depend on its batch mates.
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    pair = pipe(torch.tensor([1, 2]), generator=gens(), return_dict=False)
    alone = pipe([2], generator=[torch.Generator().manual_seed(6)])
    assert isinstance(pair, tuple) and len(pair[1]) == len(SCALES)
    assert all(torch.equal(a[1:], b) for a, b in zip(pair[1], alone.token_indices))


@pytest.mark.parametrize("labels, error", [
    ([1, 5], "unknown class ids \\[5\\]"), ([-1], "unknown class ids \\[-1\\]"), ([], "class_labels"),
    (1.0, "class_labels"), (torch.tensor([[1]]), "1-D integer tensor"),
])
def test_bad_class_labels(pipe, labels, error):
    with pytest.raises((ValueError, TypeError), match=error):
        pipe(labels)


@pytest.mark.parametrize("kw, error", [
    (dict(output_type="latent"), "output_type"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(use_kv_cache="yes"), "use_kv_cache"),
    (dict(generator=[torch.Generator()]), "one per sample"),
])
def test_bad_sampling_arguments(pipe, kw, error):
    with pytest.raises((ValueError, TypeError), match=error):
        pipe([1, 2], **kw)


def test_scale_lists_the_tokenizer_cannot_take():
    with pytest.raises(ValueError, match="strictly increasing"):
        tiny_var(scales=(1, 4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        tiny_tokenizer(scales=(4,))
    with pytest.raises(ValueError, match="not the tokenizer's"):
        VARPipeline(tiny_var(scales=(1, 3, 4)), tiny_tokenizer())
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        tiny_tokenizer().encode(torch.zeros(1, 3, 16, 16))
