"""Taylor forecasting of a feature from the steps at which it was fully computed.

The factors are Newton divided differences over the step indices of the last full computations:
    D0 = f[x_n],  D1 = f[x_n, x_(n-1)],  D2 = f[x_n, x_(n-1), x_(n-2)], ...
    f(x) ~ D0 + D1 (x - x_n) + D2 (x - x_n)(x - x_(n-1)) + ...
At order 1 this is exactly CG-Taylor's / TaylorSeer's finite-difference Taylor series
(F1 = (F0_now - F0_prev) / gap, prediction F0 + F1 k). At higher orders it stays exact on features that are
polynomials of degree <= order in the step index, whatever the spacing of the full steps, where the
k^i / i! form with repeated one-gap differences is not.
"""

from __future__ import annotations

import torch


class TaylorSeries:
    """Holds at most `order + 1` factors of one feature; memory is (order + 1) feature-sized tensors."""

    def __init__(self, order: int):
        if order < 0:
            raise ValueError(f"Taylor order must be >= 0, got {order}")
        self.order = order
        self.factors: list[torch.Tensor] = []
        self.nodes: list[int] = []  # step indices of the full computations, newest first

    @property
    def ready(self) -> bool:
        return bool(self.factors)

    def update(self, step: int, feature: torch.Tensor) -> None:
        """Record `feature` as fully computed at `step` (factors kept in the feature's dtype)."""
        if self.factors and (self.factors[0].shape != feature.shape or step <= self.nodes[0]):
            self.reset()  # another resolution or batch, or a new generation: old factors say nothing
        new = [feature.detach().clone()]  # a copy: the model may reuse the block's output buffer
        for i, old in enumerate(self.factors[: self.order]):
            new.append(torch.sub(new[i], old).div_(step - self.nodes[i]))
        self.factors = new
        self.nodes = [step, *self.nodes][: self.order + 1]

    def predict(self, step: int) -> torch.Tensor:
        """Extrapolate the feature to `step` (Horner's scheme on the Newton form)."""
        if not self.factors:
            raise RuntimeError("TaylorSeries.predict called before any full computation was recorded")
        result = self.factors[-1]
        for i in range(len(self.factors) - 2, -1, -1):
            result = torch.add(self.factors[i], result, alpha=step - self.nodes[i])
        return result if len(self.factors) > 1 else result.clone()  # never hand out the stored factor

    def reset(self) -> None:
        self.factors, self.nodes = [], []
