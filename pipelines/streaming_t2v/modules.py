"""StreamingT2V's two memories as trainable diffusers models beside a frozen WanTransformer3DModel.

- `ConditionalAttentionModule` (CAM, short-term memory): a copy of the base's patch embedding and first K blocks
  run on the O conditioning frames (the previous chunk's last frames), with the base's time embedding and text.
  After base block i < K, the chunk's tokens attend, at each token position, over time to CAM block i's features
  of the conditioning frames (`TemporalCrossAttention`); the result enters as a residual through an output
  projection initialised at zero, so an untrained CAM leaves the base exactly unchanged.
- `AppearancePreservationModule` (APM, long-term memory): a pooled image embedding of the anchor frame (the first
  frame of the video) resampled by an MLP to 16 tokens; each cross-attention layer l reads the context
  `text + SiLU(alpha_l) * mix_l(text, image tokens)` with alpha_l initialised at 0 (exactly the text at init).
  mix_l is a linear map over the token axis ((T + 16) tokens -> T) and a LayerNorm, as the paper's Conv1d.

Both are `ModelMixin, ConfigMixin` (save_pretrained / from_pretrained with safetensors); `from_base` builds them for
a given base. How they enter the base (diffusers hooks, no edited classes) is in `hooks.py`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
from torch import nn
from torch.nn import functional as F

from accel.validation import check_int

NUM_IMAGE_TOKENS = 16  # the paper's resampler output


def _cloned(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _inner_dim(transformer: WanTransformer3DModel) -> int:
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


class TemporalCrossAttention(nn.Module):
    """Per token position, the chunk's frames (queries) attend over the conditioning frames (keys / values).

    Inputs are token sequences in Wan's order (frame-major: frame, row, column); the output is the residual to add,
    zero until trained (`to_out` starts at zero).
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.norm_context = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _per_position(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, frames * S, H * d) -> (B * S, H, frames, d): one temporal sequence per token position."""
        b, n, _ = x.shape
        x = x.view(b, frames, n // frames, self.heads, -1)
        return x.permute(0, 2, 3, 1, 4).reshape(b * (n // frames), self.heads, frames, -1)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, frames: int, context_frames: int) -> torch.Tensor:
        b, n, dim = hidden_states.shape
        per_frame = n // frames
        query = self._per_position(self.to_q(self.norm(hidden_states)), frames)
        context = self.norm_context(context.to(hidden_states.dtype))
        key = self._per_position(self.to_k(context), context_frames)
        value = self._per_position(self.to_v(context), context_frames)
        out = F.scaled_dot_product_attention(query, key, value)  # (B * S, H, frames, d)
        out = out.view(b, per_frame, self.heads, frames, -1).permute(0, 3, 1, 2, 4).reshape(b, n, dim)
        return self.to_out(out)


class ConditionalAttentionModule(ModelMixin, ConfigMixin):
    """CAM: the base's patch embedding and first `num_blocks` blocks, run on the conditioning frames, and one
    temporal cross-attention per copied block that feeds their features into the base."""

    _keep_in_fp32_modules = WanTransformer3DModel._keep_in_fp32_modules  # the copied blocks' norms, as in the base

    @register_to_config
    def __init__(
        self,
        num_blocks: int = 1,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        ffn_dim: int = 13824,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
    ):
        super().__init__()
        check_int(type(self).__name__, "num_blocks", num_blocks, minimum=1)
        dim = num_attention_heads * attention_head_dim
        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(
            WanTransformerBlock(dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
            for _ in range(num_blocks)
        )
        self.fusions = nn.ModuleList(TemporalCrossAttention(dim, num_attention_heads, eps) for _ in range(num_blocks))

    @classmethod
    def from_base(cls, transformer: WanTransformer3DModel, num_blocks: int) -> "ConditionalAttentionModule":
        """An untrained CAM for `transformer`: its patch embedding and first `num_blocks` blocks copied, the fusions'
        output projections at zero."""
        check_int(cls.__name__, "num_blocks", num_blocks, minimum=1)
        if num_blocks > len(transformer.blocks):
            raise ValueError(f"{cls.__name__}: num_blocks must be at most the base's {len(transformer.blocks)} blocks, "
                             f"got {num_blocks}")
        c = transformer.config
        cam = cls(num_blocks=num_blocks, patch_size=tuple(c.patch_size), num_attention_heads=c.num_attention_heads,
                  attention_head_dim=c.attention_head_dim, in_channels=c.in_channels, ffn_dim=c.ffn_dim,
                  cross_attn_norm=c.cross_attn_norm, qk_norm=c.qk_norm, eps=c.eps, rope_max_seq_len=c.rope_max_seq_len)
        # The copies take each tensor as the base holds it (device, and dtype: Wan keeps its norms in float32).
        cam.patch_embedding.load_state_dict(_cloned(transformer.patch_embedding), assign=True)
        for copy, block in zip(cam.blocks, transformer.blocks):
            copy.load_state_dict(_cloned(block), assign=True)
        cam.rope.to(transformer.device)
        cam.fusions.to(device=transformer.device, dtype=transformer.dtype)
        return cam

    def encode(self, conditioning: torch.Tensor, encoder_hidden_states: torch.Tensor,
               temb: torch.Tensor) -> list[torch.Tensor]:
        """The features after each copied block of the conditioning frames (B, C, O, h, w), given in the base's
        input form, with the base's projected text and time embedding of the current call. The frames take RoPE
        positions 0..O-1: the positions of the chunk's first O frames, which they overlap."""
        rotary = self.rope(conditioning)
        tokens = self.patch_embedding(conditioning.to(self.patch_embedding.weight.dtype))
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()
        features = []
        for block in self.blocks:
            tokens = block(tokens, encoder_hidden_states, temb, rotary)
            features.append(tokens)
        return features

    def fuse(self, index: int, hidden_states: torch.Tensor, features: torch.Tensor, context_frames: int) -> torch.Tensor:
        """Base block `index`'s output with CAM's residual added; `context_frames` token frames of conditioning."""
        per_frame = features.shape[1] // context_frames
        frames = hidden_states.shape[1] // per_frame
        return hidden_states + self.fusions[index](hidden_states, features, frames, context_frames)


class AppearancePreservationModule(ModelMixin, ConfigMixin):
    """APM: image tokens of the anchor frame's pooled embedding, mixed into every cross-attention's text context."""

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 1024,
        context_dim: int = 5120,
        text_tokens: int = 512,
        num_layers: int = 40,
        num_image_tokens: int = NUM_IMAGE_TOKENS,
        resampler_dim: int | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        owner = type(self).__name__
        for name, value in (("image_embed_dim", image_embed_dim), ("context_dim", context_dim),
                            ("text_tokens", text_tokens), ("num_layers", num_layers),
                            ("num_image_tokens", num_image_tokens)):
            check_int(owner, name, value, minimum=1)
        hidden = resampler_dim or context_dim
        self.resampler = nn.Sequential(
            nn.Linear(image_embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_image_tokens * context_dim)
        )
        self.image_norm = nn.LayerNorm(context_dim, eps=eps)
        self.token_mixers = nn.ModuleList(nn.Linear(text_tokens + num_image_tokens, text_tokens) for _ in range(num_layers))
        self.mix_norms = nn.ModuleList(nn.LayerNorm(context_dim, eps=eps) for _ in range(num_layers))
        self.alpha = nn.Parameter(torch.zeros(num_layers))  # SiLU(0) = 0: the text context exactly, until trained

    @classmethod
    def from_base(cls, transformer: WanTransformer3DModel, image_embed_dim: int, text_tokens: int,
                  num_image_tokens: int = NUM_IMAGE_TOKENS) -> "AppearancePreservationModule":
        """An untrained APM for `transformer`: one mixer and alpha per block's cross-attention, over `text_tokens`
        text tokens (the length the prompts are padded to) and an image embedding of `image_embed_dim`."""
        apm = cls(image_embed_dim=image_embed_dim, context_dim=_inner_dim(transformer), text_tokens=text_tokens,
                  num_layers=len(transformer.blocks), num_image_tokens=num_image_tokens, eps=transformer.config.eps)
        # nn.Module's `to`: ModelMixin's warns about float32 modules on any dtype, and a new APM has none.
        return torch.nn.Module.to(apm, device=transformer.device, dtype=transformer.dtype)

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Pooled image embeddings (B, image_embed_dim) -> (B, num_image_tokens, context_dim)."""
        tokens = self.resampler(image_embeds.to(self.resampler[0].weight.dtype))
        return self.image_norm(tokens.view(tokens.shape[0], self.config.num_image_tokens, self.config.context_dim))

    def context(self, layer: int, text: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Cross-attention layer `layer`'s context: text (B, T, D) + SiLU(alpha) * mix(text, image tokens)."""
        tokens = torch.cat([text, image_tokens.to(text.dtype)], dim=1)
        mixed = self.token_mixers[layer](tokens.transpose(1, 2)).transpose(1, 2)
        return text + F.silu(self.alpha[layer]).to(text.dtype) * self.mix_norms[layer](mixed)
