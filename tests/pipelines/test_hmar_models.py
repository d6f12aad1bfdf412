"""HMAR's transformer on tiny random-init models (CPU, float64 for exactness): save / load, the block-diagonal full
forward against per-scale forwards, and the public checkpoint keys (NVlabs/HMAR models/hmar.py) both ways."""

import pytest
import torch

from accel.pipelines.hmar import CheckpointKeyError, HMARTransformer, VARTokenizer, load_hmar
from accel.pipelines.hmar.loaders import HMAR_KEYS

SCALES = (1, 2, 4)
C, HEADS, V, CVAE, CLASSES = 32, 2, 64, 8, 5
L = sum(s * s for s in SCALES)


def tiny_hmar(depth=3, branch_depth=1) -> HMARTransformer:
    return HMARTransformer(num_classes=CLASSES, depth=depth, width=C, num_heads=HEADS, vocab_size=V, codebook_dim=CVAE,
                           scales=SCALES, branch_depth=branch_depth)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = VARTokenizer(vocab_size=V, codebook_dim=CVAE, scales=SCALES, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                       norm_num_groups=4).double().eval()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    return tiny_hmar().double().eval(), tok, tok.encode(images)


def test_save_load_round_trip(models, tmp_path):
    model, tok, indices = models
    inputs, labels = tok.teacher_forcing_input(indices), torch.tensor([0, 2])
    model.save_pretrained(tmp_path)
    loaded = HMARTransformer.from_pretrained(tmp_path).double()
    assert (len(loaded.base_blocks), len(loaded.next_scale_blocks), len(loaded.mask_blocks)) == (2, 1, 1)
    assert torch.equal(loaded(labels, inputs), model(labels, inputs))


def test_block_diagonal_full_forward_equals_per_scale_forwards(models):
    model, tok, indices = models
    labels = torch.tensor([1, 4])
    full = model(labels, tok.teacher_forcing_input(indices))
    cond, f_hats = model.embeddings.condition(labels), tok.cumulative_reconstructions(indices)
    for k in range(len(SCALES)):
        scale_input = None if k == 0 else tok.scale_input(k, f_hats[k - 1])
        torch.testing.assert_close(model.scale_logits(k, cond, scale_input), full[:, model.layout.span(k)],
                                   rtol=1e-10, atol=1e-10)


def test_masked_full_forward_equals_per_scale_masked_forwards(models):
    model, tok, indices = models
    labels = torch.tensor([3, 0])
    inputs, own = tok.teacher_forcing_input(indices), tok.scale_embeddings(indices)
    hidden = torch.rand(2, L - 1, generator=torch.Generator().manual_seed(2)) < 0.5
    full = model.masked_forward(labels, inputs, own, hidden)
    cond = model.embeddings.condition(labels)
    for k in range(1, len(SCALES)):
        span = model.layout.span(k)
        rest = slice(span.start - 1, span.stop - 1)  # inputs start at scale 1
        per_scale = model.masked_scale_logits(k, cond, inputs[:, rest], own[:, rest], hidden[:, rest])
        torch.testing.assert_close(per_scale, full[:, span], rtol=1e-10, atol=1e-10)
    # Hiding a token changes what the mask branch sees; the next-scale branch never sees tokens of its own scale.
    assert not torch.allclose(full, model.masked_forward(labels, inputs, own, ~hidden))


def test_scales_do_not_see_each_other(models):
    """Changing scale 1's input leaves the logits of scales 0 and 2 untouched (no attention across scales)."""
    model, tok, indices = models
    labels, inputs = torch.tensor([1, 1]), tok.teacher_forcing_input(indices)
    changed = inputs.clone()
    changed[:, :4] += 1.0
    a, b = model(labels, inputs), model(labels, changed)
    span1 = model.layout.span(1)
    assert torch.equal(a[:, : span1.start], b[:, : span1.start]) and torch.equal(a[:, span1.stop:], b[:, span1.stop:])
    assert not torch.allclose(a[:, span1], b[:, span1])


def test_bf16_runs_the_block_sparse_kernel_path(models):
    """bf16 goes to block_sparse_attention (the Triton kernel under TRITON_INTERPRET=1); it matches the fp64 model."""
    model, tok, indices = models
    labels, inputs = torch.tensor([1, 2]), tok.teacher_forcing_input(indices)
    reference = model(labels, inputs)
    with torch.no_grad():
        low = tiny_hmar().to(torch.bfloat16)
        low.load_state_dict(model.state_dict())
        logits = low(labels, inputs)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()


def public_hmar_state(depth=3, branch=1) -> dict[str, torch.Tensor]:
    """An HMAR-shaped state dict with HMAR's own names (HMAR class of models/hmar.py), buffers included."""
    shapes = {
        "class_emb.weight": (CLASSES + 1, C), "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (3, C),
        "word_embed.weight": (C, CVAE), "word_embed_bias": (C,), "mask_embed.weight": (1, C),
        "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
    }
    for head in ("ns_head", "mask_head"):
        shapes |= {f"{head}_nm.ada_lin.1.weight": (2 * C, C), f"{head}_nm.ada_lin.1.bias": (2 * C,),
                   f"{head}.weight": (V, C), f"{head}.bias": (V,)}
    for stack, count in (("base_blocks", depth - branch), ("ns_blocks", branch), ("mask_blocks", branch)):
        for i in range(count):
            p = f"{stack}.{i}."
            shapes |= {
                p + "attn.mat_qkv.weight": (3 * C, C), p + "attn.q_bias": (C,), p + "attn.v_bias": (C,),
                p + "attn.zero_k_bias": (C,), p + "attn.scale_mul_1H11": (1, HEADS, 1, 1), p + "attn.proj.weight": (C, C),
                p + "attn.proj.bias": (C,), p + "ffn.fc1.weight": (4 * C, C), p + "ffn.fc1.bias": (4 * C,),
                p + "ffn.fc2.weight": (C, 4 * C), p + "ffn.fc2.bias": (C,), p + "ada_lin.1.weight": (6 * C, C),
                p + "ada_lin.1.bias": (6 * C,),
            }
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_hmar_keys_map_onto_ours_and_back(tmp_path):
    public = public_hmar_state()
    torch.save(public, tmp_path / "hmar-d3.pth")
    model = load_hmar(tiny_hmar(), tmp_path / "hmar-d3.pth")
    ours = model.state_dict()
    assert torch.equal(ours["base_blocks.1.attn.to_qkv.weight"], public["base_blocks.1.attn.mat_qkv.weight"])
    assert torch.equal(ours["next_scale_blocks.0.mlp.fc_in.weight"], public["ns_blocks.0.ffn.fc1.weight"])
    assert torch.equal(ours["mask_blocks.0.attn.value_bias"], public["mask_blocks.0.attn.v_bias"])
    assert torch.equal(ours["next_scale_head.modulation.weight"], public["ns_head_nm.ada_lin.1.weight"])
    assert torch.equal(ours["mask_head.proj.bias"], public["mask_head.bias"])
    assert torch.equal(ours["token_embed_bias"], public["word_embed_bias"])
    assert torch.equal(ours["mask_embedding.weight"], public["mask_embed.weight"])
    back = HMAR_KEYS.to_public(ours)
    assert set(back) == {k for k in public if not HMAR_KEYS.is_dropped(k)}
    assert all(torch.equal(back[k], public[k]) for k in back)


def test_hmar_checkpoint_of_another_split_is_refused_with_the_keys():
    """A checkpoint with 2 mask blocks into a model with 1: the extra block is listed, nothing loads silently."""
    with pytest.raises(CheckpointKeyError) as info:
        load_hmar(tiny_hmar(depth=3, branch_depth=1), public_hmar_state(depth=3, branch=2))
    assert "mask_blocks.1.attn.to_qkv.weight" in str(info.value)  # unexpected
    assert "base_blocks.1.attn.to_qkv.weight" in info.value.missing


def test_bad_configs():
    with pytest.raises(ValueError, match="branch_depth"):
        tiny_hmar(depth=2, branch_depth=3)
    with pytest.raises(ValueError, match="divisible"):
        HMARTransformer(depth=2, width=30, num_heads=4, scales=SCALES)
