"""A transformer whose block features are known polynomials of the step index, so forecasts can be checked exactly.

Each block adds A + B s + C s^2 to its input, where s = (1000 - timestep) / 50 is the step index of a schedule with
timesteps 1000, 950, 900, ... The output after block k (and the model's output) is therefore a polynomial of degree
<= 2 in the step index: a Taylor series of order >= 2 forecasts it exactly from any full steps. float64 throughout.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models.cache_utils import CacheMixin

import accel

T0, DT = 1000.0, 50.0


def timestep(i: int, batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), T0 - DT * i, dtype=torch.float64)


class PolyBlock(torch.nn.Module):
    def __init__(self, coefficients: torch.Tensor):
        super().__init__()
        self.register_buffer("coefficients", coefficients)  # (3, *feature): A, B, C
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = ((T0 - timestep) / DT).view(-1, *[1] * (hidden_states.ndim - 1))
        a, b, c = self.coefficients
        return hidden_states + a + b * s + c * s * s


class PolyModel(ModelMixin, CacheMixin):
    def __init__(self, blocks: int = 4, shape: tuple[int, ...] = (6, 8), seed: int = 0, degree: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        coefficients = torch.randn(blocks, 3, *shape, generator=g, dtype=torch.float64)
        coefficients[:, degree + 1 :] = 0  # keep the polynomial at `degree`
        self.blocks = torch.nn.ModuleList(PolyBlock(c) for c in coefficients)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False):
        for block in self.blocks:
            hidden_states = block(hidden_states, timestep)
        return (hidden_states,)

    def exact(self, hidden_states: torch.Tensor, i: int, upto: int | None = None) -> torch.Tensor:
        """The output after block `upto` (default: the last) at step `i`, from the coefficients."""
        a, b, c = self.blocks_coefficients(upto)
        return hidden_states + a + b * i + c * i * i

    def blocks_coefficients(self, upto: int | None = None) -> torch.Tensor:
        coefficients = torch.stack([blk.coefficients for blk in self.blocks])
        return coefficients[: (len(self.blocks) if upto is None else upto + 1)].sum(0)


def register(cond_half=None) -> None:
    accel.register_model(PolyModel, block_lists=("blocks",), cond_half=cond_half,
                         block_metadata={PolyBlock: TransformerBlockMetadata(return_hidden_states_index=0)})
