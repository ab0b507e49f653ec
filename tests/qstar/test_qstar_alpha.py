"""q* α solvers and diagnostics against simple float64/numpy references (CPU, small, seeded).

Timing note (not a test; 1 thread of a shared 2-core CPU, [8, 151936] fp32 logits, mean of 3):
``solve_alpha`` fixed ~70 ms, entropy ~75 ms, kl_symmetry ~120 ms (2 Newton updates, 3
evaluations); ``token_diagnostics`` ~50 ms untruncated, ~125 ms with top-k;
``sampling_distribution`` with top-p 0.9 ~120 ms (the float64 sort in ``filter_top_k_top_p``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolkit.qstar.alpha import (
    entropy,
    kl,
    kl_gap,
    log_mixture,
    sampling_distribution,
    solve_alpha,
)
from toolkit.qstar.diagnostics import ess, summarize_sample, token_diagnostics

INF = float("inf")


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _pair(rows: int, vocab: int, scale: float, noise: float, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related logit tensors (the teacher is a noisy copy of the policy), float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    return x, x + torch.randn(rows, vocab, generator=g) * noise


def _np_logp(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    z = logits.double().numpy() / temperature
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_gap(lp_theta: np.ndarray, lp_t: np.ndarray, alpha: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """g(α) = E_q[log π_t − log π_θ] and Var_q, straight from the definition (full supports)."""
    mix = alpha[:, None] * lp_theta + (1 - alpha[:, None]) * lp_t
    q = np.exp(mix - mix.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    d = lp_t - lp_theta
    g = (q * d).sum(-1)
    return g, (q * (d - g[:, None]) ** 2).sum(-1)


def _bisection_reference(lp_theta: np.ndarray, lp_t: np.ndarray) -> np.ndarray:
    lo, hi = np.zeros(len(lp_theta)), np.ones(len(lp_theta))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        pos = _np_gap(lp_theta, lp_t, mid)[0] > 0  # g decreases: root lies above mid
        lo, hi = np.where(pos, mid, lo), np.where(pos, hi, mid)
    return 0.5 * (lo + hi)


def _assert_no_nan(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert not torch.isnan(t.double()).any()


@pytest.mark.parametrize(("vocab", "temperature", "scale", "noise", "seed"), [
    (7, 1.0, 1.0, 1.0, 0), (300, 0.7, 3.0, 2.0, 1), (5000, 1.0, 2.0, 3.0, 2),
    (2000, 1.5, 8.0, 6.0, 3),
])
def test_kl_symmetry_matches_bisection_reference(vocab, temperature, scale, noise, seed):
    x, y = _pair(6, vocab, scale, noise, seed)
    res = solve_alpha(x, y, "kl_symmetry", temperature=temperature)
    lp_theta, lp_t = _np_logp(x, temperature), _np_logp(y, temperature)
    alpha = res.alpha.numpy()
    assert ((alpha >= 0) & (alpha <= 1)).all()
    g, _ = _np_gap(lp_theta, lp_t, alpha)  # independent recomputation of the residual
    assert np.abs(g).max() <= 1e-6 and res.residual.abs().max() <= 1e-6
    ref = _bisection_reference(lp_theta, lp_t)
    _, var = _np_gap(lp_theta, lp_t, ref)
    # |g| ≤ 1e-6 pins α to about 1e-6 / |g'| = 1e-6 / Var.
    np.testing.assert_array_less(np.abs(alpha - ref), 2e-6 / var + 1e-12)
    assert res.iterations <= 8
    # The returned q is q_α and its KL gap is the residual.
    torch.testing.assert_close(res.logq, log_mixture(res.logp_theta, res.logp_t, res.alpha))
    gap = kl(res.logq, res.logp_theta) - kl(res.logq, res.logp_t)
    torch.testing.assert_close(gap, res.residual, atol=1e-12, rtol=0)


def test_gap_derivative_is_minus_variance():
    x, y = _pair(4, 500, 3.0, 3.0, 4)
    lp_theta, lp_t = torch.log_softmax(x.double(), -1), torch.log_softmax(y.double(), -1)
    h = 1e-5
    for a in (0.1, 0.5, 0.9):
        g_plus, _ = kl_gap(lp_theta, lp_t, a + h)
        g_minus, _ = kl_gap(lp_theta, lp_t, a - h)
        _, var = kl_gap(lp_theta, lp_t, a)
        assert (var > 0).all()
        torch.testing.assert_close((g_plus - g_minus) / (2 * h), -var, rtol=1e-6, atol=1e-9)


def test_newton_is_fast_on_random_rows():
    x, y = _pair(32, 3000, 4.0, 4.0, 5)
    res = solve_alpha(x, y, "kl_symmetry")
    assert res.iterations <= 8 and res.residual.abs().max() <= 1e-6


def test_overshooting_newton_falls_back_to_bisection():
    # A peaked π_θ against a flatter π_t: g is a steep sigmoid away from α = 0.5, and at 0.5 it
    # is so flat that a plain Newton step lands far outside [0, 1].
    x, y = torch.tensor([[30.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    lp_theta, lp_t = torch.log_softmax(x.double(), -1), torch.log_softmax(y.double(), -1)
    g, var = kl_gap(lp_theta, lp_t, 0.5)
    assert not 0 <= float(0.5 + g / var) <= 1
    res = solve_alpha(x, y, "kl_symmetry")
    assert res.bisection_steps >= 1 and res.iterations <= 10
    assert abs(float(res.residual)) <= 1e-6 and 0 < float(res.alpha) < 0.5
    ref = _bisection_reference(_np_logp(x), _np_logp(y))
    assert abs(float(res.alpha) - ref[0]) < 1e-6


def test_entropy_and_fixed_methods():
    x, y = _pair(5, 40, 2.0, 2.0, 6)
    x[0] = float("-inf")
    x[0, 3] = 0.0  # a one-hot row: H(π_θ) = 0, so α = 0
    res = solve_alpha(x, y, "entropy", temperature=0.8)
    lp_theta, lp_t = _np_logp(x, 0.8), _np_logp(y, 0.8)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = [-np.nansum(np.exp(lp) * np.where(np.isinf(lp), 0, lp), -1) for lp in (lp_theta, lp_t)]
    np.testing.assert_allclose(res.alpha.numpy(), h[0] / (h[0] + h[1]), rtol=1e-12)
    assert float(res.alpha[0]) == 0.0
    torch.testing.assert_close(entropy(res.logp_t), torch.from_numpy(h[1]))
    both_zero = torch.full((1, 4), float("-inf"))
    both_zero[0, 1] = 1.0
    assert float(solve_alpha(both_zero, both_zero.clone(), "entropy").alpha[0]) == 0.5
    fixed = solve_alpha(x, y, "fixed", fixed_alpha=0.3)
    assert (fixed.alpha == 0.3).all() and fixed.iterations == 0
    torch.testing.assert_close(fixed.logq, log_mixture(fixed.logp_theta, fixed.logp_t, 0.3))
    with pytest.raises(ValueError, match="fixed_alpha"):
        solve_alpha(x, y, "fixed", fixed_alpha=1.5)


def test_log_mixture_endpoints_and_normalisation():
    x, y = _pair(3, 50, 2.0, 2.0, 7)
    lp_theta, lp_t = torch.log_softmax(x.double(), -1), torch.log_softmax(y.double(), -1)
    torch.testing.assert_close(log_mixture(lp_theta, lp_t, 1.0), lp_theta)
    torch.testing.assert_close(log_mixture(lp_theta, lp_t, 0.0), lp_t)
    mixed = log_mixture(lp_theta, lp_t, torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(mixed[0], lp_t[0])
    torch.testing.assert_close(mixed[2], lp_theta[2])
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        log_mixture(lp_theta, lp_t, 1.2)


def test_identical_distributions_give_one_half():
    x, _ = _pair(3, 100, 3.0, 0.0, 8)
    res = solve_alpha(x, x.clone(), "kl_symmetry")
    assert (res.alpha == 0.5).all() and res.iterations == 0 and (res.residual == 0).all()
    torch.testing.assert_close(res.logq, res.logp_theta)
    # Equal on the common support, and π_t's extra token carries ~4e-9: g = log(1 − 4e-9) on
    # all of [0, 1], within tolerance everywhere, so this too is "identical" -> 0.5.
    near = solve_alpha(torch.tensor([[0.0, 0.0, float("-inf")]]),
                       torch.tensor([[0.0, 0.0, -20.0]]), "kl_symmetry")
    assert float(near.alpha) == 0.5 and abs(float(near.residual)) < 1e-8


def _edge_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: random, identical, same one-hot, near-one-hot apart, disjoint, partial support,
    π_θ one-hot inside a full π_t."""
    ninf = float("-inf")
    x, y = _pair(7, 6, 2.0, 2.0, 9)
    x[1] = y[1]
    x[2], y[2] = ninf, ninf
    x[2, 0] = y[2, 0] = 0.0
    x[3], y[3] = 0.0, 0.0
    x[3, 1], y[3, 4] = 50.0, 50.0
    x[4, 3:], y[4, :3] = ninf, ninf
    x[5, 0], y[5, 5] = ninf, ninf
    x[6], x[6, 2] = ninf, 0.0
    return x, y


def test_edge_cases_batched_match_rows_alone():
    x, y = _edge_batch()
    res = solve_alpha(x, y, "kl_symmetry")
    _assert_no_nan(res.alpha, res.logq, res.residual)
    for i in range(len(x)):
        alone = solve_alpha(x[i:i + 1], y[i:i + 1], "kl_symmetry")
        torch.testing.assert_close(alone.alpha, res.alpha[i:i + 1], atol=1e-13, rtol=0)
    a, q = res.alpha, res.logq.exp()
    assert a[1] == 0.5 and a[2] == 0.5 and q[2, 0] == 1.0  # identical; same one-hot
    assert 0 < a[3] < 1 and abs(float(res.residual[3])) <= 1e-6  # near one-hot, finite logits
    # Disjoint supports: no geometric mixture exists; kl_symmetry falls back to π_θ.
    assert a[4] == 1.0 and res.residual[4] == -INF
    torch.testing.assert_close(res.logq[4], res.logp_theta[4])
    # Partial overlap: q lives on the common support and balances the (finite) KLs there.
    assert q[5, 0] == 0 and q[5, 5] == 0 and abs(float(res.residual[5])) <= 1e-6
    # π_θ one-hot inside π_t: q is that one-hot for every α, g = log π_t(2) < 0 everywhere, so
    # there is no root and α sits at 0 where |g| is least.
    assert a[6] == 0.0 and q[6, 2] == 1.0
    torch.testing.assert_close(res.residual[6], res.logp_t[6, 2])
    # Fixed α on disjoint rows goes to the nearest pure model.
    fixed = solve_alpha(x, y, "fixed", fixed_alpha=0.3)
    assert fixed.alpha[4] == 0.0 and fixed.residual[4] == INF
    torch.testing.assert_close(fixed.logq[4], fixed.logp_t[4])
    _assert_no_nan(fixed.logq, solve_alpha(x, y, "entropy").logq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x, y = _pair(8, 2000, 2.0, 2.0, 10)
    x, y = x.double(), y.double()
    ref = solve_alpha(x, y, "kl_symmetry")
    res = solve_alpha(x.to(dtype), y.to(dtype), "kl_symmetry", temperature=0.9)
    res_t1 = solve_alpha(x.to(dtype), y.to(dtype), "kl_symmetry")
    assert res.logq.dtype == torch.float64
    _assert_no_nan(res.alpha, res.logq, res.residual)
    assert (res_t1.alpha - ref.alpha).abs().max() < 1e-3
    assert res.residual.abs().max() <= 1e-6
    # The half-precision values are upcast before anything else: identical to float64 inputs.
    same = solve_alpha(x.to(dtype).double(), y.to(dtype).double(), "kl_symmetry", temperature=0.9)
    assert torch.equal(res.alpha, same.alpha)


def test_bad_inputs_raise():
    x, y = _pair(2, 10, 1.0, 1.0, 11)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        solve_alpha(x, torch.randn(2, 11), "kl_symmetry")
    with pytest.raises(ValueError, match="unknown alpha method"):
        solve_alpha(x, y, "bisect")
    with pytest.raises(ValueError, match="temperature"):
        solve_alpha(x, y, "fixed", temperature=0.0)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve_alpha(bad, y, "entropy")
    with pytest.raises(ValueError, match="top_p"):
        sampling_distribution(torch.log_softmax(x.double(), -1), top_p=0.0)


def test_sampling_distribution_truncates_after_the_solve():
    x, y = _pair(3, 20, 2.0, 2.0, 12)
    res = solve_alpha(x, y, "kl_symmetry")
    assert sampling_distribution(res.logq) is res.logq
    top = sampling_distribution(res.logq, top_k=4)
    kept = top > float("-inf")
    assert (kept.sum(-1) == 4).all()
    torch.testing.assert_close(torch.logsumexp(top, -1), torch.zeros(3, dtype=torch.float64))
    # Inside the kept set the relative probabilities of q_α are untouched.
    shift = (top - res.logq)[kept].reshape(3, 4)
    torch.testing.assert_close(shift, shift[:, :1].expand(3, 4))
    nucleus = sampling_distribution(res.logq, top_p=0.5).exp()
    q = res.logq.exp()
    assert ((q * (nucleus > 0)).sum(-1) >= 0.5).all() and ((nucleus > 0).sum(-1) < 20).all()


def _np_kl(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    out = []
    for qr, pr in zip(q, p):
        s = 0.0
        for qv, pv in zip(qr, pr):
            if qv > 0:
                s += INF if pv == 0 else qv * math.log(qv / pv)
        out.append(s)
    return np.array(out)


def _np_ess(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = []
    for pr, qr in zip(p, q):
        if ((pr > 0) & (qr == 0)).any():
            out.append(0.0)
        else:
            keep = qr > 0
            w = pr[keep] / qr[keep]
            out.append((qr[keep] * w).sum() ** 2 / (qr[keep] * w**2).sum())
    return np.array(out)


def test_diagnostics_against_numpy():
    x, y = _pair(4, 9, 1.5, 2.0, 13)
    res = solve_alpha(x, y, "kl_symmetry", temperature=1.3)
    trunc = sampling_distribution(res.logq, top_k=3)
    diag = token_diagnostics(res, trunc)
    pt, pth = np.exp(res.logp_t.numpy()), np.exp(res.logp_theta.numpy())
    for logq, suffix in ((res.logq, ""), (trunc, "_sampled")):
        q = np.exp(logq.numpy())
        d = diag.as_dict()
        np.testing.assert_allclose(d["kl_theta" + suffix].numpy(), _np_kl(q, pth), rtol=1e-10)
        np.testing.assert_allclose(d["kl_t" + suffix].numpy(), _np_kl(q, pt), rtol=1e-10)
        np.testing.assert_allclose(d["ess_theta" + suffix].numpy(), _np_ess(pth, q), rtol=1e-10)
        np.testing.assert_allclose(d["ess_t" + suffix].numpy(), _np_ess(pt, q), rtol=1e-10)
        ratio = d["ess_ratio" + suffix]
        assert torch.equal(d["meets_ess" + suffix],
                           (ratio >= 0.8) & (ratio <= 1.2) & (d["ess_t" + suffix] > 0))
        gap = (d["kl_theta" + suffix] - d["kl_t" + suffix]).abs()
        assert torch.equal(d["meets_kl" + suffix], gap < 0.05)
    # kl_symmetry balances the untruncated KLs; truncation changes every diagnostic.
    assert diag.meets_kl.all() and (diag.kl_theta != diag.kl_theta_sampled).all()
    assert (diag.ess_theta_sampled == 0).all()  # π_θ has mass the truncated q never proposes
    np.testing.assert_allclose(diag.ess_ratio.numpy(),
                               _np_ess(pth, np.exp(res.logq.numpy()))
                               / _np_ess(pt, np.exp(res.logq.numpy())), rtol=1e-10)
    assert torch.equal(diag.meets_alpha, (res.alpha >= 0.2) & (res.alpha <= 0.8))


def test_condition_flags_and_no_nan_in_edge_cases():
    x, y = _pair(2, 30, 2.0, 3.0, 14)
    same = token_diagnostics(solve_alpha(x, x.clone(), "kl_symmetry"))
    assert same.meets_ess.all() and same.meets_kl.all() and same.meets_alpha.all()
    torch.testing.assert_close(same.ess_theta, torch.ones(2, dtype=torch.float64))
    pure = token_diagnostics(solve_alpha(x, y, "fixed", fixed_alpha=1.0))
    assert (pure.kl_theta.abs() < 1e-12).all() and (pure.kl_t > 0.05).all()
    assert not pure.meets_kl.any() and not pure.meets_alpha.any() and not pure.meets_ess.any()
    assert (pure.ess_ratio > 1.2).all()
    ex, ey = _edge_batch()
    for method in ("kl_symmetry", "entropy", "fixed"):
        res = solve_alpha(ex, ey, method)
        diag = token_diagnostics(res, sampling_distribution(res.logq, top_k=2, top_p=0.9))
        _assert_no_nan(*diag.as_dict().values())
    disjoint = token_diagnostics(solve_alpha(ex, ey, "kl_symmetry"))
    assert disjoint.kl_t[4] == INF and disjoint.ess_t[4] == 0 and disjoint.ess_ratio[4] == INF
    assert not disjoint.meets_kl[4] and not disjoint.meets_ess[4]


def test_ess_masks_supports():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64))
    # Row 0: q covers p, 1 / Σ p²/q = 1 / (0.25/0.25 · 2) = 0.5. Row 1: q misses p's mass -> 0.
    torch.testing.assert_close(ess(logp, logq), torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_summarize_sample():
    x, y = _pair(1, 40, 2.0, 2.0, 15)
    steps = [token_diagnostics(solve_alpha(x + i, y * (1 + i / 4), "kl_symmetry"))
             for i in range(3)]
    summary = summarize_sample(steps)
    assert summary["n_tokens"] == 3
    expect = np.mean([float(s.alpha) for s in steps])
    assert summary["alpha_mean"] == pytest.approx(expect, rel=1e-12)
    assert summary["frac_meets_alpha"] == np.mean([bool(s.meets_alpha) for s in steps])
    for key in ("ess_ratio_mean", "kl_theta_mean", "kl_t_mean", "frac_meets_ess",
                "frac_meets_kl", "kl_theta_sampled_mean"):
        assert key in summary and math.isfinite(summary[key])
    as_maps = summarize_sample([{k: v.float() for k, v in s.as_dict().items()} for s in steps])
    assert as_maps["kl_t_mean"] == pytest.approx(summary["kl_t_mean"], rel=1e-6)
    with pytest.raises(ValueError):
        summarize_sample([])
