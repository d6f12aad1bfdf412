import pytest
import torch

from accel.taylor import TaylorSeries


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_prediction_is_exact_on_polynomials_of_degree_up_to_order(order):
    coeffs = torch.randn(order + 1, 5, 7, dtype=torch.float64)
    poly = lambda s: sum(c * s**i for i, c in enumerate(coeffs))  # noqa: E731
    series = TaylorSeries(order)
    for s in [0, 1, 3, 4, 7][: order + 2]:  # uneven gaps between full steps
        series.update(s, poly(s))
    for s in [8, 9, 12]:
        torch.testing.assert_close(series.predict(s), poly(s), rtol=1e-9, atol=1e-9)


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
