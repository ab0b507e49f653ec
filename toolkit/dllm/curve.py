"""Accuracy against parallelism: the Pareto front, accuracy under parallelism (AUP), and the
readings the goals need (NFE a static curve needs for an accuracy; paired intervals).

Parallelism is tokens per forward (TPF): answer tokens decoded per sequence forward. AUP is
the d3LLM leaderboard's score (Qian et al., "AUP: when Accuracy Meets Parallelism in Diffusion
Language Models", 2025): for one method's points (ρ_i, y_i) sorted by ρ, with y in percent,
only points with y_i ≥ y_1 − 5 count, and

    AUP = ρ_1·y_1 + ½ Σ_{i≥2} (ρ_i − ρ_{i−1})·(y_i·W(y_i) + y_{i−1}·W(y_{i−1})),
    W(y) = min(exp(−α·(1 − y / y_max)), 1),

with α = 3 and y_max the best accuracy any method reached on the task. Without accuracy loss
it is the plain area under the curve from ρ = 0 (the first point's rectangle) on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy_under_parallelism(points: Sequence[tuple[float, float]], y_max: float,
                               alpha: float = 3.0, drop: float = 5.0) -> float:
    """AUP of one method's ``(tpf, accuracy in percent)`` points (see the module docstring)."""
    if not points:
        return 0.0
    pts = sorted(points)
    y_min = pts[0][1] - drop
    pts = [(r, y) for r, y in pts if y >= y_min]

    def weighted(y: float) -> float:
        w = min(math.exp(-alpha * (1.0 - y / y_max)), 1.0) if y_max > 0 else 1.0
        return y * w

    total = pts[0][0] * pts[0][1]
    for (r0, y0), (r1, y1) in zip(pts, pts[1:]):
        total += 0.5 * (r1 - r0) * (weighted(y1) + weighted(y0))
    return total


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats on both coordinates (both maximised),
    sorted by the first coordinate."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any((c >= a and d >= b) and (c > a or d > b) for c, d in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def nfe_to_reach(points: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """The least mean NFE at which a policy reaches ``accuracy``, from its ``(nfe, accuracy)``
    sweep points; None when no point reaches it.

    Between sweep points a policy can run a mix of two settings (each on a share of the
    problems), which reaches every accuracy on the segment between them at the matching NFE.
    The least NFE over all mixes is on a two-point mix (a linear programme with two
    constraints has a solution with two non-zero weights), so the minimum over pairs is exact:
    the static curve read at its best, not extrapolated."""
    best = None
    for n0, a0 in points:
        for n1, a1 in points:
            if a0 >= accuracy:
                cand = n0
            elif a1 > accuracy:  # mix a0 < accuracy < a1 to reach it exactly
                cand = n0 + (n1 - n0) * (accuracy - a0) / (a1 - a0)
            else:
                continue
            best = cand if best is None else min(best, cand)
    return best


def paired_interval(x: Sequence[float], y: Sequence[float], n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``x − y`` over the same problems and its paired bootstrap interval
    ``(mean, low, high)``: resample problems, keep the pairing."""
    import numpy as np

    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)
