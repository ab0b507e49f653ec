"""Agreement between two answers: sacrebleu sentence BLEU and chrF, scaled to [0, 1]."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _metrics() -> tuple[Any, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    # effective_order: a short answer is not scored 0 just for having no 4-grams.
    return BLEU(effective_order=True), CHRF()


def _empty_case(hypothesis: str, reference: str) -> float | None:
    """1.0 if both are empty, 0.0 if exactly one is, None if neither (whitespace is empty)."""
    h, r = bool(hypothesis.strip()), bool(reference.strip())
    if h and r:
        return None
    return 0.0 if h or r else 1.0


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU (effective order) / 100, in [0, 1].

    Returns:
        1.0 for two empty strings and 0.0 when exactly one is empty.
    """
    special = _empty_case(hypothesis, reference)
    if special is not None:
        return special
    score = _metrics()[0].sentence_score(hypothesis, [reference]).score / 100.0
    return min(1.0, max(0.0, score))  # float rounding can give 1.0000000000000004


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF / 100, in [0, 1], with the same empty-string convention as ``bleu``."""
    special = _empty_case(hypothesis, reference)
    if special is not None:
        return special
    score = _metrics()[1].sentence_score(hypothesis, [reference]).score / 100.0
    return min(1.0, max(0.0, score))
