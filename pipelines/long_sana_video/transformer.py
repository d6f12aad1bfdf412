"""SANA-Video made block-causal: a chunk of latent frames attends to itself and, through a constant-size memory, to
every earlier chunk.

`CausalSanaVideoTransformer3DModel` keeps the config and parameter names of diffusers' `SanaVideoTransformer3DModel`
(SANA-Video checkpoints load into it) and changes three things, all per chunk:
- linear self-attention is bidirectional inside the chunk and causal across chunks: the running sums
  S = sum R(phi(k)) v^T and z = sum phi(k) of earlier chunks are added (accel's block-causal kernel);
- the Mix-FFN temporal convolution (kernel 3 over frames) sees the previous chunk's last frame on its left and
  zeros on its right, from a one-frame cache, instead of the next frame it cannot know yet;
- RoPE uses absolute frame positions (the memory counts the frames written so far).
The memory is written only when asked (`write_memory=True`: the pipeline's pass on a finished chunk); its size
never depends on how many chunks came before, and `keep_last_chunks=K` forgets chunks older than K.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import torch
from diffusers import ModelMixin, SanaVideoTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv, SanaVideoTransformerBlock
from torch.nn import functional as F

from accel.attention.linear import EPS, _output, _project
from accel.diffusers_internals import CacheMixin, TransformerBlockMetadata, TransformerBlockRegistry
from accel.kernels.linear_attention import RotaryTables, block_causal_linear_attention
from accel.kernels.linear_attention.inputs import LinearAttentionState

# diffusers' pipeline loader checks a saved component against the base classes it finds in the component's own
# module: ModelMixin must be importable from here for a saved pipeline holding this transformer to load again.
__all__ = ["CausalSanaVideoTransformer3DModel", "CausalSanaVideoTransformerBlock", "LongVideoMemory", "ModelMixin"]


@dataclass
class LayerMemory:
    attention: LinearAttentionState | None = None  # sums over the remembered chunks
    chunks: deque = field(default_factory=deque)  # each remembered chunk's own sums, when chunks are forgotten
    conv_frame: torch.Tensor | None = None  # the temporal conv's input at the last frame: (B, C, 1, H*W)


class LongVideoMemory:
    """What a causal SANA-Video remembers of the chunks written so far, per layer: constant size."""

    def __init__(self, num_layers: int, keep_last_chunks: int | None = None, track_gradients: bool = False):
        if keep_last_chunks is not None and keep_last_chunks < 1:
            raise ValueError(f"keep_last_chunks must be >= 1 or None, got {keep_last_chunks}")
        self.layers = [LayerMemory() for _ in range(num_layers)]
        self.keep_last_chunks = keep_last_chunks
        self.track_gradients = track_gradients  # training: later chunks' losses reach the passes that wrote the memory
        self.frames = 0  # latent frames written: the next chunk's first RoPE position

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """What the memory stores of a tensor: itself while training through it, else a detached copy."""
        return t if self.track_gradients else t.detach().clone()

    def nbytes(self) -> int:
        tensors = [t for m in self.layers for t in (*(m.attention or ()), m.conv_frame, *[x for c in m.chunks for x in c])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reindex(self, rows: torch.Tensor) -> None:
        """Keep these batch rows of everything remembered, in this order (rows may repeat: one row's memory can serve
        several rows of the next call)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows)

        for layer in self.layers:
            if layer.attention is not None:
                layer.attention = LinearAttentionState(*map(pick, layer.attention))
            layer.chunks = deque(LinearAttentionState(*map(pick, own)) for own in layer.chunks)
            layer.conv_frame = pick(layer.conv_frame)

    def remember(self, layer: LayerMemory, before: LinearAttentionState | None, after: LinearAttentionState) -> None:
        if self.keep_last_chunks is None:
            layer.attention = after
            return
        own = after if before is None else LinearAttentionState(after.kv - before.kv, after.k_sum - before.k_sum)
        layer.chunks.append(own)
        if len(layer.chunks) > self.keep_last_chunks:
            old = layer.chunks.popleft()
            after = LinearAttentionState(after.kv - old.kv, after.k_sum - old.k_sum)
        layer.attention = after


def causal_temporal_conv(conv: torch.nn.Conv2d, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """The kernel-3 temporal conv on x (B, C, T, H*W), the previous chunk's last frame (or zeros) on the left and
    zeros on the right. Equals diffusers' conv (padding 1) on a first chunk."""
    left = torch.zeros_like(x[:, :, :1]) if previous is None else previous.to(x.dtype)
    padded = torch.cat([left, x, torch.zeros_like(x[:, :, :1])], dim=2)
    return F.conv2d(padded, conv.weight, conv.bias)


def _feed_forward(ff, x: torch.Tensor, memory: LongVideoMemory | None, layer: LayerMemory | None, write: bool) -> torch.Tensor:
    """GLUMBTempConv.forward with the causal temporal conv (x: B, T, H, W, C)."""
    b, t, h, w, c = x.shape
    y = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
    y = ff.nonlinearity(ff.conv_inverted(y))
    y, gate = torch.chunk(ff.conv_depth(y), 2, dim=1)
    y = ff.conv_point(y * ff.nonlinearity(gate))
    temporal = y.view(b, t, c, h * w).permute(0, 2, 1, 3)
    out = temporal + causal_temporal_conv(ff.conv_temp, temporal, layer.conv_frame if layer else None)
    if write:
        layer.conv_frame = memory.keep(temporal[:, :, -1:])
    out = out.permute(0, 2, 3, 1).reshape(b, t, h, w, c)
    if ff.norm_type == "rms_norm":
        out = ff.norm(out.movedim(1, -1)).movedim(-1, 1)
    return out + x if ff.residual_connection else out


def _causal_attention(attn, x, rotary, memory: LongVideoMemory | None, layer: LayerMemory | None, write: bool):
    """Self-attention of a chunk: bidirectional inside it, plus the earlier chunks' sums (block-causal kernel)."""
    # Under autocast the q/k norms return float32 beside bf16 values: the kernels take one dtype.
    query, key, value = (t.to(x.dtype) for t in _project(attn, x, None))
    tables = RotaryTables.from_diffusers(*rotary, key.shape[2], key.shape[3])
    prior = layer.attention if layer is not None else None
    out, after = block_causal_linear_attention(query, key, value, prior, eps=EPS, rotary=tables)
    if write:
        memory.remember(layer, prior, LinearAttentionState(memory.keep(after.kv), memory.keep(after.k_sum)))
    return _output(attn, out, x.dtype)


class CausalLinearAttention(Attention):
    """A causal block's self-attention (diffusers' Attention, same parameters), run on a chunk and its memory."""

    def forward(self, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor],
                memory: LongVideoMemory | None = None, layer_memory: LayerMemory | None = None,
                write_memory: bool = False) -> torch.Tensor:
        return _causal_attention(self, hidden_states, rotary_emb, memory, layer_memory, write_memory)


class CausalGLUMBTempConv(GLUMBTempConv):
    """A causal block's Mix-FFN (same parameters), its temporal conv fed by the memory's last frame."""

    def forward(self, hidden_states: torch.Tensor, memory: LongVideoMemory | None = None,
                layer_memory: LayerMemory | None = None, write_memory: bool = False) -> torch.Tensor:
        return _feed_forward(self, hidden_states, memory, layer_memory, write_memory)


class CausalSanaVideoTransformerBlock(SanaVideoTransformerBlock):
    """diffusers' SANA-Video block for one chunk: the same parameters and call, plus the chunk's memory.

    The model calls its blocks, and the blocks their attention and feed-forward, as modules, so hooks on either
    (accel's and diffusers' caches: TaylorSeer caches attn1, attn2 and ff) see every call.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, frames: int = None, height: int = None, width: int = None,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, memory: LongVideoMemory | None = None,
                layer_memory: LayerMemory | None = None, write_memory: bool = False) -> torch.Tensor:
        x = hidden_states
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None, None] + timestep.reshape(x.shape[0], timestep.shape[1], 6, -1)
        ).unbind(dim=2)
        normed = (self.norm1(x) * (1 + scale_msa) + shift_msa).to(x.dtype)
        x = x + gate_msa * self.attn1(normed, rotary_emb, memory=memory, layer_memory=layer_memory,
                                      write_memory=write_memory)
        if self.attn2 is not None:
            x = x + self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
        normed = (self.norm2(x) * (1 + scale_mlp) + shift_mlp).unflatten(1, (frames, height, width))
        ff = self.ff(normed, memory=memory, layer_memory=layer_memory, write_memory=write_memory)
        return x + gate_mlp * ff.flatten(1, 3)


TransformerBlockRegistry.register(CausalSanaVideoTransformerBlock, TransformerBlockMetadata(return_hidden_states_index=0))


class CausalSanaVideoTransformer3DModel(SanaVideoTransformer3DModel, CacheMixin):
    """diffusers' SANA-Video transformer, run one chunk at a time against a `LongVideoMemory` (with diffusers'
    `cache_context`, so accel's and diffusers' caches apply)."""

    @functools.wraps(SanaVideoTransformer3DModel.__init__)  # the same config arguments, so configs load as they are
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.transformer_blocks:  # same parameters: only the forwards change
            block.__class__ = CausalSanaVideoTransformerBlock
            block.attn1.__class__ = CausalLinearAttention
            block.ff.__class__ = CausalGLUMBTempConv

    def new_memory(self, keep_last_chunks: int | None = None, track_gradients: bool = False) -> LongVideoMemory:
        return LongVideoMemory(len(self.transformer_blocks), keep_last_chunks, track_gradients)

    def _rotary(self, hidden_states: torch.Tensor, frame_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' RoPE tables (WanRotaryPosEmbed's layout) for the chunk's frames [offset, offset + T) only:
        building them for the whole prefix would grow the memory with the video's length."""
        _, _, t, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        frames, rows, cols = t // p_t, h // p_h, w // p_w
        if frame_offset + frames > self.config.rope_max_seq_len:
            raise ValueError(
                f"frame {frame_offset + frames} is past the model's RoPE table ({self.config.rope_max_seq_len} frames): "
                "generate fewer chunks or load the model with a larger rope_max_seq_len"
            )
        splits = [self.rope.t_dim, self.rope.h_dim, self.rope.w_dim]

        def table(freqs: torch.Tensor) -> torch.Tensor:
            f_t, f_h, f_w = freqs.split(splits, dim=1)
            axes = (f_t[frame_offset : frame_offset + frames].view(frames, 1, 1, -1), f_h[:rows].view(1, rows, 1, -1),
                    f_w[:cols].view(1, 1, cols, -1))
            grid = torch.cat([a.expand(frames, rows, cols, -1) for a in axes], dim=-1)
            return grid.reshape(1, frames * rows * cols, 1, -1)

        return table(self.rope.freqs_cos), table(self.rope.freqs_sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        memory: LongVideoMemory | None = None,
        write_memory: bool = False,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ):
        """One chunk (B, C, T, H, W) of latent frames following the chunks in `memory` (None: the first chunk, or a
        bidirectional clip). With write_memory, the chunk is added to the memory."""
        if write_memory and memory is None:
            raise ValueError("write_memory needs a memory: model.new_memory()")
        if guidance is not None or self.config.guidance_embeds or attention_kwargs:
            raise NotImplementedError(
                "CausalSanaVideoTransformer3DModel runs SANA-Video without guidance embeddings or attention_kwargs "
                "(e.g. a LoRA scale: fuse the LoRA into the weights first)"
            )
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        b, _, t, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (t // p_t, h // p_h, w // p_w)
        rotary = self._rotary(hidden_states, memory.frames if memory is not None else 0)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        temb, embedded = self.time_embed(timestep.flatten(), batch_size=b, hidden_dtype=x.dtype)
        temb, embedded = temb.view(b, -1, temb.size(-1)), embedded.view(b, -1, embedded.size(-1))
        text = self.caption_norm(self.caption_projection(encoder_hidden_states).view(b, -1, x.shape[-1]))
        for index, block in enumerate(self.transformer_blocks):
            layer = memory.layers[index] if memory is not None else None
            x = block(x, None, text, encoder_attention_mask, temb, *grid, rotary, memory=memory, layer_memory=layer,
                      write_memory=write_memory)
        if write_memory:
            memory.frames += grid[0]

        x = self.proj_out(self.norm_out(x, embedded, self.scale_shift_table))
        x = x.reshape(b, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
