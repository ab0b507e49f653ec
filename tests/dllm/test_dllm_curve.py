"""Accuracy under parallelism, the Pareto front, the NFE a curve needs for an accuracy and
paired intervals, against hand computations and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toolkit.dllm.curve import (
    accuracy_under_parallelism,
    nfe_to_reach,
    paired_interval,
    pareto_front,
)


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


def test_nfe_to_reach_is_the_cheapest_mix_of_sweep_points():
    """Checked against random mixes of all points (any number of them at once)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = [(float(n), float(a)) for n, a in zip(rng.uniform(5, 60, 6), rng.uniform(10, 90, 6))]
        nfe, acc = np.array(pts).T
        w = rng.dirichlet(np.full(len(pts), 0.3), size=200_000)
        mix_nfe, mix_acc = w @ nfe, w @ acc
        for target in (20.0, 50.0, float(acc.max()), float(acc.max()) + 1):
            got = nfe_to_reach(pts, target)
            reach = mix_acc >= target
            if target > acc.max():
                assert got is None
                continue
            assert got is not None and got <= nfe[acc >= target].min() + 1e-9
            if target == acc.max():  # only the best point itself reaches it
                assert got == nfe[acc == target].min()
                continue
            # No mix reaching the target is cheaper; some mix comes close to it.
            assert mix_nfe[reach].min() >= got - 1e-6
            assert mix_nfe[reach].min() <= got + 1.5


def test_nfe_to_reach_by_hand():
    pts = [(10.0, 50.0), (11.0, 51.0), (20.0, 90.0)]
    assert nfe_to_reach(pts, 70.0) == 15.0  # half of 10-NFE and half of 20-NFE, not via 11
    assert nfe_to_reach(pts, 40.0) == 10.0 and nfe_to_reach(pts, 91.0) is None


def test_paired_interval_sees_a_paired_difference_that_an_unpaired_one_would_not():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 100, 300)  # problems differ a lot; the pair differs by 1
    mean, lo, hi = paired_interval(base + 1.0 + rng.normal(0, 0.1, 300), base)
    assert abs(mean - 1.0) < 0.05 and 0.9 < lo < 1.0 < hi < 1.1
    mean, lo, hi = paired_interval(base, base)
    assert mean == lo == hi == 0.0
