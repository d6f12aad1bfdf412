"""Load the public VAR (FoundationVision/VAR) and HMAR (NVlabs/HMAR) checkpoints into this package's models.

The public files are plain state dicts (`vae_ch160v4096z32.pth`, `var_d16.pth`, `hmar-d16.pth`, ...); they are
read with safetensors or `torch.load(weights_only=True)` only. Keys are renamed by the tables below (`{i}` a block
index, `{rest}` any suffix; tensors keep their shapes); buffers the public models save but this package recomputes
are dropped. A checkpoint whose keys miss a parameter of the model, or hold keys no rule knows, is refused with
both lists; so is a tensor of the wrong shape.

Transformer blocks (VAR `blocks.{i}.`, HMAR `base_blocks.{i}.` / `ns_blocks.{i}.` / `mask_blocks.{i}.`):

| public                    | ours                          |
|---------------------------|-------------------------------|
| `attn.mat_qkv.weight`     | `attn.to_qkv.weight`          |
| `attn.q_bias`             | `attn.query_bias`             |
| `attn.v_bias`             | `attn.value_bias`             |
| `attn.scale_mul_1H11`     | `attn.log_scale`              |
| `attn.proj.{rest}`        | `attn.to_out.{rest}`          |
| `ffn.fc1.{rest}`          | `mlp.fc_in.{rest}`            |
| `ffn.fc2.{rest}`          | `mlp.fc_out.{rest}`           |
| `ada_lin.1.{rest}`        | `modulation.{rest}`           |
| `attn.zero_k_bias`        | (dropped: a zero buffer)      |

VAR transformer (`VARTransformer`):

| public                    | ours                                  |
|---------------------------|---------------------------------------|
| `class_emb.weight`        | `embeddings.class_embedding.weight`   |
| `pos_start`               | `embeddings.start_embedding`          |
| `pos_1LC`                 | `embeddings.position_embedding`       |
| `lvl_embed.weight`        | `embeddings.level_embedding.weight`   |
| `word_embed.{rest}`       | `token_embed.{rest}`                  |
| `blocks.{i}.{block}`      | `blocks.{i}.{block}` (table above)    |
| `head_nm.ada_lin.1.{rest}`| `head.modulation.{rest}`              |
| `head.{rest}`             | `head.proj.{rest}`                    |
| `lvl_1L`, `attn_bias_for_masking` | (dropped: recomputed)         |

HMAR transformer (`HMARTransformer`): the embeddings as VAR's, and

| public                        | ours                                  |
|-------------------------------|---------------------------------------|
| `word_embed.weight`           | `token_embed.weight`                  |
| `word_embed_bias`             | `token_embed_bias`                    |
| `mask_embed.weight`           | `mask_embedding.weight`               |
| `base_blocks.{i}.{block}`     | `base_blocks.{i}.{block}`             |
| `ns_blocks.{i}.{block}`       | `next_scale_blocks.{i}.{block}`       |
| `mask_blocks.{i}.{block}`     | `mask_blocks.{i}.{block}`             |
| `ns_head_nm.ada_lin.1.{rest}` | `next_scale_head.modulation.{rest}`   |
| `ns_head.{rest}`              | `next_scale_head.proj.{rest}`         |
| `mask_head_nm.ada_lin.1.{rest}`| `mask_head.modulation.{rest}`        |
| `mask_head.{rest}`            | `mask_head.proj.{rest}`               |

VAR tokenizer (`VARTokenizer`): `encoder.{rest}`, `decoder.{rest}`, `quant_conv.{rest}`, `post_quant_conv.{rest}`
unchanged (same module layout); `quantize.embedding.weight` -> `codebook.weight`;
`quantize.quant_resi.qresi_ls.{i}.{rest}` -> `phi.{i}.{rest}` (partially shared Phi, VAR's default) or
`quantize.quant_resi.qresi.{rest}` -> `phi.0.{rest}` (one shared Phi); `quantize.ema_vocab_hit_SV` dropped (training
statistics).

Configs are not in the public files: build the model with the checkpoint's shapes (VAR-d16: `VARTransformer(depth=16)`;
HMAR-d16: `HMARTransformer(depth=16, branch_depth=8)`; the tokenizer's defaults are VAR's) and load into it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import torch

BLOCK_RULES = (
    ("attn.mat_qkv.weight", "attn.to_qkv.weight"),
    ("attn.q_bias", "attn.query_bias"),
    ("attn.v_bias", "attn.value_bias"),
    ("attn.scale_mul_1H11", "attn.log_scale"),
    ("attn.proj.{rest}", "attn.to_out.{rest}"),
    ("ffn.fc1.{rest}", "mlp.fc_in.{rest}"),
    ("ffn.fc2.{rest}", "mlp.fc_out.{rest}"),
    ("ada_lin.1.{rest}", "modulation.{rest}"),
)
BLOCK_DROPPED = ("attn.zero_k_bias",)

EMBEDDING_RULES = (
    ("class_emb.weight", "embeddings.class_embedding.weight"),
    ("pos_start", "embeddings.start_embedding"),
    ("pos_1LC", "embeddings.position_embedding"),
    ("lvl_embed.weight", "embeddings.level_embedding.weight"),
)
PYRAMID_DROPPED = ("lvl_1L", "attn_bias_for_masking")


def _blocks(public: str, ours: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{public}.{{i}}.{p}", f"{ours}.{{i}}.{o}") for p, o in BLOCK_RULES)


def _blocks_dropped(public: str) -> tuple[str, ...]:
    return tuple(f"{public}.{{i}}.{d}" for d in BLOCK_DROPPED)


VAR_RULES = EMBEDDING_RULES + _blocks("blocks", "blocks") + (
    ("word_embed.{rest}", "token_embed.{rest}"),
    ("head_nm.ada_lin.1.{rest}", "head.modulation.{rest}"),
    ("head.{rest}", "head.proj.{rest}"),
)
VAR_DROPPED = PYRAMID_DROPPED + _blocks_dropped("blocks")

HMAR_RULES = EMBEDDING_RULES + _blocks("base_blocks", "base_blocks") + _blocks("ns_blocks", "next_scale_blocks") + (
    _blocks("mask_blocks", "mask_blocks") + (
        ("word_embed.weight", "token_embed.weight"),
        ("word_embed_bias", "token_embed_bias"),
        ("mask_embed.weight", "mask_embedding.weight"),
        ("ns_head_nm.ada_lin.1.{rest}", "next_scale_head.modulation.{rest}"),
        ("ns_head.{rest}", "next_scale_head.proj.{rest}"),
        ("mask_head_nm.ada_lin.1.{rest}", "mask_head.modulation.{rest}"),
        ("mask_head.{rest}", "mask_head.proj.{rest}"),
    ))
HMAR_DROPPED = PYRAMID_DROPPED + _blocks_dropped("base_blocks") + _blocks_dropped("ns_blocks") + _blocks_dropped("mask_blocks")

TOKENIZER_RULES = (
    ("encoder.{rest}", "encoder.{rest}"),
    ("decoder.{rest}", "decoder.{rest}"),
    ("quant_conv.{rest}", "quant_conv.{rest}"),
    ("post_quant_conv.{rest}", "post_quant_conv.{rest}"),
    ("quantize.embedding.weight", "codebook.weight"),
    ("quantize.quant_resi.qresi_ls.{i}.{rest}", "phi.{i}.{rest}"),
    ("quantize.quant_resi.qresi.{rest}", "phi.0.{rest}"),
)
TOKENIZER_DROPPED = ("quantize.ema_vocab_hit_SV",)


class CheckpointKeyError(ValueError):
    """A checkpoint that does not fit the model: the keys it lacks, the keys nobody maps, the shapes that differ."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"{what}: the checkpoint does not fit the model"]
        for name, keys in (("missing (the model's, absent from the checkpoint)", missing),
                           ("unexpected (the checkpoint's, no rule maps them)", unexpected),
                           ("shape mismatches", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {name}: {', '.join(keys)}")
        super().__init__("\n  ".join(parts))


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(regex + "$")


@dataclass(frozen=True)
class KeyMap:
    """Renaming rules between a public state dict (first of each pair) and ours (second), both ways."""

    rules: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]  # public keys with no counterpart: recomputed buffers, training statistics

    def _rename(self, key: str, to_ours: bool) -> str | None:
        for public, ours in self.rules:
            source, target = (public, ours) if to_ours else (ours, public)
            match = _pattern(source).match(key)
            if match:
                return target.format(**match.groupdict())
        return None

    def is_dropped(self, key: str) -> bool:
        return any(_pattern(d).match(key) for d in self.dropped)

    def to_ours(self, state_dict: dict) -> tuple[dict, list[str]]:
        """(renamed state dict, the public keys no rule maps)."""
        renamed, unknown = {}, []
        for key, tensor in state_dict.items():
            new = self._rename(key, to_ours=True)
            if new is not None:
                renamed[new] = tensor
            elif not self.is_dropped(key):
                unknown.append(key)
        return renamed, unknown

    def to_public(self, state_dict: dict) -> dict:
        """Our state dict under the public names (the dropped buffers are not recreated)."""
        renamed = {}
        for key, tensor in state_dict.items():
            new = self._rename(key, to_ours=False)
            if new is None:
                raise KeyError(f"no public name for {key!r}")
            renamed[new] = tensor
        return renamed


VAR_KEYS = KeyMap(VAR_RULES, VAR_DROPPED)
HMAR_KEYS = KeyMap(HMAR_RULES, HMAR_DROPPED)
TOKENIZER_KEYS = KeyMap(TOKENIZER_RULES, TOKENIZER_DROPPED)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file with weights_only=True (no code is unpickled)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (names to tensors), got {type(state).__name__}")
    return state


def load_public_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike | dict, keys: KeyMap) -> torch.nn.Module:
    """Load a public state dict (or a file of one) into `model` under `keys`; every parameter must come from it."""
    state = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
    renamed, unexpected = keys.to_ours(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected += sorted(k for k in renamed if k not in expected)
    mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in renamed.items() if k in expected and v.shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(type(model).__name__, missing, unexpected, mismatched)
    model.load_state_dict(renamed, strict=True)
    return model


def load_var(model, checkpoint):
    """A public VAR transformer checkpoint (`var_d16.pth`, ...) into a `VARTransformer` of its shape."""
    return load_public_checkpoint(model, checkpoint, VAR_KEYS)


def load_hmar(model, checkpoint):
    """A public HMAR checkpoint (`hmar-d16.pth`, ...) into an `HMARTransformer` of its shape."""
    return load_public_checkpoint(model, checkpoint, HMAR_KEYS)


def load_var_tokenizer(model, checkpoint):
    """VAR's public tokenizer (`vae_ch160v4096z32.pth`) into a `VARTokenizer` (defaults: its shape)."""
    return load_public_checkpoint(model, checkpoint, TOKENIZER_KEYS)
