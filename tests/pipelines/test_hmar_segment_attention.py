"""Segment attention's backends against the float64 reference on fresh random inputs (segments that are not
multiples of any block), and the transformers' backend switch."""

import pytest
import torch

from accel.kernels import block_sparse_attention_reference
from accel.pipelines.hmar import HMARTransformer, VARTransformer
from accel.pipelines.hmar import attention as hmar_attention
from accel.pipelines.hmar.attention import segment_attention
from accel.pipelines.hmar.scales import SegmentMask

LENGTHS = (1, 4, 9, 25, 49)


def _inputs(dtype, gen, batch=2, heads=2, dim=16):
    n = sum(LENGTHS)
    return [torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_per_segment_sdpa_equals_the_float64_reference_with_gradients(causal):
    gen = torch.Generator().manual_seed(0)
    segments = SegmentMask(LENGTHS, causal=causal, backend="sdpa")
    q, k, v = _inputs(torch.float64, gen)
    out = segment_attention(q, k, v, segments, scale=0.3)
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_leaves, segments.block_mask("cpu"), scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, ref_leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_backend_matches_per_segment_sdpa_in_bf16(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (x.detach() for x in _inputs(torch.bfloat16, gen))
    fast = segment_attention(q, k, v, SegmentMask(LENGTHS, causal, backend="block_sparse"), scale=0.25)
    exact = segment_attention(*(x.double() for x in (q, k, v)), SegmentMask(LENGTHS, causal, backend="sdpa"), scale=0.25)
    torch.testing.assert_close(fast.double(), exact, rtol=2e-2, atol=2e-2)


def test_bad_backend_and_wrong_length_and_varlen_off_cuda_are_clear_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        SegmentMask(LENGTHS, causal=False, backend="flash")
    q = torch.zeros(1, 1, sum(LENGTHS) + 1, 8)
    with pytest.raises(ValueError, match="cover 88"):
        segment_attention(q, q, q, SegmentMask(LENGTHS, causal=False), scale=1.0)
    q = torch.zeros(1, 1, sum(LENGTHS), 8)
    with pytest.raises((ValueError, RuntimeError), match="varlen"):
        segment_attention(q, q, q, SegmentMask(LENGTHS, causal=False, backend="varlen"), scale=1.0)


@pytest.mark.parametrize("cls", [VARTransformer, HMARTransformer])
def test_transformers_on_the_sdpa_backend_match_the_dense_float64_reference(cls, monkeypatch):
    extra = {"branch_depth": 1} if cls is HMARTransformer else {}
    model = cls(num_classes=3, depth=2, width=32, num_heads=2, vocab_size=16, codebook_dim=4, scales=(1, 2, 3),
                **extra).double().eval()
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, 4 + 9, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3])
    model.set_segment_attention("sdpa")
    per_segment = model(labels, inputs)

    def dense_reference(q, k, v, segments, scale):
        return block_sparse_attention_reference(q, k, v, segments.block_mask(q.device), scale=scale)

    monkeypatch.setattr(hmar_attention, "segment_attention", dense_reference)
    torch.testing.assert_close(per_segment, model(labels, inputs), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_segment_attention("dense")
