"""The networks of the shapes reference models: diffusers transformer classes, sized for a CPU."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from accel.diffusers_internals import CacheMixin

from .data import CLIP_FRAMES, COLOURS, DIRECTIONS, SHAPES

NUM_CLASSES = len(SHAPES) * len(COLOURS)  # image classes: shape-major (class = shape * 6 + colour)


class ShapesDiTTransformer(DiTTransformer2DModel, CacheMixin):
    """diffusers' DiT with `cache_context` / `enable_cache`, so the image pipeline follows WanPipeline's conventions."""


def image_transformer() -> ShapesDiTTransformer:
    """Pixel-space, class-conditional DiT: 32x32x3 in patches of 4 (64 tokens), 6 blocks of width 192."""
    return ShapesDiTTransformer(
        in_channels=3, out_channels=3, sample_size=32, patch_size=4, num_attention_heads=4, attention_head_dim=48,
        num_layers=6, norm_type="ada_norm_zero", num_embeds_ada_norm=NUM_CLASSES,
    )


def video_transformer(text_dim: int) -> WanTransformer3DModel:
    """Pixel-space Wan: 17 frames of 32x32x3 in patches of 1x4x4 (1,088 tokens), 6 blocks of width 192. It takes
    three input channels more than it returns: where each pixel is (`with_positions`)."""
    return WanTransformer3DModel(
        patch_size=(1, 4, 4), num_attention_heads=3, attention_head_dim=64, in_channels=6, out_channels=3,
        text_dim=text_dim, freq_dim=256, ffn_dim=768, num_layers=6, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


# The position channels a video transformer can read beside its latents, in this order: a transformer that takes k
# channels more than it returns reads the first k. (The shapes-video weights of stages 1-5 read none, stages 6-10
# the frame only; stage 11 and the shipped weights, trained from scratch, all three.)
POSITION_CHANNELS = ("frame", "row", "column")


def with_positions(transformer: WanTransformer3DModel, latents: torch.Tensor) -> torch.Tensor:
    """What the video model reads: the latents (B, C, F, H, W) and, in the channels the transformer takes beyond the
    ones it returns, where each pixel is: its frame's position in the clip (-1 at the first frame, +1 at frame 16),
    then its row and column (-1 to 1), as Wan's image-to-video models read conditioning channels beside the latents.

    Wan's RoPE gives relative positions only, and its patch embedding has no padding, so a model that sees the
    latents alone can tell neither which frame nor where in the frame it is. From noise the best prediction of a
    clip "moving left" puts its shape at the right of the first frame and at the left of the last (clips start at
    the edge they move away from): such a model cannot make it, and the noise, not the caption, picks the sense."""
    extra = transformer.config.in_channels - transformer.config.out_channels
    if not 0 <= extra <= len(POSITION_CHANNELS):
        raise ValueError(f"a shapes video transformer takes its latents and then the first of the position channels "
                         f"{POSITION_CHANNELS}; this one takes {transformer.config.in_channels} channels and returns "
                         f"{transformer.config.out_channels}")
    b, _, f, h, w = latents.shape
    like = dict(device=latents.device, dtype=latents.dtype)
    planes = (
        lambda: (torch.arange(f, **like) * (2 / (CLIP_FRAMES - 1)) - 1).view(f, 1, 1),  # frame 16 of any clip is +1
        lambda: torch.linspace(-1, 1, h, **like).view(1, h, 1),
        lambda: torch.linspace(-1, 1, w, **like).view(1, 1, w),
    )[:extra]
    return torch.cat([latents, *(plane().expand(b, 1, f, h, w) for plane in planes)], dim=1)


def _conv(cin: int, cout: int, conv=nn.Conv2d, stride=2) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapesClassifier(ModelMixin, ConfigMixin):
    """Says which shape, colour (and, for videos, direction of motion) a sample shows.

    The offline stand-in for CLIPScore (does the sample show what its caption says?) and the feature extractor
    for an offline FID (`image_features` / `video_features`: the pooled embeddings before the heads).
    Inputs are in [-1, 1]: images (B, 3, H, W), videos (B, 3, T, H, W).
    """

    @register_to_config
    def __init__(self, width: int = 64, motion_frames: int = 8):
        super().__init__()
        self.frame_encoder = nn.Sequential(_conv(3, width // 2, stride=1), _conv(width // 2, width), _conv(width, 2 * width), _conv(2 * width, 2 * width))
        self.shape_head = nn.Linear(2 * width, len(SHAPES))
        self.colour_head = nn.Linear(2 * width, len(COLOURS))
        self.motion_encoder = nn.Sequential(
            _conv(3, width // 2, nn.Conv3d, (1, 2, 2)), _conv(width // 2, width, nn.Conv3d), _conv(width, 2 * width, nn.Conv3d)
        )
        self.direction_head = nn.Linear(2 * width, len(DIRECTIONS))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.frame_encoder(images).mean(dim=(2, 3))

    def video_features(self, videos: torch.Tensor) -> torch.Tensor:
        """Mean frame embedding and motion embedding of the opening frames, concatenated."""
        b, c, t, h, w = videos.shape
        frames = self.image_features(videos.transpose(1, 2).reshape(b * t, c, h, w)).reshape(b, t, -1).mean(1)
        motion = self.motion_encoder(videos[:, :, : self.config.motion_frames]).mean(dim=(2, 3, 4))
        return torch.cat([frames, motion], dim=1)

    def classify_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.image_features(images)
        return {"shape": self.shape_head(f), "colour": self.colour_head(f)}

    def classify_videos(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.video_features(videos)
        frames, motion = f.split(f.shape[1] // 2, dim=1)
        return {"shape": self.shape_head(frames), "colour": self.colour_head(frames), "direction": self.direction_head(motion)}

    @staticmethod
    def loss(logits: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return sum(F.cross_entropy(v, getattr(batch, k)) for k, v in logits.items())
