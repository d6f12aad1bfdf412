"""Taylor forecasting of a feature from the steps at which it was fully computed.

Two forms, for the same factors F0 = f[x_n] and F1 = (f(x_n) - f(x_(n-1))) / (x_n - x_(n-1)) (at order 1 they are
CG-Taylor's / TaylorSeer's finite-difference Taylor series, prediction F0 + F1 k):

- `TaylorSeries` (series="divided_differences", ours): Newton divided differences over the step indices of the last
  full computations, D_i = f[x_n, ..., x_(n-i)], f(x) ~ D0 + D1 (x - x_n) + D2 (x - x_n)(x - x_(n-1)) + ... It stays
  exact on features that are polynomials of degree <= order in the step index, whatever the spacing of the full
  steps.
- `PaperTaylorSeries` (series="paper"): the form of CG-Taylor's and TaylorSeer's released code, F(i+1) =
  (F(i)_now - F(i)_prev) / gap with the latest gap only, f(x) ~ sum F(i) k^i / i!. Exact at order <= 1 only.
"""

from __future__ import annotations

import torch


class TaylorSeries:
    """Holds at most `order + 1` factors of one feature; memory is (order + 1) feature-sized tensors.

    damping in [0, 1): the forecast moves (1 - damping) of the way from the last full value to the series' own
    extrapolation (a damped trend: long-gap extrapolation overshoots features that bend; 0 is the plain series)."""

    def __init__(self, order: int, damping: float = 0.0):
        if order < 0:
            raise ValueError(f"Taylor order must be >= 0, got {order}")
        if not 0.0 <= damping < 1.0:
            raise ValueError(f"damping must be in [0, 1), got {damping}")
        self.order, self.damping = order, damping
        self.factors: list[torch.Tensor] = []
        self.nodes: list[int] = []  # step indices of the full computations, newest first

    @property
    def ready(self) -> bool:
        return bool(self.factors)

    def update(self, step: int, feature: torch.Tensor) -> None:
        """Record `feature` as fully computed at `step` (factors kept in the feature's dtype)."""
        old = self.factors[0] if self.factors else None
        if old is not None and (old.shape != feature.shape or old.dtype != feature.dtype or step <= self.nodes[0]):
            self.reset()  # another resolution, batch or dtype, or a new generation: old factors say nothing
        new = [feature.detach().clone()]  # a copy: the model may reuse the block's output buffer
        for i, previous in enumerate(self.factors[: self.order]):
            new.append(torch.sub(new[i], previous).div_(self._span(step, i)))
        self.factors = new
        self.nodes = [step, *self.nodes][: self.order + 1]

    def _span(self, step: int, i: int) -> int:
        """The step distance dividing the i-th difference: divided differences span i + 1 gaps."""
        return step - self.nodes[i]

    def terms(self, step: int, reach: float | None = None) -> int:
        """How many factors a forecast at `step` uses: all, but with `reach` those of order 2 and above only while the
        step lies within reach x the extent of the three newest full steps beyond the newest one (a curve fitted on
        close steps swings when carried far past them; the truncated Newton form is the line through the newest
        two)."""
        terms = len(self.factors)
        if reach is not None and terms > 2 and step - self.nodes[0] > reach * (self.nodes[0] - self.nodes[2]):
            return 2
        return terms

    def predict(self, step: int, reach: float | None = None) -> torch.Tensor:
        """Extrapolate the feature to `step` (Horner's scheme on the Newton form), damped."""
        self._check_ready()
        terms = self.terms(step, reach)
        result = self.factors[terms - 1]
        for i in range(terms - 2, -1, -1):
            result = torch.add(self.factors[i], result, alpha=step - self.nodes[i])
        return self._damped(result)

    def _damped(self, extrapolated: torch.Tensor) -> torch.Tensor:
        if len(self.factors) == 1:
            return extrapolated.clone()  # never hand out the stored factor
        return extrapolated.lerp_(self.factors[0], self.damping) if self.damping else extrapolated

    def _check_ready(self) -> None:
        if not self.factors:
            raise RuntimeError("TaylorSeries.predict called before any full computation was recorded")

    def reset(self) -> None:
        self.factors, self.nodes = [], []


class PaperTaylorSeries(TaylorSeries):
    """The released code's series: every difference over the latest gap, summed as F(i) k^i / i!."""

    def _span(self, step: int, i: int) -> int:
        return step - self.nodes[0]

    def predict(self, step: int, reach: float | None = None) -> torch.Tensor:
        """sum F(i) k^i / i!, k = step - x_n, by Horner's scheme: F0 + k (F1 + k/2 (F2 + k/3 (...)))."""
        self._check_ready()
        k = step - self.nodes[0]
        terms = self.terms(step, reach)
        result = self.factors[terms - 1]
        for i in range(terms - 2, -1, -1):
            result = torch.add(self.factors[i], result, alpha=k / (i + 1))
        return self._damped(result)


SERIES_FORMS: dict[str, type[TaylorSeries]] = {"divided_differences": TaylorSeries, "paper": PaperTaylorSeries}
