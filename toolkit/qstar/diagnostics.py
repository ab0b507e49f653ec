"""Per-token and per-sample diagnostics of q* sampling: α, KLs, importance ESS, seed conditions.

Everything is exact on the full vocabulary, in float64, for two distributions per token: the
untruncated q_α (the object α is solved on; unsuffixed names) and the distribution actually
sampled from after top-k/top-p (``*_sampled``). Without truncation the two coincide.

ESS here is the per-token importance-sampling effective sample size *fraction* of q as a
proposal for a target p: ``ESS(p; q) = 1 / Σ_v p(v)²/q(v) = 1 / (1 + χ²(p‖q))``, in (0, 1], 1
iff q = p. When p's support lies inside q's it equals the self-normalised form
``(E_q[w])² / E_q[w²]`` with ``w = p/q``. It is a χ² quantity: equal ESS and equal KLs are
different conditions, and the seed's "ESS_θ = ESS_t" ("Fisher information balance") is not
what ``kl_symmetry`` solves; both are reported so the difference is visible.

Support conventions (never NaN):

* q(v) > 0 and p(v) = 0: w = 0, the token adds nothing to Σ p²/q; KL(q‖p) = +inf.
* p(v) > 0 and q(v) = 0 (after truncation, or a model forbidding a token): q can never
  propose that token, χ²(p‖q) = ∞ and ESS(p; q) = 0; KL(q‖p) is unaffected (q puts no mass
  there). So with any effective top-k/top-p the ``*_sampled`` ESS are 0 for full-support
  models: truncation makes unbiased per-token importance weighting towards π_θ or π_t
  impossible, and the diagnostics say so rather than hide it.
* ESS ratio ``ESS_θ / ESS_t``: +inf when only ESS_t is 0; when both are 0 it is 1 by
  convention (equal, both useless) and the ESS condition counts as not met.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from toolkit.qstar.alpha import AlphaResult, kl
from toolkit.qstar.conditions import ALPHA_RANGE, ESS_RATIO_RANGE, KL_GAP_MAX

_NEG_INF = float("-inf")


@dataclass
class TokenDiagnostics:
    """Per-token diagnostics; every field is a [B] tensor (float64, or bool for ``meets_*``).

    ``meets_ess``: ESS ratio in [0.8, 1.2] (and both ESS > 0); ``meets_kl``: |KL_θ − KL_t| <
    0.05 (both finite); ``meets_alpha``: α in [0.2, 0.8]. ``*_sampled`` fields describe the
    top-k/top-p truncated distribution that tokens were drawn from.
    """

    alpha: torch.Tensor
    kl_theta: torch.Tensor
    kl_t: torch.Tensor
    ess_theta: torch.Tensor
    ess_t: torch.Tensor
    ess_ratio: torch.Tensor
    meets_ess: torch.Tensor
    meets_kl: torch.Tensor
    meets_alpha: torch.Tensor
    kl_theta_sampled: torch.Tensor
    kl_t_sampled: torch.Tensor
    ess_theta_sampled: torch.Tensor
    ess_t_sampled: torch.Tensor
    ess_ratio_sampled: torch.Tensor
    meets_ess_sampled: torch.Tensor
    meets_kl_sampled: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> [B] tensor, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def ess(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Importance ESS fraction of proposal q for target p, ``1 / Σ p²/q``, per row -> [B].

    Computed as ``exp(−logsumexp(2·log p − log q))`` over the common support, so a q that is
    tiny where p is not gives a tiny ESS instead of overflowing. 0 where p has mass that q
    misses (see the module docstring).
    """
    logp, logq = logp.to(torch.float64), logq.to(torch.float64)
    in_p, in_q = logp > _NEG_INF, logq > _NEG_INF
    both = in_p & in_q
    # Masking both operands first keeps −inf − (−inf) out of the arithmetic.
    terms = torch.where(both, 2 * torch.where(both, logp, 0.0) - torch.where(both, logq, 0.0),
                        _NEG_INF)
    value = torch.exp(-torch.logsumexp(terms, dim=-1))
    return torch.where((in_p & ~in_q).any(-1), 0.0, value)


def ess_ratio(ess_theta: torch.Tensor, ess_t: torch.Tensor) -> torch.Tensor:
    """``ESS_θ / ESS_t`` with +inf for x/0 and 1 for 0/0 (no NaN)."""
    both_zero = (ess_theta == 0) & (ess_t == 0)
    ratio = ess_theta / torch.where(ess_t > 0, ess_t, 1.0)
    return torch.where(both_zero, 1.0, torch.where(ess_t > 0, ratio, float("inf")))


def _kl_and_ess(logq: torch.Tensor, logp_theta: torch.Tensor, logp_t: torch.Tensor,
                suffix: str = "") -> dict[str, torch.Tensor]:
    kl_theta, kl_t = kl(logq, logp_theta), kl(logq, logp_t)
    ess_theta, ess_t = ess(logp_theta, logq), ess(logp_t, logq)
    ratio = ess_ratio(ess_theta, ess_t)
    meets_ess = ((ratio >= ESS_RATIO_RANGE[0]) & (ratio <= ESS_RATIO_RANGE[1])
                 & (ess_theta > 0) & (ess_t > 0))
    finite = torch.isfinite(kl_theta) & torch.isfinite(kl_t)
    # inf − inf would be NaN: rows with an infinite KL fail the condition without computing it.
    gap = torch.where(finite, kl_theta - torch.where(finite, kl_t, 0.0), float("inf")).abs()
    values = {"kl_theta": kl_theta, "kl_t": kl_t, "ess_theta": ess_theta, "ess_t": ess_t,
              "ess_ratio": ratio, "meets_ess": meets_ess, "meets_kl": gap < KL_GAP_MAX}
    return {name + suffix: value for name, value in values.items()}


def token_diagnostics(result: AlphaResult, logq_sampled: torch.Tensor | None = None
                      ) -> TokenDiagnostics:
    """Diagnostics of one decoding step for every row of the batch.

    Args:
        result: the step's :class:`~toolkit.qstar.alpha.AlphaResult` (gives α, q_α and the two
            temperature-scaled model distributions the KLs and ESS are measured against).
        logq_sampled: [B, V] log of the distribution actually sampled from (e.g.
            ``sampling_distribution(result.logq, top_k, top_p)``); None means untruncated.

    Returns:
        A :class:`TokenDiagnostics` of [B] tensors.
    """
    if logq_sampled is None:
        logq_sampled = result.logq
    if logq_sampled.shape != result.logq.shape:
        raise ValueError(f"logq_sampled has shape {tuple(logq_sampled.shape)}, expected "
                         f"{tuple(result.logq.shape)}")
    full = _kl_and_ess(result.logq, result.logp_theta, result.logp_t)
    if logq_sampled is result.logq:
        # No truncation (``sampling_distribution`` returns its input then): halve the cost.
        sampled = {name + "_sampled": value for name, value in full.items()}
    else:
        sampled = _kl_and_ess(logq_sampled.to(torch.float64), result.logp_theta,
                              result.logp_t, "_sampled")
    alpha = result.alpha
    meets_alpha = (alpha >= ALPHA_RANGE[0]) & (alpha <= ALPHA_RANGE[1])
    return TokenDiagnostics(alpha=alpha, meets_alpha=meets_alpha, **full, **sampled)


def summarize_sample(tokens: Sequence[TokenDiagnostics | Mapping[str, torch.Tensor | float]]
                     ) -> dict[str, float | int]:
    """Per-sample means of one sample's per-token diagnostics.

    Args:
        tokens: the sample's per-token diagnostics, in any chunking: one entry per token (a
            :class:`TokenDiagnostics` with [1] or scalar fields, or a mapping such as
            ``as_dict()`` or the sampler's per-token ``extra``), or entries holding several
            tokens each; every field is flattened and concatenated.

    Returns:
        ``{field}_mean`` for every numeric field (``alpha_mean``, ``ess_ratio_mean``,
        ``kl_theta_mean``, ``kl_t_mean``, ``*_sampled_mean``, ...), ``frac_{field}`` for every
        ``meets_*`` field (the fraction of tokens meeting that condition) and ``n_tokens``. A
        mean involving an infinite per-token value (disjoint supports) is inf.

    Raises:
        ValueError: no tokens.
    """
    columns: dict[str, list[torch.Tensor]] = {}
    for entry in tokens:
        row = entry.as_dict() if isinstance(entry, TokenDiagnostics) else entry
        for key, value in row.items():
            columns.setdefault(key, []).append(torch.as_tensor(value).reshape(-1))
    if not columns:
        raise ValueError("no per-token diagnostics to summarise")
    out: dict[str, float | int] = {}
    for key, parts in columns.items():
        values = torch.cat([p.to(torch.float64) for p in parts])
        if values.numel() == 0:
            raise ValueError(f"no per-token values for {key!r}")
        name = f"frac_{key}" if key.startswith("meets_") else f"{key}_mean"
        out[name] = float(values.mean())
        out["n_tokens"] = values.numel()
    return out
