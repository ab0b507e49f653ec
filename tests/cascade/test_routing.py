"""Routers and cascade routing: against naive loops, brute force and synthetic ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from toolkit.cascade import routing
from toolkit.cascade.stopping import evaluate, fit_policy, policy_from_dict, policy_to_dict


def _synthetic(seed: int, n: int = 300, d: int = 24, L: int = 3):
    """Prompts whose stage correctness is a noisy function of a hidden 2-D 'difficulty'."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    X = z @ rng.normal(size=(2, d)) + 0.3 * rng.normal(size=(n, d))
    logits = np.stack([z[:, 0] - 1.0, z[:, 0] + z[:, 1], z[:, 0] + z[:, 1] + 1.5], 1)[:, :L]
    Y = (rng.random((n, L)) < 1 / (1 + np.exp(-2 * logits))).astype(float)
    return X, Y


@pytest.mark.parametrize("kind", routing.ROUTERS)
def test_every_router_learns_a_learnable_problem(kind):
    X, Y = _synthetic(0)
    folds = np.arange(len(X)) % 5
    R = routing.out_of_fold(kind, X, Y, folds)
    assert R.shape == Y.shape and ((R >= 0) & (R <= 1)).all()
    for s in range(Y.shape[1]):
        assert roc_auc_score(Y[:, s], R[:, s]) > 0.75, (kind, s)


def test_knn_router_equals_a_naive_loop():
    X, Y = _synthetic(1, n=60)
    tr, te = np.arange(60) < 45, np.arange(60) >= 45
    got = routing.fit_predict("knn", X[tr], Y[tr], X[te], k=7)
    centre = X[tr].mean(0)
    for row, x in zip(got, X[te]):
        sims = []
        for j, xt in enumerate(X[tr]):
            a, b = x - centre, xt - centre
            sims.append((float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), j))
        nearest = [j for _, j in sorted(sims, reverse=True)[:7]]
        assert np.allclose(row, Y[tr][nearest].mean(0))


def test_route_decisions_equal_a_naive_argmin():
    rng = np.random.default_rng(2)
    R, cost = rng.random((50, 3)), np.array([0.1, 0.3, 1.0])
    for lam in (0.2, 1.0, 5.0):
        want = [min(range(3), key=lambda s: cost[s] + lam * (1 - r[s])) for r in R]
        assert routing.route_decisions(R, cost, lam).tolist() == want


def test_route_only_policy_is_the_best_single_stage_per_cell():
    """escalate=False: each group answers with the stage of least mean cost + λ(1 − acc) —
    brute force over every stage per group — and replays to its expected value."""
    rng = np.random.default_rng(3)
    n, L, lam = 120, 3, 1.5
    Y = (rng.random((n, L)) < [0.2, 0.5, 0.7]).astype(float)
    C = np.tile([0.1, 0.35, 1.0], (n, 1)) * rng.uniform(0.8, 1.2, (n, L))
    P = rng.random((n, L))
    groups = rng.choice(["a", "b", "c"], n)
    pol = fit_policy(P, Y, C, lam, groups=groups, escalate=False)
    total = 0.0
    for g in np.unique(groups):
        m = groups == g
        values = [float(np.sum(C[m, s] + lam * (1 - Y[m, s]))) for s in range(L)]
        assert pol.first_stage(g) == int(np.argmin(values))
        total += min(values)
    assert pol.expected_value == pytest.approx(total / n)
    ev = evaluate(pol, P, Y, C, groups)
    assert (ev["ran"].sum(1) == 1).all()  # one stage per prompt: nothing escalated
    assert np.mean(ev["cost"] + lam * (1 - ev["correct"])) == pytest.approx(pol.expected_value)
    back = policy_from_dict(policy_to_dict(pol))
    assert np.array_equal(evaluate(back, P, Y, C, groups)["stage"], ev["stage"])


def test_router_cells_use_calibration_quantiles():
    R_cal = np.array([[0, 0.1, 0.2], [0, 0.5, 0.4], [0, 0.9, 0.9], [0, 0.3, 0.7]])
    cal, other = routing.router_cells(R_cal, np.array([[0, 0.0, 1.0]]), [1, 2], 2)
    # medians: stage 1 0.4, stage 2 0.55
    assert cal.tolist() == ["1:0|2:0", "1:1|2:0", "1:1|2:1", "1:0|2:1"]
    assert other.tolist() == ["1:0|2:1"]


def _table_and_cv(seed: int = 0, n: int = 100):
    from toolkit.cascade import replay
    from toolkit.cascade.features import build_schema
    from toolkit.cascade.prompt_table import PromptTable

    X, Y = _synthetic(seed, n=n)
    rng = np.random.default_rng(seed)
    schema = build_schema("minimal", 3)
    flops = np.tile([1e8, 4e8, 1.2e9], (n, 1)) * rng.uniform(0.8, 1.2, (n, 3))
    ids = np.array([f"p{i:03d}" for i in range(n)])
    t = PromptTable(ids, np.array(["t"] * n), np.array(["train"] * n), ids, correct=Y,
                    agree=Y, flops=flops, wall_s=flops / 1e9, schema=schema,
                    features=rng.random((n, 3, schema.dim)).astype(np.float32))
    return t, replay.cv_scores(t, folds=5, seed=0, steps=20), X


def test_one_router_cell_is_todays_cascade_and_the_router_is_charged():
    """With a single cell, cascade routing is the cascade without groups (same solver, same
    folds); every routed method pays the router's forward on top of the stages it runs."""
    from toolkit.cascade import replay, route_replay

    t, cv, X = _table_and_cv()
    embed_cost = np.full(len(t.ids), 0.01)
    rs = route_replay.router_scores(cv, X, t.correct, embed_cost, "logistic")
    one_cell = route_replay.RoutingConfig(stages=(1,), bins=1, cells="quantile",
                                          final_entry=False)
    for lam in (0.5, 3.0):
        stage, ran = route_replay.routed("cascade-routing", t, cv, rs, lam, one_cell)
        plain = replay.cross_validated(t, cv, lam, groups=False)
        assert np.array_equal(stage, plain["cascade_stage"])
        assert np.allclose(replay.charge(ran, t.cost), plain["cascade_cost"])
    for method in route_replay.ROUTED:
        s, c, lams = route_replay.routed_at_budget(method, t, cv, rs, 0.5)
        assert len(lams) == 5 and (c >= 0.01).all()
        assert c.mean() <= 0.5 + 0.15, method  # tuned on calibration folds only


def _instance(seed: int, n: int = 150, L: int = 3):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, L)) < [0.2, 0.5, 0.7][:L]).astype(float)
    C = np.tile([0.1, 0.35, 1.0][:L], (n, 1)) * rng.uniform(0.8, 1.2, (n, L))
    P = np.clip(Y * 0.3 + rng.random((n, L)) * 0.7, 0, 1)
    return P, Y, C, rng.choice(["a", "b", "c", "d"], n)


@pytest.mark.parametrize("seed", range(4))
def test_final_entry_contains_route_only_and_the_pooled_policy(seed):
    """With pooled post-draft decisions, ``final_entry`` lets each group either follow the
    pooled table after its entry or answer with its entry stage at once. Its calibration
    value is the per-group minimum of the two (brute force over both option sets), so it is
    never worse than route-only (naive per-group argmin) nor than the pooled policy alone,
    and replaying it realises that value."""
    P, Y, C, groups = _instance(seed)
    lam = 2.0
    pooled = fit_policy(P, Y, C, lam, groups=groups, shared_decisions=True)
    both = fit_policy(P, Y, C, lam, groups=groups, shared_decisions=True, final_entry=True)
    total = 0.0
    for g in np.unique(groups):
        m = groups == g
        at_once = [float(np.sum(C[m, s] + lam * (1 - Y[m, s]))) for s in range(3)]
        follow = []
        for s in range(3):  # realised value of entering at s and following the pooled table
            entered = pooled.__class__(**{**pooled.__dict__, "entry": {"": s}})
            ev = evaluate(entered, P[m], Y[m], C[m])
            follow.append(float(np.sum(ev["cost"] + lam * (1 - ev["correct"]))))
        total += min(min(at_once), min(follow))
        if min(at_once) < min(follow):
            assert g in both.final_groups and both.first_stage(g) == int(np.argmin(at_once))
    assert both.expected_value == pytest.approx(total / len(Y))
    route_only = fit_policy(P, Y, C, lam, groups=groups, escalate=False)
    assert both.expected_value <= route_only.expected_value + 1e-12
    assert both.expected_value <= pooled.expected_value + 1e-12
    ev = evaluate(both, P, Y, C, groups)
    assert np.mean(ev["cost"] + lam * (1 - ev["correct"])) == pytest.approx(both.expected_value)
    for g in both.final_groups:  # a final group never escalates
        assert (ev["ran"][groups == g].sum(1) == 1).all()
    back = policy_from_dict(policy_to_dict(both))
    assert back.final_groups == both.final_groups
    assert np.array_equal(evaluate(back, P, Y, C, groups)["stage"], ev["stage"])


def test_route_cells_hold_the_continuous_router_among_their_policies():
    """Cells = the route-only rule's own pick at λ: a naive loop gives the same labels, and
    the solved cascade-routing policy on those cells is, on its calibration prompts, at least
    as good as the continuous router (cost_k + λ(1 − Y_k) at each prompt's routed stage)."""
    from toolkit.cascade import route_replay

    rng = np.random.default_rng(5)
    P, Y, C, _ = _instance(5, n=200)
    R = np.clip(Y * 0.4 + rng.random(Y.shape) * 0.6, 0, 1)
    mean_c = C.mean(0)
    for lam in (0.5, 2.0, 8.0):
        naive = [f"route:{min(range(3), key=lambda k: mean_c[k] + lam * (1 - r[k]))}"
                 for r in R]
        assert routing.route_cells(R, mean_c, lam).tolist() == naive
        cfg = route_replay.RoutingConfig(cells="route", final_entry=True)
        fitted = route_replay.fit_routed_policy("cascade-routing", P, Y, C, R, cfg, lam=lam)
        assert fitted.cells(R).tolist() == naive
        s = routing.route_decisions(R, mean_c, lam)
        router_value = np.mean(C[np.arange(len(Y)), s] + lam * (1 - Y[np.arange(len(Y)), s]))
        assert fitted.policy.expected_value <= router_value + 1e-12


def test_crossfit_stops_trusting_a_table_fitted_to_noise():
    """When the post-draft scores carry no information, a pooled table solved on the same
    prompts still finds "patterns" in them (escalating in bins where the next stage happened
    to do well), so in-sample groups seem to gain from following it. Judged on prompts each
    table was not solved on (``crossfit``), more groups answer with their entry stage. Either
    way the policy replays to its expected value, and crossfit=0 is the in-sample choice."""
    finals = {0: 0, 5: 0}
    for seed in range(4):
        rng = np.random.default_rng(seed)
        n, L, lam = 600, 3, 3.0
        Y = (rng.random((n, L)) < [0.05, 0.45, 0.75]).astype(float)
        C = np.tile([0.1, 0.35, 1.0], (n, 1))
        P = rng.random((n, L))  # uninformative
        groups = rng.choice([f"g{i}" for i in range(12)], n)
        kw = {"groups": groups, "shared_decisions": True, "final_entry": True, "n_bins": 4}
        plain = fit_policy(P, Y, C, lam, **kw)
        for parts in finals:
            pol = fit_policy(P, Y, C, lam, crossfit=parts, **kw)
            finals[parts] += len(pol.final_groups)
            if parts == 0:
                assert pol.final_groups == plain.final_groups
            ev = evaluate(pol, P, Y, C, groups)
            assert np.mean(ev["cost"] + lam * (1 - ev["correct"])) == pytest.approx(
                pol.expected_value)
            # in-sample, the in-sample choice is optimal among these options
            assert plain.expected_value <= pol.expected_value + 1e-12
    assert finals[5] > finals[0]
