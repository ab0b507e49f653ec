"""Sampling at tiny temperatures: exact (argmax) at and below the threshold, never nan.

Before the fix, ``logits / 1e-45`` overflowed to ±inf in float32, softmax gave nan and the
server answered an empty string with status 200.
"""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.generation.sampling import MIN_TEMPERATURE, choose_next, make_generator


def _logits(rows: int = 6, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 8


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-45, 1e-100, 1e-300,
                                         MIN_TEMPERATURE, math.nextafter(MIN_TEMPERATURE, 0),
                                         5e-324])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tiny_temperatures_pick_the_argmax(temperature, top_p):
    logits = _logits()
    gens = [make_generator(0, i) for i in range(len(logits))]
    picked = choose_next(logits, temperature, 0, top_p, gens)
    # Independent check: with gaps of order 1 between logits, any T <= 1e-6 puts all the mass
    # on the largest logit (exp(-gap / T) == 0 in float64).
    assert picked.tolist() == logits.argmax(-1).tolist()


def test_threshold_is_the_smallest_normal_double():
    assert MIN_TEMPERATURE == 2.2250738585072014e-308
    logits = _logits(rows=2)
    # Just above the threshold the sampling path runs (generators are needed) ...
    with pytest.raises(AssertionError, match="generator"):
        choose_next(logits, MIN_TEMPERATURE, 0, 1.0, None)
    # ... just below it, greedy (no generator needed).
    below = math.nextafter(MIN_TEMPERATURE, 0)
    assert choose_next(logits, below, 0, 1.0, None).tolist() == logits.argmax(-1).tolist()


def test_ordinary_temperature_still_samples_softmax_of_logits_over_t():
    """Empirical frequencies against the naive softmax(logits / T): the shift in log space
    must not change the distribution."""
    base = torch.tensor([1.0, 0.5, 0.0, -1.0, -3.0])
    n, temperature = 6000, 0.7
    logits = base.expand(n, -1).clone()
    gens = [make_generator(3, i) for i in range(n)]
    picked = choose_next(logits, temperature, 0, 1.0, gens)
    freq = torch.bincount(picked, minlength=5).double() / n
    expect = torch.softmax(base.double() / temperature, -1)
    assert torch.allclose(freq, expect, atol=0.02), (freq, expect)
