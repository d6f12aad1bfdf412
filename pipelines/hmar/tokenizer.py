"""VAR's multi-scale residual VQ tokenizer (arXiv 2404.02905) as a diffusers model.

An image becomes features f (B, Cvae, n, n), n = the last scale, then K token maps of growing size. Encoding keeps a
residual r = f and a cumulative reconstruction f_hat = 0; for each scale k (side pn_k):
    tokens_k = nearest codebook entries of area_downsample(r, pn_k)
    h_k      = Phi_k(bicubic_upsample(codebook[tokens_k], n))     (Phi: 0.5 h + 0.5 conv3x3(h))
    f_hat   += h_k;  r -= h_k
Decoding sums the h_k of given tokens and runs the decoder. The transformers' input for scale k is f_hat after
scales 0 .. k-1, area-downsampled to pn_k (`scale_input`). Phi convs are shared between neighbouring scales: scale k
uses the one whose tick in [0, 1] is nearest k / (K - 1) (VAR's "partially shared" Phi, 4 convs by default).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .scales import VAR_SCALES, check_scales
from .vqgan import Decoder, Encoder


class Phi(nn.Conv2d):
    """h (1 - ratio) + conv3x3(h) ratio: the refinement applied to each upsampled scale."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


def phi_ticks(count: int) -> np.ndarray:
    """Where each shared Phi sits on [0, 1] (VAR's spacing: a third of a step from the ends for 4, half otherwise)."""
    margin = 1 / 3 / count if count == 4 else 1 / 2 / count
    return np.linspace(margin, 1 - margin, count)


class VARTokenizer(ModelMixin, ConfigMixin):
    """Images (B, 3, H, W) in [-1, 1] <-> per-scale token indices [(B, pn_k^2) long for each scale k].

    H = W = scales[-1] * 2 ** (len(ch_mult) - 1). VAR's public tokenizer: vocab_size 4096, codebook_dim 32, ch 160,
    ch_mult (1, 1, 2, 2, 4), 2 resnet blocks a level, 4 shared Phi convs, 256 x 256 images at scales up to 16.
    """

    @register_to_config
    def __init__(self, vocab_size: int = 4096, codebook_dim: int = 32, scales: tuple[int, ...] = VAR_SCALES,
                 ch: int = 160, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 norm_num_groups: int = 32, num_phi: int = 4, phi_ratio: float = 0.5):
        super().__init__()
        self.scales = check_scales(type(self).__name__, list(scales))
        if num_phi < 1:
            raise ValueError(f"VARTokenizer: num_phi must be >= 1, got {num_phi}")
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, codebook_dim, norm_num_groups)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, codebook_dim, norm_num_groups)
        self.quant_conv = nn.Conv2d(codebook_dim, codebook_dim, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, codebook_dim, 3, padding=1)
        self.codebook = nn.Embedding(vocab_size, codebook_dim)
        self.phi = nn.ModuleList(Phi(codebook_dim, phi_ratio) for _ in range(num_phi))
        ticks = phi_ticks(num_phi)
        last = len(self.scales) - 1
        self.phi_of_scale = [int(np.argmin(np.abs(ticks - k / last))) for k in range(len(self.scales))]
        self.slice_size: int | None = None  # decode the batch in slices of this many images (`enable_slicing`)

    def enable_slicing(self, slice_size: int = 1) -> None:
        """Decode `slice_size` images at a time (diffusers' VAE slicing; one at a time by default): the decoder's
        full-resolution activations then take a slice's memory, not the batch's, for a little more time."""
        if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size < 1:
            raise ValueError(f"VARTokenizer.enable_slicing: slice_size must be an int >= 1, got {slice_size!r}")
        self.slice_size = slice_size

    def disable_slicing(self) -> None:
        """Decode the whole batch in one call again."""
        self.slice_size = None

    @property
    def image_size(self) -> int:
        return self.scales[-1] * 2 ** (len(self.config.ch_mult) - 1)

    def check_scales_fit(self, owner: str, scales) -> None:
        """A transformer's scale list must be the tokenizer's: its Phi choice and final size depend on it."""
        if tuple(scales) != self.scales:
            raise ValueError(f"{owner}: the transformer's scales {list(scales)} are not the tokenizer's "
                             f"{list(self.scales)}; both must use the same token pyramid")

    # ---- pieces -------------------------------------------------------------------------------------------------

    def upsampled_scale(self, k: int, indices: torch.Tensor) -> torch.Tensor:
        """h_k: scale k's tokens (B, pn_k^2) as their Phi-refined, upsampled contribution to f_hat (B, Cvae, n, n)."""
        pn, n = self.scales[k], self.scales[-1]
        h = self.codebook(indices).transpose(1, 2).unflatten(2, (pn, pn))
        if pn != n:
            h = F.interpolate(h, size=(n, n), mode="bicubic")
        return self.phi[self.phi_of_scale[k]](h)

    def scale_input(self, k: int, f_hat: torch.Tensor) -> torch.Tensor:
        """The transformers' input for scale k >= 1: f_hat after scales 0 .. k-1, area-downsampled to pn_k:
        (B, pn_k^2, Cvae)."""
        pn = self.scales[k]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entries (L2) of z (N, Cvae): (N,) long."""
        codes = self.codebook.weight
        distances = z.square().sum(1, keepdim=True) + codes.square().sum(1) - 2 * z @ codes.T
        return distances.argmin(1)

    # ---- whole pyramids -----------------------------------------------------------------------------------------

    def _residual_quantize(self, features: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features (B, Cvae, n, n) -> (token indices of every scale, f_hat after each scale). The choice of tokens
        follows the features only; each f_hat is differentiable in the codebook and Phi (the codebook loss)."""
        residual, f_hat, indices, f_hats = features.detach(), 0, [], []
        for k, pn in enumerate(self.scales):
            z = F.interpolate(residual, size=(pn, pn), mode="area") if pn != self.scales[-1] else residual
            idx = self._nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])).view(len(features), pn * pn)
            h = self.upsampled_scale(k, idx)
            residual, f_hat = residual - h.detach(), f_hat + h
            indices.append(idx)
            f_hats.append(f_hat)
        return indices, f_hats

    def _check_images(self, owner: str, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"VARTokenizer.{owner}: images must be (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> [(B, pn_k^2) long token indices for each scale k]."""
        self._check_images("encode", images)
        return self._residual_quantize(self.quant_conv(self.encoder(images)))[0]

    def forward(self, images: torch.Tensor, commitment: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: images (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), unclamped; VQ loss).

        VAR's quantizer loss, averaged over scales: ||f_hat_k - sg(f)||^2 (pulls the codebook and Phi to the
        features) + commitment ||sg(f_hat_k) - f||^2 (keeps the encoder near the codes). The decoder reads the final
        f_hat with a straight-through gradient to the encoder."""
        self._check_images("forward", images)
        features = self.quant_conv(self.encoder(images))
        _, f_hats = self._residual_quantize(features)
        vq_loss = sum(F.mse_loss(f_hat, features.detach()) + commitment * F.mse_loss(f_hat.detach(), features)
                      for f_hat in f_hats) / len(f_hats)
        f_hat = features + (f_hats[-1] - features).detach()
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    def cumulative_reconstructions(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """f_hat after each scale of the given token maps: [(B, Cvae, n, n)] (as many as token maps given)."""
        self._check_indices(indices)
        f_hat, out = 0, []
        for k, idx in enumerate(indices):
            f_hat = f_hat + self.upsampled_scale(k, idx)
            out.append(f_hat)
        return out

    def teacher_forcing_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The inputs of scales 1 .. K-1 for next-scale training: (B, L - pn_0^2, Cvae)."""
        f_hats = self.cumulative_reconstructions(indices[:-1])
        return torch.cat([self.scale_input(k + 1, f_hat) for k, f_hat in enumerate(f_hats)], dim=1)

    def scale_embeddings(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Each scale k >= 1's own tokens, Phi-refined and brought back to pn_k: (B, L - pn_0^2, Cvae). HMAR's masked
        prediction sees these (with the masked ones hidden) beside the next-scale input."""
        return torch.cat([self.scale_input(k, self.upsampled_scale(k, idx)) for k, idx in enumerate(indices) if k], 1)

    def decode_latents(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, n, n) -> images (B, 3, H, W) clamped to [-1, 1]."""
        if self.slice_size is not None and f_hat.shape[0] > self.slice_size:
            return torch.cat([self.decode_latents(part) for part in f_hat.split(self.slice_size)])
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Token indices of every scale -> images (B, 3, H, W) in [-1, 1]."""
        if len(indices) != len(self.scales):
            raise ValueError(f"VARTokenizer.decode: needs token maps of all {len(self.scales)} scales, got {len(indices)}")
        return self.decode_latents(self.cumulative_reconstructions(indices)[-1])

    def _check_indices(self, indices: list[torch.Tensor]) -> None:
        if not isinstance(indices, (list, tuple)) or len(indices) > len(self.scales):
            raise ValueError(f"VARTokenizer: token maps must be a list of at most {len(self.scales)} tensors")
        for k, idx in enumerate(indices):
            if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.shape[1] != self.scales[k] ** 2:
                raise ValueError(f"VARTokenizer: scale {k}'s token map must be (B, {self.scales[k] ** 2}), "
                                 f"got {getattr(idx, 'shape', type(idx).__name__)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
                raise ValueError(f"VARTokenizer: scale {k}'s token ids must be in [0, {self.config.vocab_size})")
