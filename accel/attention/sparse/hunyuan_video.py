"""The sparse processor of HunyuanVideoTransformer3DModel's joint image-text attention.

HunyuanVideo's blocks attend over [image tokens, text tokens]: image queries see the image keys the pattern allows
plus every text key the attention mask leaves in (joint_mask: text keys after the image keys, padded to a block
boundary), text queries every valid key (SDPA). Patterns chosen from q and k (`dynamic`, `pbs`) are refused there, as
is context parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import _GridState


class HunyuanVideoSparseAttnProcessor:
    """HunyuanVideoAttnProcessor2_0 (dual- and single-stream blocks) with the image-image attention block-sparse.

    The blocks attend over one sequence [image tokens, text tokens]. Image queries see the image keys the pattern
    allows and every text key the attention mask leaves in (one kernel call per distinct set of valid text keys,
    joint_mask); text queries see every valid key (SDPA with the mask, as diffusers). Projections, q/k norms, the
    rotary embedding of the image tokens and the output projections are diffusers' own."""

    def __init__(self, state: _GridState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise RuntimeError("HunyuanVideoSparseAttnProcessor is for joint image-text attention (text tokens given)")
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"sparse attention needs float16 or bfloat16 activations, got {hidden_states.dtype}: run the model in bf16"
            )
        num_text = encoder_hidden_states.shape[1]
        if attn.add_q_proj is None:  # single-stream blocks: one set of projections over the whole sequence
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if attn.add_q_proj is None:
                query, key = (torch.cat([apply_rotary_emb(x[:, :-num_text], image_rotary_emb, sequence_dim=1),
                                         x[:, -num_text:]], dim=1) for x in (query, key))
            else:
                query, key = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (query, key))
        if attn.add_q_proj is not None:  # dual-stream blocks: the text tokens' own projections
            text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            query, key, value = (torch.cat([x, t], dim=1) for x, t in zip((query, key, value), text))
        out = self.attend(query, key, value, num_text, attention_mask, attn.heads).flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :-num_text], out[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def attend(self, query, key, value, num_text: int, attention_mask, heads: int) -> torch.Tensor:
        """Joint attention on (B, N + T, H, D): the image rows block-sparse, the text rows dense; (B, N + T, H, D)."""
        b, total = query.shape[:2]
        n = total - num_text
        if self.state.ulysses is not None:
            raise NotImplementedError("sparse attention on HunyuanVideo does not run under context parallelism")
        keep = torch.ones(b, total, dtype=torch.bool, device=query.device)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.numel() != b * total:
                raise ValueError(f"sparse attention on HunyuanVideo takes a bool key mask of {b} x {total} tokens "
                                 f"(diffusers' (B, 1, 1, N)), got {attention_mask.dtype} {tuple(attention_mask.shape)}")
            keep = attention_mask.reshape(b, total)
        text_rows = F.scaled_dot_product_attention(
            query[:, n:].transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_mask=keep[:, None, None, :]).transpose(1, 2)
        image_rows = torch.empty_like(query[:, :n])
        q, k, v = query[:, :n], key[:, :n], value[:, :n]
        if self.state.text_groups is None:  # the first layer of this call: one host sync, reused by the others
            self.state.text_groups = _text_groups(keep, n)
        for valid, items in self.state.text_groups.items():
            idx = torch.tensor(items, device=query.device)
            qi, ki, vi = (x.index_select(0, idx) for x in (q, k, v))
            if not valid:  # no text key: the pattern alone
                out = self.state.pattern.attend(self.state.built(n, heads, query.device), qi, ki, vi)
            else:
                cols = torch.tensor(valid, device=query.device) + n
                kt, vt = (x.index_select(0, idx).index_select(1, cols) for x in (key, value))
                joint = self.state.joint_built(n, heads, query.device, len(valid))
                out = self.state.pattern.attend_joint(joint, qi, ki, vi, kt, vt)
            image_rows[idx] = out.to(image_rows.dtype)
        return torch.cat([image_rows, text_rows.to(image_rows.dtype)], dim=1)


def _text_groups(keep: torch.Tensor, num_image: int) -> dict[tuple[int, ...], list[int]]:
    """The batch items grouped by their valid text keys (indices after the image tokens), from the (B, N + T) key
    mask; image tokens must all be kept."""
    if not bool(keep[:, :num_image].all()):
        raise ValueError("sparse attention on HunyuanVideo: the attention mask hides image tokens; only text tokens "
                         "may be masked")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(keep[:, num_image:].tolist()):
        groups.setdefault(tuple(j for j, on in enumerate(row) if on), []).append(i)
    return groups
