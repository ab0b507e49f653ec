"""The stopping rule: exact on calibration data (brute force), budgets, the seed's rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from toolkit.cascade.stopping import (
    MixedPolicy,
    calibrate_lambda,
    evaluate,
    fit_policy,
    optimal_stopping_rule,
    policy_from_dict,
    policy_to_dict,
    prompt_key,
)


def _instance(seed: int, n: int = 14, L: int = 3):
    rng = np.random.default_rng(seed)
    skill = rng.normal(size=n)  # correlated stages: an easy prompt is easy for every stage
    P = 1 / (1 + np.exp(-(skill[:, None] + rng.normal(scale=0.7, size=(n, L)) + np.arange(L))))
    Y = (rng.random((n, L)) < P).astype(float)
    C = np.array([0.1, 0.35, 1.0]) * rng.uniform(0.7, 1.3, size=(n, L))
    return P, Y, C


def _brute_force(P, Y, C, lam, edges):
    """Evaluate every deterministic history-dependent policy; return the best mean value."""
    n, L = P.shape
    bins = np.stack([np.searchsorted(edges[k], P[:, k], side="right") for k in range(L)], 1)

    def trace(i, entry, rule):
        k, hist, cost = entry, (), 0.0
        while True:
            cost += C[i, k]
            hist = (*hist, (k, int(bins[i, k])))
            act = "stop" if k == L - 1 else rule[hist]
            if act == "stop":
                return cost + lam * (1 - Y[i, k])
            k = act

    # Every history any prompt can reach, with its possible actions.
    states = {}
    for i in range(n):
        for entry in range(L):
            for path in itertools.product(*[range(L)] * (L - 1)):
                k, hist = entry, ()
                for nxt in path:
                    hist = (*hist, (k, int(bins[i, k])))
                    if k == L - 1:
                        break
                    states[hist] = ["stop", *range(k + 1, L)]
                    if nxt <= k:
                        break
                    k = nxt
    keys = sorted(states)
    best = np.inf
    for entry in range(L):
        for choice in itertools.product(*[states[s] for s in keys]):
            rule = dict(zip(keys, choice))
            best = min(best, np.mean([trace(i, entry, rule) for i in range(n)]))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_backward_induction_matches_brute_force(seed, lam):
    P, Y, C = _instance(seed, n=10)
    pol = fit_policy(P, Y, C, lam, n_bins=2)
    ev = evaluate(pol, P, Y, C)
    realised = np.mean(ev["cost"] + lam * (1 - ev["correct"]))
    assert realised == pytest.approx(pol.expected_value, abs=1e-9)
    assert pol.expected_value == pytest.approx(_brute_force(P, Y, C, lam, pol.bin_edges),
                                               abs=1e-9)


def test_lambda_moves_the_tradeoff_and_budget_is_met():
    P, Y, C = _instance(11, n=300)
    costs, accs = [], []
    for lam in (0.05, 0.3, 1, 3, 10):
        ev = evaluate(fit_policy(P, Y, C, lam), P, Y, C)
        costs.append(ev["cost"].mean())
        accs.append(ev["correct"].mean())
    assert costs == sorted(costs) and costs[-1] > costs[0]
    assert accs[-1] > accs[0]
    pol, info = calibrate_lambda(P, Y, C, budget=0.6)
    assert info["met"] and evaluate(pol, P, Y, C)["cost"].mean() <= 0.6 + 1e-12
    _, info = calibrate_lambda(P, Y, C, budget=0.01)  # cheaper than any policy can be
    assert not info["met"] and "no lambda" in info["reason"]
    _, info = calibrate_lambda(P, Y, C, budget=0.2, metric="top_fraction")
    assert info["met"]


def test_mixed_policy_spends_the_budget_a_deterministic_one_cannot():
    """Two stages whose only choice is 'answer with the weak model (cost 0.2)' or 'skip to the
    strong one (cost 1)': every deterministic policy costs 0.2 or ≥ 1, so a 0.6 budget leaves
    0.4 unused; the mixture of the two sides spends it, and each prompt keeps its side."""
    n = 4000
    P = np.full((n, 2), 0.5)
    Y = np.stack([np.zeros(n), np.ones(n)], 1)
    C = np.tile([0.2, 1.0], (n, 1))
    keys = np.array([prompt_key(f"prompt {i}") for i in range(n)])
    pol, info = calibrate_lambda(P, Y, C, budget=0.6)
    assert evaluate(pol, P, Y, C)["cost"].mean() == pytest.approx(0.2)
    mixed, info = calibrate_lambda(P, Y, C, budget=0.6, mix=True)
    assert isinstance(mixed, MixedPolicy) and info["value"] == 0.6
    m = info["mixed"]
    assert m["value_low"] == pytest.approx(0.2) and m["value_high"] == pytest.approx(1.0)
    assert m["q"] == pytest.approx(0.5)
    ev = evaluate(mixed, P, Y, C, keys=keys)
    assert ev["cost"].mean() == pytest.approx(0.6, abs=0.03)  # 4000 fair coin flips
    assert ev["correct"].mean() == pytest.approx(0.5, abs=0.03)
    assert np.array_equal(evaluate(mixed, P, Y, C, keys=keys)["stage"], ev["stage"])
    back = policy_from_dict(policy_to_dict(mixed))
    assert np.array_equal(evaluate(back, P, Y, C, keys=keys)["stage"], ev["stage"])
    assert prompt_key([{"role": "user", "content": "x"}]) == '[{"content": "x", "role": "user"}]'
    with pytest.raises(ValueError, match="key"):
        evaluate(mixed, P, Y, C)
    # A budget that a deterministic policy meets exactly needs no mixing.
    same, info = calibrate_lambda(P, Y, C, budget=5.0, mix=True)
    assert not isinstance(same, MixedPolicy) and "mixed" not in info


def test_useless_first_stage_is_skipped():
    P, Y, C = _instance(3, n=200)
    Y[:, 0] = 0.0  # stage 0 is never right (like SmolLM2 here) but costs something
    P[:, 0] = np.random.default_rng(0).uniform(0, 1, 200)
    pol = fit_policy(P, Y, C, lam=1.0)
    assert pol.first_stage() > 0


def test_risk_prior_and_bad_input():
    P, Y, C = _instance(5, n=60)
    plain = fit_policy(P, Y, C, 1.0)
    shrunk = fit_policy(P, Y, C, 1.0, risk_prior=(2.0, 2.0))
    assert any(plain.decisions[""][h].stop_value != shrunk.decisions[""][h].stop_value
               for h in plain.decisions[""] if h in shrunk.decisions[""])
    with pytest.raises(ValueError, match="lambda must be a positive"):
        fit_policy(P, Y, C, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_policy(np.full_like(P, np.nan), Y, C, 1.0)
    with pytest.raises(ValueError, match="no calibration prompts"):
        fit_policy(P[:0], Y[:0], C[:0], 1.0)


def test_seed_rule_never_escalates():
    assert optimal_stopping_rule([0.3, 0.5, 0.7, 0.9], [1, 1.6, 4.2, 8.8], 1.0) == 0
    assert optimal_stopping_rule([0.1, 0.99], [1, 1], 100.0) == 0


def _realised(pol, P, Y, C, lam, groups=None):
    ev = evaluate(pol, P, Y, C, groups)
    return float(np.mean(ev["cost"] + lam * (1 - ev["correct"])))


def test_grouped_policy_minimal_case():
    """Two groups whose best decisions differ after the same history: group a answers at the
    cheap stage (always right there), group b skips it (always wrong there). One shared
    decision table let b's programme overwrite a's (a then escalated on every prompt, 1.05)."""
    P = np.full((4, 2), 0.5)
    Y = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], float)
    C = np.tile([0.1, 1.0], (4, 1))
    groups = np.array(["a", "a", "b", "b"])
    pol = fit_policy(P, Y, C, lam=2.0, groups=groups)
    assert pol.expected_value == pytest.approx(0.55)
    assert _realised(pol, P, Y, C, 2.0, groups) == pytest.approx(0.55)
    assert pol.first_stage("a") == 0 and pol.first_stage("b") == 1
    back = policy_from_dict(policy_to_dict(pol))
    assert _realised(back, P, Y, C, 2.0, groups) == pytest.approx(0.55)


@pytest.mark.parametrize("seed", range(8))
def test_grouped_policy_replays_to_its_expected_value_and_brute_force(seed):
    """For random grouped instances, the returned policy replayed on its own calibration data
    is worth exactly ``expected_value``, which is the brute-force optimum of each group."""
    rng = np.random.default_rng(100 + seed)
    lam = float(rng.choice([0.3, 1.0, 3.0]))
    P, Y, C = _instance(200 + seed, n=12)
    groups = rng.choice(["x", "y", "z"], size=12)
    pol = fit_policy(P, Y, C, lam, n_bins=2, groups=groups)
    assert _realised(pol, P, Y, C, lam, groups) == pytest.approx(pol.expected_value, abs=1e-9)
    # Independent check: the brute-force optimum of each group, on the policy's bins.
    best = sum(_brute_force(P[groups == g], Y[groups == g], C[groups == g], lam, pol.bin_edges)
               * np.sum(groups == g) for g in np.unique(groups)) / len(groups)
    assert pol.expected_value == pytest.approx(best, abs=1e-9)


def test_unknown_group_gets_the_pooled_policy():
    """A prompt of no known group (e.g. a server request) is decided by the policy solved on
    all calibration prompts pooled: the same decisions as a policy fitted without groups."""
    P, Y, C = _instance(7, n=80)
    groups = np.where(np.arange(80) % 2 == 0, "even", "odd")
    grouped = fit_policy(P, Y, C, 1.0, groups=groups)
    pooled = fit_policy(P, Y, C, 1.0)
    assert np.array_equal(evaluate(grouped, P, Y, C)["stage"], evaluate(pooled, P, Y, C)["stage"])


@pytest.mark.parametrize("seed", range(4))
def test_shared_decisions_replay_to_their_expected_value(seed):
    """One pooled post-draft table, the entry per group: replaying the returned policy on its
    calibration data gives ``expected_value``, and each group's entry is the best start under
    the pooled table (brute force over starts, replaying a pooled policy forced to start
    there)."""
    rng = np.random.default_rng(300 + seed)
    P, Y, C = _instance(400 + seed, n=60)
    groups = rng.choice(["x", "y", "z"], size=60)
    lam = 1.5
    pol = fit_policy(P, Y, C, lam, groups=groups, shared_decisions=True)
    assert _realised(pol, P, Y, C, lam, groups) == pytest.approx(pol.expected_value, abs=1e-9)
    pooled = fit_policy(P, Y, C, lam)
    for g in np.unique(groups):
        m = groups == g
        best = np.inf
        for s in range(3):
            pooled.entry = {"": s}
            ev = evaluate(pooled, P[m], Y[m], C[m])
            best = min(best, float(np.sum(ev["cost"] + lam * (1 - ev["correct"]))))
        ev = evaluate(pol, P[m], Y[m], C[m], groups[m])
        assert float(np.sum(ev["cost"] + lam * (1 - ev["correct"]))) == pytest.approx(best)
