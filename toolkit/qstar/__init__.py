"""q* sampling: per-token geometric mixtures of two models with an adaptive weight α."""

from toolkit.qstar.alpha import (
    METHODS,
    AlphaResult,
    entropy,
    kl,
    kl_gap,
    log_mixture,
    sampling_distribution,
    solve_alpha,
)
from toolkit.qstar.diagnostics import TokenDiagnostics, ess, summarize_sample, token_diagnostics

__all__ = [
    "METHODS", "AlphaResult", "TokenDiagnostics", "entropy", "ess", "kl", "kl_gap",
    "log_mixture", "sampling_distribution", "solve_alpha", "summarize_sample",
    "token_diagnostics",
]
