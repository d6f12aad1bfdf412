"""Loading the public VAR transformer and tokenizer checkpoints: state dicts built by hand under the original names
of FoundationVision/VAR (models/var.py, basic_var.py, vqvae.py, quant.py), since nothing can be downloaded here."""

import pytest
import torch
from safetensors.torch import save_file

from accel.pipelines.hmar import CheckpointKeyError, VARTokenizer, VARTransformer, load_var, load_var_tokenizer
from accel.pipelines.hmar.loaders import TOKENIZER_KEYS, VAR_KEYS

DEPTH, C, HEADS, V, CVAE, CLASSES, SCALES = 2, 32, 2, 64, 8, 5, (1, 2, 4)
L = sum(s * s for s in SCALES)


def public_var_state(seed=0) -> dict[str, torch.Tensor]:
    """A VAR-shaped state dict with VAR's own key names (attn_l2_norm=True, shared_aln=False), buffers included."""
    shapes = {
        "class_emb.weight": (CLASSES + 1, C), "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (3, C),
        "word_embed.weight": (C, CVAE), "word_embed.bias": (C,), "head_nm.ada_lin.1.weight": (2 * C, C),
        "head_nm.ada_lin.1.bias": (2 * C,), "head.weight": (V, C), "head.bias": (V,),
        "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
    }
    for i in range(DEPTH):
        shapes |= {
            f"blocks.{i}.attn.mat_qkv.weight": (3 * C, C), f"blocks.{i}.attn.q_bias": (C,),
            f"blocks.{i}.attn.v_bias": (C,), f"blocks.{i}.attn.zero_k_bias": (C,),
            f"blocks.{i}.attn.scale_mul_1H11": (1, HEADS, 1, 1), f"blocks.{i}.attn.proj.weight": (C, C),
            f"blocks.{i}.attn.proj.bias": (C,), f"blocks.{i}.ffn.fc1.weight": (4 * C, C), f"blocks.{i}.ffn.fc1.bias": (4 * C,),
            f"blocks.{i}.ffn.fc2.weight": (C, 4 * C), f"blocks.{i}.ffn.fc2.bias": (C,),
            f"blocks.{i}.ada_lin.1.weight": (6 * C, C), f"blocks.{i}.ada_lin.1.bias": (6 * C,),
        }
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def tiny_var() -> VARTransformer:
    return VARTransformer(num_classes=CLASSES, depth=DEPTH, width=C, num_heads=HEADS, vocab_size=V, codebook_dim=CVAE,
                          scales=SCALES)


def tiny_tokenizer() -> VARTokenizer:
    return VARTokenizer(vocab_size=V, codebook_dim=CVAE, scales=SCALES, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                        norm_num_groups=4)


def test_var_keys_map_onto_ours_and_back():
    public = public_var_state()
    model = load_var(tiny_var(), public)
    ours = model.state_dict()
    assert torch.equal(ours["blocks.1.attn.to_qkv.weight"], public["blocks.1.attn.mat_qkv.weight"])
    assert torch.equal(ours["blocks.0.attn.query_bias"], public["blocks.0.attn.q_bias"])
    assert torch.equal(ours["blocks.0.attn.log_scale"], public["blocks.0.attn.scale_mul_1H11"])
    assert torch.equal(ours["blocks.1.mlp.fc_out.weight"], public["blocks.1.ffn.fc2.weight"])
    assert torch.equal(ours["blocks.1.modulation.bias"], public["blocks.1.ada_lin.1.bias"])
    assert torch.equal(ours["head.modulation.weight"], public["head_nm.ada_lin.1.weight"])
    assert torch.equal(ours["head.proj.weight"], public["head.weight"])
    assert torch.equal(ours["embeddings.position_embedding"], public["pos_1LC"])
    back = VAR_KEYS.to_public(ours)
    dropped = {k for k in public if VAR_KEYS.is_dropped(k)}
    assert dropped == {"lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"}
    assert set(back) == set(public) - dropped
    assert all(torch.equal(back[k], public[k]) for k in back)


def test_var_loads_from_torch_and_safetensors_files(tmp_path):
    public = public_var_state()
    torch.save(public, tmp_path / "var_d2.pth")
    save_file(public, tmp_path / "var_d2.safetensors")
    for name in ("var_d2.pth", "var_d2.safetensors"):
        model = load_var(tiny_var(), tmp_path / name)
        assert torch.equal(model.token_embed.bias, public["word_embed.bias"])


def test_var_checkpoint_with_missing_unexpected_and_misshapen_keys_is_refused():
    public = public_var_state()
    del public["blocks.1.ffn.fc1.bias"]
    public["blocks.0.attn.extra_thing"] = torch.zeros(1)
    public["head.weight"] = torch.zeros(V + 1, C)
    with pytest.raises(CheckpointKeyError) as info:
        load_var(tiny_var(), public)
    message = str(info.value)
    assert "blocks.1.mlp.fc_in.bias" in message and "blocks.0.attn.extra_thing" in message
    assert "head.proj.weight: checkpoint (65, 32) vs model (64, 32)" in message
    assert info.value.missing == ["blocks.1.mlp.fc_in.bias"]


def test_deeper_checkpoint_lists_the_blocks_the_model_lacks():
    with pytest.raises(CheckpointKeyError, match="blocks.1.attn.to_qkv.weight"):
        load_var(VARTransformer(num_classes=CLASSES, depth=1, width=C, num_heads=HEADS, vocab_size=V,
                                codebook_dim=CVAE, scales=SCALES), public_var_state())


def test_tokenizer_keys_map_onto_ours_and_back(tmp_path):
    source = tiny_tokenizer()
    ours = source.state_dict()
    # VAR's module names, unchanged for the convolutional parts (basic_vae.py).
    for name in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                 "encoder.down.1.attn.0.qkv.weight", "encoder.mid.attn_1.proj_out.weight", "decoder.up.1.upsample.conv.weight",
                 "decoder.up.1.attn.1.norm.weight", "decoder.up.0.block.0.nin_shortcut.weight", "decoder.conv_out.bias"):
        assert name in ours, name
    public = {k: v for k, v in ours.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    public["quantize.embedding.weight"] = torch.randn(V, CVAE)
    public["quantize.ema_vocab_hit_SV"] = torch.zeros(len(SCALES), V)
    for i in range(4):
        public[f"quantize.quant_resi.qresi_ls.{i}.weight"] = torch.randn(CVAE, CVAE, 3, 3)
        public[f"quantize.quant_resi.qresi_ls.{i}.bias"] = torch.randn(CVAE)
    torch.save(public, tmp_path / "vae.pth")
    model = load_var_tokenizer(tiny_tokenizer(), tmp_path / "vae.pth")
    assert torch.equal(model.codebook.weight, public["quantize.embedding.weight"])
    assert torch.equal(model.phi[2].weight, public["quantize.quant_resi.qresi_ls.2.weight"])
    back = TOKENIZER_KEYS.to_public(model.state_dict())
    assert set(back) == set(public) - {"quantize.ema_vocab_hit_SV"}
    del public["quantize.quant_resi.qresi_ls.3.bias"]
    with pytest.raises(CheckpointKeyError, match="phi.3.bias"):
        load_var_tokenizer(tiny_tokenizer(), public)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_var(tiny_var(), tmp_path / "list.pth")
