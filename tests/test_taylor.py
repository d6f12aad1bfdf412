import pytest
import torch

from accel.taylor import PaperTaylorSeries, TaylorSeries


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_prediction_is_exact_on_polynomials_of_degree_up_to_order(order):
    coeffs = torch.randn(order + 1, 5, 7, dtype=torch.float64)
    poly = lambda s: sum(c * s**i for i, c in enumerate(coeffs))  # noqa: E731
    series = TaylorSeries(order)
    for s in [0, 1, 3, 4, 7][: order + 2]:  # uneven gaps between full steps
        series.update(s, poly(s))
    for s in [8, 9, 12]:
        torch.testing.assert_close(series.predict(s), poly(s), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", [TaylorSeries, PaperTaylorSeries])
def test_a_reach_leaves_out_the_terms_of_order_2_and_up_carried_further_than_their_steps_extent(form):
    quadratic = lambda s: torch.full((3,), float(s * s), dtype=torch.float64)  # noqa: E731
    series = form(3)
    for s in (0, 3, 5, 6):  # the three newest full steps extend over 3 steps (3-6)
        series.update(s, quadratic(s))
    assert [series.terms(s, reach=1.0) for s in (7, 9, 10, 13)] == [4, 4, 2, 2]
    assert series.terms(13) == 4 and series.terms(10, reach=0.5) == 2 and series.terms(10, reach=2.0) == 4
    linear = form(1)  # order 1 always stays: the line through the two newest steps
    for s in (5, 6):
        linear.update(s, quadratic(s))
    torch.testing.assert_close(series.predict(13, reach=1.0), linear.predict(13))
    if form is TaylorSeries:  # the paper's form is exact at order <= 1 only
        torch.testing.assert_close(series.predict(9, reach=1.0), quadratic(9))


def test_order_one_equals_the_papers_finite_difference_series():
    f0, f1 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    series = TaylorSeries(1)
    series.update(2, f0)
    series.update(5, f1)
    k = 2
    torch.testing.assert_close(series.predict(5 + k), f1 + (f1 - f0) / 3 * k)


def test_state_size_is_bounded_by_order_and_shape_change_restarts():
    series = TaylorSeries(2)
    for s in range(10):
        series.update(s, torch.full((3,), float(s)))
    assert len(series.factors) == 3 and len(series.nodes) == 3
    series.update(11, torch.ones(2, 2))
    assert len(series.factors) == 1 and series.nodes == [11]


def test_predict_never_aliases_stored_factors():
    series = TaylorSeries(0)
    series.update(0, torch.ones(3))
    series.predict(1).add_(5)
    torch.testing.assert_close(series.predict(1), torch.ones(3))


def test_negative_order_rejected():
    with pytest.raises(ValueError, match="order"):
        TaylorSeries(-1)


def _released_code_forecast(history: list[tuple[int, torch.Tensor]], order: int, step: int) -> torch.Tensor:
    """The released code's two functions, transcribed: factors updated from the latest gap, summed as F(i) k^i / i!."""
    import math

    factors: dict[int, torch.Tensor] = {}
    for n, (s, feature) in enumerate(history):
        updated = {0: feature}
        for i in range(order):
            if factors.get(i) is None:
                break
            updated[i + 1] = (updated[i] - factors[i]) / (s - history[n - 1][0])
        factors = updated
    k = step - history[-1][0]
    return sum(factors[i] * k**i / math.factorial(i) for i in range(len(factors)))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_paper_form_equals_the_released_code_and_differs_from_divided_differences(order):
    history = [(s, torch.randn(5, 7, dtype=torch.float64)) for s in (0, 1, 3, 4, 7)]
    paper, newton = PaperTaylorSeries(order), TaylorSeries(order)
    for s, feature in history:
        paper.update(s, feature), newton.update(s, feature)
    for step in (8, 9, 12):
        torch.testing.assert_close(paper.predict(step), _released_code_forecast(history, order, step), rtol=1e-12, atol=1e-12)
        assert order == 1 or not torch.allclose(paper.predict(step), newton.predict(step))
