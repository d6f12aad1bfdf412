"""accel's linear-attention processors against diffusers' own on tiny SANA and SANA-Video transformers (kernels under
the Triton interpreter, see conftest.py)."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0

from accel.attention import linear as linear_module
from accel.attention.linear import (
    SanaLinearAttnKernelProcessor,
    SanaVideoLinearAttnKernelProcessor,
    apply_linear_attention_kernels,
)
from accel.kernels.linear_attention import backend

MODELS = {"sana": (tm.sana, SanaLinearAttnProcessor2_0), "sana_video": (tm.sana_video, SanaLinearAttnProcessor3_0)}
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    assert backend(torch.device("cpu")) == "interpreter", "the kernels must run interpreted, not the torch fallback"


def forward(model, dtype=torch.float32):
    inputs = {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in tm.inputs(model).items()
    }
    with torch.no_grad():
        return model(**inputs, timestep=tm.timestep(model, 500.0), return_dict=False)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_same_outputs_as_diffusers_and_exact_restore(name, dtype):
    build, diffusers_processor = MODELS[name]
    model = build().to(dtype)
    before = dict(model.attn_processors)
    expected = forward(model, dtype)

    restore = apply_linear_attention_kernels(model)
    after = model.attn_processors
    for key, processor in before.items():
        linear = type(processor) is diffusers_processor
        assert isinstance(after[key], SanaLinearAttnKernelProcessor | SanaVideoLinearAttnKernelProcessor) == linear
        assert linear or after[key] is processor  # cross-attention untouched
    got = forward(model, dtype)
    err = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert err <= TOL[dtype], f"{name} {dtype}: relative error {err:.3g}"

    restore()
    assert all(model.attn_processors[key] is processor for key, processor in before.items())
    assert torch.equal(forward(model, dtype), expected)


def test_rotary_tables_built_once_per_forward(monkeypatch):
    model = tm.sana_video()
    calls = []
    original = linear_module.RotaryTables.from_diffusers
    monkeypatch.setattr(
        linear_module.RotaryTables, "from_diffusers", lambda *a: calls.append(1) or original(*a)
    )
    apply_linear_attention_kernels(model)
    forward(model)
    forward(model)
    assert len(calls) == 2  # 3 layers share each forward's tables


def test_video_processor_without_rotary_is_plain_linear_attention():
    model = tm.sana_video()
    attn = model.transformer_blocks[0].attn1
    x = torch.randn(1, 20, attn.to_q.in_features)
    with torch.no_grad():
        expected = SanaLinearAttnKernelProcessor()(attn, x)
        assert torch.allclose(SanaVideoLinearAttnKernelProcessor()(attn, x, rotary_emb=None), expected)


def test_errors():
    with pytest.raises(ValueError, match="no SANA linear self-attention"):
        apply_linear_attention_kernels(tm.flux())
    model = tm.sana()
    apply_linear_attention_kernels(model)
    with pytest.raises(RuntimeError, match="already runs"):
        apply_linear_attention_kernels(model)
