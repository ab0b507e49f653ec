"""Accuracy against parallelism: the Pareto front and accuracy under parallelism (AUP).

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
