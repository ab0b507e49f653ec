"""Agreement between two answers (sacrebleu sentence BLEU and chrF, scaled to [0, 1])."""

from __future__ import annotations

from functools import cache


@cache
def _metrics():
    from sacrebleu.metrics import BLEU, CHRF

    # effective_order: short answers are not scored 0 just for lacking 4-grams.
    return BLEU(effective_order=True), CHRF()


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU / 100; 1.0 for two empty strings, 0.0 if exactly one is empty."""
    if not hypothesis.strip() or not reference.strip():
        return float(hypothesis.strip() == reference.strip())
    return _metrics()[0].sentence_score(hypothesis, [reference]).score / 100.0


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF / 100, with the same empty-string convention as ``bleu``."""
    if not hypothesis.strip() or not reference.strip():
        return float(hypothesis.strip() == reference.strip())
    return _metrics()[1].sentence_score(hypothesis, [reference]).score / 100.0
