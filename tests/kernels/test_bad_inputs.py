"""The catalogue of bad inputs: every one is refused before anything launches, with the exception type a caller can
catch and a message naming the argument, its value and what is allowed. One parametrized test per class of input;
`match` is the argument's name followed (where the message carries it) by the offending value."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tiny_models as tm

from accel.attention.linear import apply_linear_attention_kernels
from accel.attention.sparse import apply_sparse_attention, dense, local_3d, strided_shards
from accel.kernels import block_causal_linear_attention, linear_attention
from accel.kernels.block_sparse import (
    BlockSparseMask,
    KernelConfig,
    block_diagonal_mask,
    block_sparse_attention,
    interval_mask,
    local_3d_mask,
    strided_shards_mask,
    table_mask,
)
from accel.kernels.linear_attention import LinearAttentionState

BF16 = torch.bfloat16
N, D, BS = 40, 64, 16  # 3 blocks of 16, the last one ragged


def _qkv(b=1, h=2, n=N, d=D, dtype=BF16):
    return [torch.randn(b, h, n, d).to(dtype) for _ in range(3)]


def _table(b=1, h=2, m=3):
    return torch.ones(b, h, m, m, dtype=torch.bool)


def _bsa(*, q=None, k=None, v=None, mask=None, **kwargs):
    """block_sparse_attention on good inputs, with the given ones swapped in."""
    good_q, good_k, good_v = _qkv()
    q, k, v = (good if x is None else x for good, x in ((good_q, q), (good_k, k), (good_v, v)))
    mask = table_mask(_table(), N, block_size=BS) if mask is None else mask
    return block_sparse_attention(q, k, v, mask, **kwargs)


def _raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------ block_sparse_attention


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _bsa(k=_qkv(b=2)[0], v=_qkv(b=2)[0]), ValueError, r"k \(2, 2, 40, 64\)", id="batch"),
    pytest.param(lambda: _bsa(k=_qkv(h=1)[0], v=_qkv(h=1)[0]), ValueError, r"k \(1, 1, 40, 64\)", id="heads"),
    pytest.param(lambda: _bsa(k=_qkv(d=32)[0], v=_qkv(d=32)[0]), ValueError, r"k \(1, 2, 40, 32\)", id="head-dim"),
    pytest.param(lambda: _bsa(v=_qkv(n=41)[0]), ValueError, r"v \(1, 2, 41, 64\)", id="k-vs-v"),
    pytest.param(lambda: _bsa(q=_qkv()[0][0]), ValueError, r"q must be a 4-D.*\(2, 40, 64\)", id="3-D"),
    pytest.param(lambda: _bsa(q=[[1.0]]), TypeError, "q must be a torch.Tensor.*list", id="not-a-tensor"),
    pytest.param(lambda: _bsa(q=_qkv(n=0)[0]), ValueError, r"q \(1, 2, 0, 64\).*must not be empty", id="empty-seq"),
    pytest.param(lambda: _bsa(q=_qkv(b=0)[0], k=_qkv(b=0)[0], v=_qkv(b=0)[0]), ValueError, r"q \(0, 2, 40, 64\)",
                 id="empty-batch"),
    pytest.param(lambda: block_sparse_attention(*_qkv(d=160), _table(), block_size=BS), ValueError,
                 r"head dim D=160.*<= 128", id="head-dim-160"),
    pytest.param(lambda: _bsa(out=torch.empty(1, 2, 40, 32, dtype=BF16)), ValueError, r"out must be.*\(1, 2, 40, 32\)",
                 id="out-shape"),
    pytest.param(lambda: _bsa(out="buffer"), TypeError, "out must be a tensor.*str", id="out-type"),
])
def test_block_sparse_shapes(call, error, match):
    _raises(call, error, match)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _bsa(q=_qkv(dtype=torch.int32)[0]), TypeError, "q, k, v.*torch.int32", id="integer"),
    pytest.param(lambda: block_sparse_attention(*_qkv(dtype=torch.float32), _table(), block_size=BS), TypeError,
                 "float16 or all bfloat16, got torch.float32", id="float32"),
    pytest.param(lambda: _bsa(k=_qkv(dtype=torch.float16)[0]), TypeError, "torch.bfloat16, torch.float16", id="mixed"),
    pytest.param(lambda: _bsa(out=torch.empty(1, 2, N, D)), ValueError, "out must be.*got.*torch.float32",
                 id="out-dtype"),
])
def test_block_sparse_dtypes(call, error, match):
    _raises(call, error, match)


def _mask_on_meta() -> BlockSparseMask:
    """A mask whose tables live on another device (the checks of a real one on meta would need its values)."""
    mask = table_mask(_table(), N, block_size=BS)
    object.__setattr__(mask, "full_counts", mask.full_counts.to("meta"))  # `device` is read from it
    return mask


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _bsa(k=_qkv()[0].to("meta")), ValueError, "one device, got cpu, meta, cpu", id="k-on-meta"),
    pytest.param(lambda: block_sparse_attention(*(t.to("meta") for t in _qkv()), _table(), block_size=BS),
                 NotImplementedError, "not on meta", id="all-on-meta"),
    pytest.param(lambda: _bsa(mask=_mask_on_meta()), ValueError, "block_mask is on meta but q is on cpu",
                 id="mask-on-meta"),
])
def test_block_sparse_devices(call, error, match):
    _raises(call, error, match)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_block_sparse_output_is_in_the_graph_of_inputs_that_need_gradients(which):
    inputs = dict(zip("qkv", _qkv()))
    inputs[which].requires_grad_()
    assert _bsa(**inputs).grad_fn is not None  # never silently detached (gradients: test_block_sparse_backward.py)
    with torch.no_grad():  # grad mode off: no graph
        assert _bsa(**inputs).grad_fn is None


def _mask_fields(**changes):
    good = table_mask(_table(), N, block_size=BS)
    return {**{f.name: getattr(good, f.name) for f in dataclasses.fields(good)}, **changes}


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _bsa(mask=table_mask(_table(m=4), 64, block_size=BS)), ValueError,
                 r"block_mask is for \(N_q, N_k\) = \(64, 64\), inputs have \(40, 40\)", id="other-length"),
    pytest.param(lambda: _bsa(mask=table_mask(_table(h=3), N, block_size=BS)), ValueError,
                 r"block_mask batch/head dims \(1, 3\)", id="other-heads"),
    pytest.param(lambda: _bsa(mask=table_mask(_table(b=2), N, block_size=BS)), ValueError,
                 r"block_mask batch/head dims \(2, 2\)", id="other-batch"),
    pytest.param(lambda: _bsa(mask=_table(m=2), block_size=BS), ValueError, r"\(2, 2\) blocks; q_len=40", id="table-blocks"),
    pytest.param(lambda: _bsa(mask=_table().float(), block_size=BS), TypeError, "bool.*torch.float32", id="table-dtype"),
    pytest.param(lambda: _bsa(mask=_table()[0], block_size=BS), ValueError, r"4-D.*\(2, 3, 3\)", id="table-3-D"),
    pytest.param(lambda: _bsa(mask=[[True]]), TypeError, "block_mask must be.*list", id="mask-type"),
    pytest.param(lambda: _bsa(mask=_table(), block_size=24), ValueError, "block_size must be a power of two.*24",
                 id="block-24"),
    pytest.param(lambda: _bsa(mask=_table(m=1), block_size=512), ValueError, "block_size.*512", id="block-512"),
    pytest.param(lambda: _bsa(mask=_table(), block_size="16"), TypeError, "block_size must be an int.*'16'",
                 id="block-str"),
    pytest.param(lambda: BlockSparseMask(**_mask_fields(full_indices=_mask_fields()["full_indices"].long())),
                 TypeError, "full_indices must be an int32 tensor, got torch.int64", id="index-int64"),
    pytest.param(lambda: BlockSparseMask(**_mask_fields(partial_counts=[1, 2, 3])), TypeError,
                 "partial_counts must be an int32 tensor, got list", id="counts-list"),
    pytest.param(lambda: BlockSparseMask(**_mask_fields(partial_indices=_mask_fields()["partial_indices"][0])),
                 ValueError, r"partial_indices must be on cpu with shape \(1, 2, 3\) \+ \(W,\)", id="indices-3-D"),
    pytest.param(lambda: BlockSparseMask(**_mask_fields(q_len=0)), ValueError, "q_len must be >= 1, got 0", id="q_len-0"),
    pytest.param(lambda: BlockSparseMask(**_mask_fields(rule="causal")), ValueError, "rule must be one of.*'causal'",
                 id="rule"),
    pytest.param(lambda: BlockSparseMask(**_mask_fields(rule="interval")), ValueError, r"q_aux of shape \(40, 2\)",
                 id="interval-without-bounds"),
])
def test_block_sparse_masks(call, error, match):
    _raises(call, error, match)


@pytest.mark.parametrize("call, error, match", [
    *(pytest.param(lambda s=s: _bsa(scale=s), ValueError, f"scale must be positive and finite, got {s}", id=f"scale-{s}")
      for s in (0.0, -0.5, float("nan"), float("inf"))),
    pytest.param(lambda: _bsa(scale="0.1"), TypeError, "scale must be a Python float.*str", id="scale-str"),
    pytest.param(lambda: _bsa(scale=torch.tensor(0.1)), TypeError, "scale must be a Python float.*Tensor",
                 id="scale-tensor"),
    pytest.param(lambda: _bsa(config="fast"), TypeError, "config must be a KernelConfig.*str", id="config-type"),
    pytest.param(lambda: _bsa(config=KernelConfig(32, 16, 4, 2)), ValueError,
                 "config tiles 32x16 must divide the mask's block_size=16", id="tile-too-big"),
    pytest.param(lambda: KernelConfig(0, 16), ValueError, "block_m must be a power of two >= 16, got 0", id="block_m-0"),
    pytest.param(lambda: KernelConfig(16, 48), ValueError, "block_n must be a power of two >= 16, got 48", id="block_n-48"),
    pytest.param(lambda: KernelConfig(num_warps=0), ValueError, "num_warps must be a positive int, got 0", id="warps-0"),
    pytest.param(lambda: KernelConfig(num_stages=1.5), ValueError, "num_stages must be a positive int, got 1.5",
                 id="stages-float"),
])
def test_block_sparse_scale_and_config(call, error, match):
    _raises(call, error, match)


# -------------------------------------------------------------------------------------------- mask builders


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: local_3d_mask((2, 4, 4), (-1, 1, 1), BS), ValueError, r"radius must be.*\(-1, 1, 1\)",
                 id="radius-negative"),
    pytest.param(lambda: local_3d_mask((2, 4), (1, 1, 1), BS), ValueError, r"grid must be 3 ints.*\(2, 4\)", id="grid-2"),
    pytest.param(lambda: local_3d_mask((2, 2048, 2), (1, 1, 1), BS), ValueError, r"grid.*\[1, 1024\].*2048",
                 id="grid-too-big"),
    pytest.param(lambda: local_3d_mask((2, 4, 4), (1, 1, 1), BS, num_global=-2), ValueError, "num_global.*-2",
                 id="num_global"),
    pytest.param(lambda: local_3d_mask((2, 4, 4), (1, 1, 1), 100), ValueError, "block_size.*100", id="local-block"),
    pytest.param(lambda: strided_shards_mask(2, 64, 0, block_size=BS), ValueError, "num_shards must be an int >= 1, got 0",
                 id="shards-0"),
    pytest.param(lambda: strided_shards_mask(2, 64, 3, block_size=BS), ValueError, r"num_shards.*num_heads=2.*got 3",
                 id="shards-over-heads"),
    pytest.param(lambda: strided_shards_mask(2, 64, 1, local_blocks=-1, block_size=BS), ValueError,
                 "local_blocks must be an int >= 0, got -1", id="local_blocks"),
    pytest.param(lambda: strided_shards_mask(2, 0, 1, block_size=BS), ValueError, "seq_len must be >= 1, got 0",
                 id="seq_len-0"),
    pytest.param(lambda: block_diagonal_mask([4, 0, 3], BS), ValueError, r"segment lengths.*\[4, 0, 3\]", id="segment-0"),
    pytest.param(lambda: block_diagonal_mask([], BS), ValueError, r"segment lengths.*\[\]", id="segments-empty"),
    pytest.param(lambda: interval_mask(torch.zeros(4), torch.ones(4), 4, BS), TypeError, "lo and hi.*torch.float32",
                 id="interval-float"),
    pytest.param(lambda: interval_mask(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), 0, BS),
                 ValueError, "kv_len must be >= 1, got 0", id="interval-kv_len-0"),
    pytest.param(lambda: interval_mask(torch.zeros(4, dtype=torch.long), torch.ones(3, dtype=torch.long), 4, BS),
                 ValueError, r"lo and hi.*\(4,\), \(3,\)", id="interval-lengths"),
    pytest.param(lambda: table_mask(_table(), 0, block_size=BS), ValueError, "q_len must be >= 1, got 0", id="table-q_len-0"),
])
def test_mask_builders(call, error, match):
    _raises(call, error, match)


# ---------------------------------------------------------------------------------------- linear attention


def _la(**changes):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    args = {"q": q, "k": k, "v": v, **changes}
    return linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def _state(b=1, h=2, d=16, dtype=torch.float32):
    return LinearAttentionState(torch.zeros(b, h, d, d, dtype=dtype), torch.zeros(b, h, d, dtype=dtype))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _la(q=_x(2, 8, 16)), ValueError, r"q must be a 4-D.*\(2, 8, 16\)", id="3-D"),
    pytest.param(lambda: _la(k="k"), TypeError, "k must be a 4-D.*str", id="not-a-tensor"),
    pytest.param(lambda: _la(k=_x(1, 1, 8, 16), v=_x(1, 1, 8, 16)), ValueError, r"k \(1, 1, 8, 16\).*heads", id="heads"),
    pytest.param(lambda: _la(k=_x(2, 2, 8, 16), v=_x(2, 2, 8, 16)), ValueError, r"k \(2, 2, 8, 16\).*batch", id="batch"),
    pytest.param(lambda: _la(k=_x(1, 2, 8, 8), v=_x(1, 2, 8, 8)), ValueError, r"k \(1, 2, 8, 8\).*head dim", id="head-dim"),
    pytest.param(lambda: _la(v=_x(1, 2, 3, 16)), ValueError, r"v \(1, 2, 3, 16\).*same shape", id="k-vs-v"),
    pytest.param(lambda: _la(q=_x(1, 1, 4, 130), k=_x(1, 1, 4, 130), v=_x(1, 1, 4, 130)), ValueError, "head dim 130",
                 id="head-dim-130"),
    pytest.param(lambda: _la(q=_x(0, 2, 8, 16), k=_x(0, 2, 8, 16), v=_x(0, 2, 8, 16)), ValueError,
                 r"q \(0, 2, 8, 16\): batch and heads must not be empty", id="empty-batch"),
    pytest.param(lambda: _la(out=torch.empty(1, 2, 8, 8)), ValueError, r"out must match q.*got.*\(1, 2, 8, 8\)",
                 id="out-shape"),
    pytest.param(lambda: _la(out="o"), TypeError, "out must be a tensor.*str", id="out-type"),
    pytest.param(lambda: block_causal_linear_attention(_x(1, 2, 3, 16), _x(1, 2, 8, 16), _x(1, 2, 8, 16)), ValueError,
                 r"q \(1, 2, 3, 16\) vs k \(1, 2, 8, 16\)", id="chunk-q-vs-k"),
])
def test_linear_attention_shapes(call, error, match):
    _raises(call, error, match)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _la(k=_x(1, 2, 8, 16, dtype=torch.float16)), TypeError, "torch.float32, torch.float16", id="mixed"),
    pytest.param(lambda: _la(**{n: _x(1, 2, 8, 16).int() for n in "qkv"}), TypeError, "fp16, bf16, fp32; got torch.int32",
                 id="integer"),
    pytest.param(lambda: _la(**{n: _x(1, 2, 8, 16, dtype=torch.float64) for n in "qkv"}), TypeError, "torch.float64",
                 id="float64"),
    pytest.param(lambda: _la(out=torch.empty(1, 2, 8, 16, dtype=torch.float16)), ValueError, "out must match.*torch.float16",
                 id="out-dtype"),
    pytest.param(lambda: _la(k=_x(1, 2, 8, 16).to("meta")), ValueError, "one device; got cpu, meta, cpu", id="device"),
])
def test_linear_attention_dtypes_and_devices(call, error, match):
    _raises(call, error, match)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: _la(rotary="abc"), TypeError, r"rotary must be None, RotaryTables or a \(freqs_cos, freqs_sin\) "
                 "pair of tensors, got str", id="rotary-str"),
    pytest.param(lambda: _la(rotary=(torch.ones(8, 16),) * 3), TypeError, "rotary.*3-element tuple", id="rotary-triple"),
    pytest.param(lambda: _la(rotary=(torch.ones(8, 16, dtype=torch.int32),) * 2), TypeError,
                 "rotary cos table must be floating point, got torch.int32", id="rotary-int"),
    pytest.param(lambda: _la(rotary=(torch.ones(5, 16),) * 2), ValueError, r"rotary cos table of shape \(5, 16\)",
                 id="rotary-tokens"),
    pytest.param(lambda: _la(q=_x(1, 2, 3, 16), rotary=(torch.ones(8, 16),) * 2), ValueError, "as many queries as keys: 3",
                 id="rotary-lengths"),
    pytest.param(lambda: _la(**{n: _x(1, 2, 8, 15) for n in "qkv"}, rotary=(torch.ones(8, 15),) * 2), ValueError,
                 "head dim 15 must be even", id="rotary-odd-dim"),
    pytest.param(lambda: _la(eps="tiny"), TypeError, "eps must be a Python float, got str", id="eps-str"),
    pytest.param(lambda: _la(eps=-1e-6), ValueError, "eps must be finite and >= 0, got -1e-06", id="eps-negative"),
    pytest.param(lambda: _la(eps=float("nan")), ValueError, "eps must be finite and >= 0, got nan", id="eps-nan"),
    pytest.param(lambda: block_causal_linear_attention(*(_x(1, 2, 8, 16) for _ in range(3)), state=_state(d=8)),
                 ValueError, r"state.kv .*float32 \(1, 2, 16, 16\).*\(1, 2, 8, 8\)", id="state-dim"),
    pytest.param(lambda: block_causal_linear_attention(*(_x(1, 2, 8, 16) for _ in range(3)), state=_state(dtype=torch.half)),
                 ValueError, "state.kv .*got torch.float16", id="state-dtype"),
    pytest.param(lambda: block_causal_linear_attention(*(_x(1, 2, 8, 16) for _ in range(3)), state=_state()[0]),
                 TypeError, "state must be a LinearAttentionState.*Tensor", id="state-type"),
])
def test_linear_attention_options(call, error, match):
    _raises(call, error, match)


# ---------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: apply_sparse_attention(tm.flux()), NotImplementedError,
                 "supports WanTransformer3DModel, HunyuanVideoTransformer3DModel, not model=FluxTransformer2DModel",
                 id="sparse-unsupported-model"),
    pytest.param(lambda: apply_sparse_attention("wan"), TypeError, "model must be a torch.nn.Module.*str",
                 id="sparse-not-a-module"),
    pytest.param(lambda: apply_sparse_attention(tm.wan(), pattern="locall_3d"), ValueError,
                 "unknown sparse attention pattern 'locall_3d'; available: 'local_3d', 'strided_shards', 'dense'",
                 id="pattern-name"),
    pytest.param(lambda: apply_sparse_attention(tm.wan(), pattern=3), TypeError,
                 "pattern must be a name \\('local_3d', 'strided_shards', 'dense'\\).*int", id="pattern-type"),
    pytest.param(lambda: local_3d(radius=(-1, 2, 2)), ValueError, r"radius must be.*\(-1, 2, 2\)", id="radius-negative"),
    pytest.param(lambda: local_3d(radius=4), ValueError, "radius must be 3 ints.*got 4", id="radius-scalar"),
    pytest.param(lambda: local_3d(block_size=100), ValueError, "block_size must be a power of two.*100", id="local-block"),
    pytest.param(lambda: strided_shards(num_shards=0), ValueError, "num_shards must be an int >= 1, got 0", id="shards-0"),
    pytest.param(lambda: strided_shards(local_blocks=-1), ValueError, "local_blocks must be an int >= 0, got -1",
                 id="local_blocks-negative"),
    pytest.param(lambda: dense(block_size=96), ValueError, "block_size must be a power of two.*96", id="dense-block"),
    pytest.param(lambda: apply_linear_attention_kernels(tm.flux()), ValueError,
                 "FluxTransformer2DModel has no SANA linear self-attention", id="linear-unsupported-model"),
    pytest.param(lambda: apply_linear_attention_kernels(None), TypeError, "model must be a torch.nn.Module.*NoneType",
                 id="linear-not-a-module"),
])
def test_processors(call, error, match):
    _raises(call, error, match)


def test_a_pattern_that_returns_no_mask_is_refused_at_the_first_forward():
    model = tm.wan().to(BF16)
    restore = apply_sparse_attention(model, pattern=lambda grid, heads, device: "mask")
    with torch.no_grad(), pytest.raises(TypeError, match="must return a BlockSparseMask, got str"):
        model(**{k: v.to(BF16) for k, v in tm.inputs(model).items()}, timestep=torch.full((1,), 500.0))
    restore()
