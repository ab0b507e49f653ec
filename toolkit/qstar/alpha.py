"""Per-token mixing weight α for q* sampling: q_α ∝ π_θ^α · π_t^(1−α), batched over [B, V].

Everything is computed in float64 on the input's device, on the full temperature-scaled
vocabulary, with tensor ops over the batch and the vocabulary (the only Python loop is the few
Newton passes of ``kl_symmetry``, each over the whole batch at once).

Definitions (per row; ``S`` is the common support {v : π_θ(v) > 0 and π_t(v) > 0}):

* ``log q_α = α·log π_θ + (1−α)·log π_t − log Z(α)`` on ``S`` and −inf elsewhere, for every
  α in [0, 1]. At the endpoints this is the limit from inside, i.e. π_θ (α=1) or π_t (α=0)
  restricted to ``S`` and renormalised: a token that either model gives probability 0 is never
  sampled. With finite logits ``S`` is the whole vocabulary and q_1 = π_θ, q_0 = π_t exactly.
* Disjoint supports (``S`` empty): the geometric mixture is undefined for every α, so the row
  falls back to the nearest pure model that is a valid distribution: π_θ (α := 1) when
  α ≥ 0.5, else π_t (α := 0). ``kl_symmetry`` has no preferred side there and takes π_θ.
* The KL gap ``g(α) = KL(q_α‖π_θ) − KL(q_α‖π_t) = E_{q_α}[d]`` with ``d = log π_t − log π_θ``
  on ``S`` (terms outside ``S`` have q_α = 0 and contribute exactly 0). Since
  ``log q_α = log π_t − α·d − log Z``, ``dg/dα = −Var_{q_α}(d) ≤ 0``: g is monotone. It is
  also ``−A'(α)`` for the convex ``A(α) = log Σ π_θ^α π_t^(1−α)``, so the root is the Chernoff
  point. With full supports ``g(0) = KL(π_t‖π_θ) ≥ 0 ≥ −KL(π_θ‖π_t) = g(1)``, so a root
  exists; if g is within tolerance of 0 on all of [0, 1] (identical distributions) α = 0.5.
  When the supports differ, g can keep one sign on all of [0, 1] (e.g. π_θ one-hot on a token
  inside a full π_t: q_α is that one-hot for every α and g = log π_t(v) < 0); no α balances the
  KLs, α goes to the endpoint where |g| is least, and ``residual`` shows the gap left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.generation.sampling import filter_top_k_top_p

METHODS = ("fixed", "entropy", "kl_symmetry")
_NEG_INF = float("-inf")


@dataclass
class AlphaResult:
    """Outcome of :func:`solve_alpha` (all float64, on the logits' device).

    Attributes:
        alpha: [B] mixing weight of π_θ.
        logq: [B, V] log q_α, untruncated (top-k/top-p come after, see
            :func:`sampling_distribution`).
        logp_theta: [B, V] temperature-scaled log π_θ.
        logp_t: [B, V] temperature-scaled log π_t.
        iterations: Newton/bisection updates taken (0 for ``fixed`` and ``entropy``). Each costs
            one evaluation (a few reductions over [B, V]); ``kl_symmetry`` adds one evaluation
            for the final check, and two for the endpoints when some row's supports differ.
        residual: [B] g(α) = KL(q‖π_θ) − KL(q‖π_t) at the returned α. ±inf on rows with
            disjoint supports, where one of the KLs is infinite.
        bisection_steps: row-updates where the Newton step left the bracket and bisection was
            used instead (a measure of how often the safeguard fires).
    """

    alpha: torch.Tensor
    logq: torch.Tensor
    logp_theta: torch.Tensor
    logp_t: torch.Tensor
    iterations: int
    residual: torch.Tensor
    bisection_steps: int = 0


def _log_probs(logits: torch.Tensor, temperature: float, name: str) -> torch.Tensor:
    # Upcast before dividing: fp16/bf16 logits lose digits in the division, and the fp32
    # log-softmax alone puts the KL gap off by ~2e-5 over a 152k vocabulary.
    logp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    if torch.isnan(logp).any():
        raise ValueError(f"{name} logits contain NaN or +inf, or a row that is all -inf")
    return logp


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) per row of log-probabilities [B, V] -> [B]; 0·log 0 = 0."""
    return -torch.where(logp > _NEG_INF, logp.exp() * logp, 0.0).sum(-1)


def kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) per row [B, V] -> [B], exact on the full vocabulary.

    Tokens with q = 0 contribute 0 (whatever p is); a token with q > 0 and p = 0 makes the row
    +inf. Never NaN for valid log-probabilities.
    """
    in_q, in_p = logq > _NEG_INF, logp > _NEG_INF
    both = in_q & in_p
    finite = torch.where(both, logq.exp() * (logq - torch.where(both, logp, 0.0)), 0.0).sum(-1)
    return torch.where((in_q & ~in_p).any(-1), float("inf"), finite)


def _parts(logp_theta: torch.Tensor, logp_t: torch.Tensor, theta_if_disjoint: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``base`` and ``d`` such that log q_α ∝ base − α·d, and the disjoint-row mask.

    base = log π_t and d = log π_t − log π_θ on S, base = −inf and d = 0 off S (so α·d never
    meets an infinity). Disjoint rows get base = the fallback model and d = 0, which makes
    q_α that model for every α.
    """
    common = (logp_theta > _NEG_INF) & (logp_t > _NEG_INF)
    disjoint = ~common.any(-1)
    base = logp_t.masked_fill(~common, _NEG_INF)
    d = torch.where(common, logp_t - logp_theta, 0.0)
    fallback = torch.where(theta_if_disjoint[:, None], logp_theta, logp_t)
    base = torch.where(disjoint[:, None], fallback, base)
    return base, d, disjoint


def _evaluate(base: torch.Tensor, d: torch.Tensor, alpha: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log q_α, g(α) = E_q[d] and Var_q(d) per row (three reductions over V)."""
    mix = base - alpha[:, None] * d
    logq = mix - torch.logsumexp(mix, -1, keepdim=True)
    q = logq.exp()
    g = (q * d).sum(-1)
    # Two-pass variance: E[d²] − g² cancels catastrophically when q is peaked and |d| large.
    var = (q * (d - g[:, None]).square()).sum(-1)
    return logq, g, var


def _as_alpha(alpha: float | torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float64, device=like.device).expand(rows)
    if ((a < 0) | (a > 1) | a.isnan()).any():
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return a


def log_mixture(logp_theta: torch.Tensor, logp_t: torch.Tensor,
                alpha: float | torch.Tensor) -> torch.Tensor:
    """log q_α for log-probabilities [B, V] and α (scalar or [B]); float64, rows sum to 1.

    Support conventions as in the module docstring (common support; disjoint rows fall back to
    π_θ when α ≥ 0.5 and to π_t otherwise).
    """
    lp_theta, lp_t = logp_theta.to(torch.float64), logp_t.to(torch.float64)
    a = _as_alpha(alpha, lp_theta.shape[0], lp_theta)
    base, d, _ = _parts(lp_theta, lp_t, a >= 0.5)
    return _evaluate(base, d, a)[0]


def kl_gap(logp_theta: torch.Tensor, logp_t: torch.Tensor, alpha: float | torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """g(α) = KL(q_α‖π_θ) − KL(q_α‖π_t) and its negated derivative Var_{q_α}(d), per row.

    On disjoint rows both are returned as 0 (the fallback q does not depend on α); the true
    gap there is ±inf, which :func:`solve_alpha` reports in ``residual``.
    """
    lp_theta, lp_t = logp_theta.to(torch.float64), logp_t.to(torch.float64)
    a = _as_alpha(alpha, lp_theta.shape[0], lp_theta)
    base, d, _ = _parts(lp_theta, lp_t, a >= 0.5)
    _, g, var = _evaluate(base, d, a)
    return g, var


def _solve_kl_symmetry(base: torch.Tensor, d: torch.Tensor, disjoint: torch.Tensor,
                       mismatch: torch.Tensor, tol: float, max_iter: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Bracketed Newton on g from α = 0.5; returns α, log q_α, g(α), updates, bisections."""
    rows = base.shape[0]
    alpha = torch.full((rows,), 0.5, dtype=torch.float64, device=base.device)
    lo, hi = torch.zeros_like(alpha), torch.ones_like(alpha)
    frozen = disjoint.clone()
    if bool(mismatch.any()):
        # Only when the supports differ can g stay on one side of 0 over all of [0, 1] (or be
        # a nonzero constant): the endpoint values find those rows before Newton chases an
        # endpoint it cannot reach. Other rows skip this, so their α ignores their batch-mates.
        _, g0, _ = _evaluate(base, d, torch.zeros_like(alpha))
        _, g1, _ = _evaluate(base, d, torch.ones_like(alpha))
        flat = (g0.abs() <= tol) & (g1.abs() <= tol)
        # g(0) ≤ tol: α = 0 meets the tolerance, or g < 0 everywhere and |g| is least at 0.
        at0 = mismatch & ~flat & (g0 <= tol)
        at1 = mismatch & ~flat & ~at0 & (g1 >= -tol)
        alpha = torch.where(at0, 0.0, torch.where(at1, 1.0, alpha))
        frozen |= at0 | at1
    alpha = torch.where(disjoint, 1.0, alpha)
    steps, bisections = 0, torch.zeros((), dtype=torch.long, device=base.device)
    while True:
        logq, g, var = _evaluate(base, d, alpha)
        # Converged rows are frozen, so a row's α does not depend on its batch-mates.
        active = ~frozen & (g.abs() > tol)
        if steps >= max_iter or not bool(active.any()):
            break
        lo = torch.where(active & (g > 0), alpha, lo)
        hi = torch.where(active & (g < 0), alpha, hi)
        newton = alpha + g / var  # g' = −Var; var = 0 gives ±inf, rejected below
        inside = (newton > lo) & (newton < hi)
        alpha = torch.where(active, torch.where(inside, newton, 0.5 * (lo + hi)), alpha)
        bisections += (active & ~inside).sum()  # a tensor: no extra device sync per pass
        steps += 1
    return alpha, logq, g, steps, int(bisections)


def solve_alpha(logits_theta: torch.Tensor, logits_t: torch.Tensor, method: str,
                temperature: float = 1.0, fixed_alpha: float = 0.5, tol: float = 1e-6,
                max_iter: int = 50) -> AlphaResult:
    """Solve α per row and build the untruncated q_α from two models' logits [B, V].

    Args:
        logits_theta: [B, V] logits of π_θ (any float dtype; upcast to float64).
        logits_t: [B, V] logits of π_t at the same positions.
        method: ``fixed`` (α = ``fixed_alpha``), ``entropy`` (α = H(π_θ) / (H(π_θ) + H(π_t)),
            0.5 when both are 0) or ``kl_symmetry`` (root of g(α) = KL(q_α‖π_θ) − KL(q_α‖π_t)
            by bracketed Newton, to |g| ≤ ``tol``).
        temperature: applied to both models' logits before the log-softmax; must be > 0.
        fixed_alpha: α for ``fixed``, in [0, 1].
        tol: ``kl_symmetry`` tolerance on |g| (nats).
        max_iter: cap on Newton/bisection updates; rows not converged by then keep their
            last α and show it in ``residual``.

    Returns:
        An :class:`AlphaResult`.

    Raises:
        ValueError: unknown method, shapes that differ (in particular the vocabulary), bad
            temperature/α/tol, or logits with NaN/+inf or an all −inf row.
    """
    if method not in METHODS:
        raise ValueError(f"unknown alpha method {method!r}; choose one of {METHODS}")
    if logits_theta.dim() != 2 or logits_t.dim() != 2:
        raise ValueError(f"expected [B, V] logits, got shapes {tuple(logits_theta.shape)} and "
                         f"{tuple(logits_t.shape)}")
    if logits_theta.shape[-1] != logits_t.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: pi_theta has {logits_theta.shape[-1]} logits, pi_t has "
            f"{logits_t.shape[-1]}; q* needs two models that share one tokenizer/output layer")
    if logits_theta.shape[0] != logits_t.shape[0]:
        raise ValueError(f"batch sizes differ: {logits_theta.shape[0]} vs {logits_t.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not tol > 0 or max_iter < 0:
        raise ValueError(f"need tol > 0 and max_iter >= 0, got {tol}, {max_iter}")
    lp_theta = _log_probs(logits_theta, temperature, "pi_theta")
    lp_t = _log_probs(logits_t, temperature, "pi_t")
    rows = lp_theta.shape[0]
    steps = bisections = 0
    if method == "kl_symmetry":
        # No preferred side on disjoint rows: fall back to π_θ (see the module docstring).
        to_theta = torch.ones(rows, dtype=torch.bool, device=lp_theta.device)
        base, d, disjoint = _parts(lp_theta, lp_t, to_theta)
        mismatch = ((lp_theta > _NEG_INF) != (lp_t > _NEG_INF)).any(-1)
        alpha, logq, g, steps, bisections = _solve_kl_symmetry(base, d, disjoint, mismatch,
                                                               tol, max_iter)
    else:
        if method == "fixed":
            if not 0.0 <= fixed_alpha <= 1.0:
                raise ValueError(f"fixed_alpha must lie in [0, 1], got {fixed_alpha}")
            alpha = torch.full((rows,), float(fixed_alpha), dtype=torch.float64,
                               device=lp_theta.device)
        else:
            h_theta, h_t = entropy(lp_theta), entropy(lp_t)
            total = h_theta + h_t
            alpha = torch.where(total > 0, h_theta / torch.where(total > 0, total, 1.0), 0.5)
        to_theta = alpha >= 0.5
        base, d, disjoint = _parts(lp_theta, lp_t, to_theta)
        logq, g, _ = _evaluate(base, d, alpha)
    # Disjoint rows sample one pure model: report the α that gives it and the (infinite) gap.
    alpha = torch.where(disjoint, to_theta.to(torch.float64), alpha)
    residual = torch.where(disjoint, torch.where(to_theta, _NEG_INF, float("inf")), g)
    return AlphaResult(alpha, logq, lp_theta, lp_t, steps, residual, bisections)


def sampling_distribution(logq: torch.Tensor, top_k: int = 0, top_p: float = 1.0
                          ) -> torch.Tensor:
    """The distribution actually sampled from: q_α cut by top-k/top-p, renormalised.

    Applied after α is solved: inside the solve, truncation would make g discontinuous in α
    and the KLs to the untruncated models infinite. Tokens outside the kept set are −inf; the
    most likely token always survives (``filter_top_k_top_p``).
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")
    if top_k == 0 and top_p >= 1.0:
        return logq
    kept = filter_top_k_top_p(logq, top_k, top_p)
    return torch.log_softmax(kept, dim=-1)
