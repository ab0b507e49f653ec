"""Accuracy under parallelism and the Pareto front, against hand computations."""

from __future__ import annotations

import math

import pytest

from toolkit.dllm.curve import accuracy_under_parallelism, pareto_front


def test_aup_without_accuracy_loss_is_the_area_from_zero():
    # Flat at 50%: 1·50 + (3 − 1)·50 = 150.
    assert accuracy_under_parallelism([(3.0, 50.0), (1.0, 50.0)], y_max=50.0) == 150.0


def test_aup_weights_lower_accuracy_and_drops_points_5_below_the_first():
    pts = [(1.0, 60.0), (2.0, 58.0), (4.0, 56.0), (6.0, 54.0)]  # 54 < 60 − 5: left out
    w = lambda y: y * min(math.exp(-3 * (1 - y / 62.0)), 1.0)  # noqa: E731
    expected = 1.0 * 60.0 + 0.5 * 1.0 * (w(58) + w(60)) + 0.5 * 2.0 * (w(56) + w(58))
    assert accuracy_under_parallelism(pts, y_max=62.0) == pytest.approx(expected)
    assert accuracy_under_parallelism([], y_max=1.0) == 0.0


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.5), (2.0, 0.4), (3.0, 0.3), (0.5, 0.6), (3.0, 0.1)]
    assert pareto_front(pts) == [4, 1, 3]
