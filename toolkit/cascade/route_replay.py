"""Replay of the methods that read the prompt first (routers, cascade routing), on the same
folds, records and cost accounting as ``replay.py``.

Every method here pays the router's forward (the prompt embedding, ``embed_cost`` per prompt,
in units of the mean top-stage call) on top of the stages it runs. Methods, per prompt:

* ``router-<kind>``: route only, continuous: the stage minimising cost + λ(1 − R) on the
  router's predictions (``routing.route_decisions``), kinds ``logistic``, ``knn``, ``mf``;
* ``route-only``: the stopping solver with ``escalate=False`` on router cells: the entry stage
  per cell, solved exactly on calibration prompts, and no escalation;
* ``cascade-routing``: the stopping solver on router cells: the entry stage per cell, and
  every post-draft decision (stop, or run any later stage), solved exactly on calibration
  prompts (post-draft decisions pooled over cells by default, per cell as an option).

The router of ``route-only`` and ``cascade-routing`` is a ``routing.py`` peer (logistic, kNN,
MF) or ``predictor``: the router heads of the one predictor module, whose post-draft heads
then read the prompt too (the ``CvScores`` passed in must be the prompt-reading one).

Router predictions are out-of-fold twice over, like the predictor's (``replay.cv_scores``): a
test prompt's R comes from a router fitted on the other folds, and the calibration prompts' R
from routers fitted inside the training folds, so calibration looks like test time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from toolkit.cascade import routing
from toolkit.cascade.prompt_table import PromptTable
from toolkit.cascade.replay import CvScores
from toolkit.cascade.stopping import AnyPolicy, calibrate_lambda, evaluate, fit_policy

ROUTED = ("route-only", "cascade-routing", *(f"router-{k}" for k in routing.ROUTERS))


@dataclass
class RouterScores:
    """A router's out-of-fold predictions, computed once and shared by every λ and budget."""

    kind: str
    R_test: np.ndarray  # [N, L] from the router that did not see the prompt's fold
    R_cal: dict[int, np.ndarray]  # fold -> [N_train, L] nested out-of-fold in training folds
    embed_cost: np.ndarray  # [N] the router's forward, in mean-top-call units


def router_scores(cv: CvScores, embeddings: np.ndarray, correct: np.ndarray,
                  embed_cost: np.ndarray, kind: str = "logistic", seed: int = 0
                  ) -> RouterScores:
    """Out-of-fold predictions of a ``routing.py`` router (``kind`` in ``routing.ROUTERS``),
    or, for ``kind="predictor"``, of the predictor's own router heads (``cv`` must then come
    from ``replay.cv_scores`` with the embeddings)."""
    if kind == "predictor":
        if cv.R_test is None or cv.R_cal is None:
            raise ValueError("router 'predictor' needs cv_scores computed with embeddings")
        return RouterScores(kind, cv.R_test, cv.R_cal, np.asarray(embed_cost, np.float64))
    R_test, R_cal = np.zeros(correct.shape), {}
    for f in cv.P_cal:
        te, tr = cv.fold == f, cv.fold != f
        inner = cv.fold if cv.inner is None else cv.inner
        R_cal[f] = routing.out_of_fold(kind, embeddings[tr], correct[tr], inner[tr], seed)
        R_test[te] = routing.fit_predict(kind, embeddings[tr], correct[tr], embeddings[te],
                                         seed)
    return RouterScores(kind, R_test, R_cal, np.asarray(embed_cost, dtype=np.float64))


@dataclass
class RoutingConfig:
    """How router predictions become cells for ``route-only`` and ``cascade-routing``."""

    stages: tuple[int, ...] = (0, 1, 2)
    """Stages whose predicted correctness defines a prompt's cell."""
    bins: int = 2
    """Quantile bins of each of those predictions (cells = bins ** len(stages))."""
    n_bins: int = 3
    """Bins of each stage's post-draft p in the policy's histories."""
    per_cell_decisions: bool = False
    """Solve the post-draft decisions per cell too (exact per cell, but cells hold few
    calibration prompts); False: one pooled post-draft table, the entry stage per cell."""
    cells: str = "route"
    """``quantile``: cells are the quantile bins of ``stages``' R (``bins`` each);
    ``route``: a cell is the stage the route-only rule picks (``routing.route_cells``) at the
    policy's λ, or under a budget at the largest λ whose routed calibration cost meets it."""
    final_entry: bool = True
    """With pooled post-draft decisions, a cell may also answer with its entry stage and never
    escalate (``fit_policy(final_entry=True)``): the route-only policy on the same cells is
    then one of the policies the solver chooses from."""
    crossfit: int = 0
    """With ``final_entry``: judge following the pooled table on prompts it was not solved on
    (``fit_policy(crossfit=...)``, parts); 0 = in-sample."""


def policy_kwargs(method: str, cfg: RoutingConfig) -> dict[str, bool]:
    """``fit_policy``'s switches for a cell-based method (route-only never escalates)."""
    if method not in ("route-only", "cascade-routing"):
        raise ValueError(f"not a cell-based routing method: {method!r}")
    escalate = method == "cascade-routing"
    shared = escalate and not cfg.per_cell_decisions
    return {"escalate": escalate, "shared_decisions": shared,
            "final_entry": shared and cfg.final_entry,
            "crossfit": cfg.crossfit if shared and cfg.final_entry else 0}


@dataclass
class RoutedPolicy:
    """A cell-based policy and the rule of the cells it was fitted on (made from the
    calibration prompts' R), so a new prompt's cell is ``cells(R)``."""

    policy: AnyPolicy
    rule: routing.CellRule
    info: dict[str, Any]

    def cells(self, R: np.ndarray) -> np.ndarray:
        return self.rule.labels(R)


def fit_routed_policy(method: str, P_cal: np.ndarray, Y_cal: np.ndarray, C_cal: np.ndarray,
                      R_cal: np.ndarray, cfg: RoutingConfig, lam: float | None = None,
                      budget: float | None = None, iters: int = 40, mix: bool = True
                      ) -> RoutedPolicy:
    """Fit ``route-only`` or ``cascade-routing`` on calibration prompts: cells from the
    router's predictions R_cal, then the stopping solver at ``lam``, or with λ calibrated so
    the stages' mean cost stays ≤ ``budget`` (``calibrate_lambda``; a ``MixedPolicy`` when
    ``mix``). The one fitting code of replay and of serving bundles."""
    if (lam is None) == (budget is None):
        raise ValueError("give exactly one of lam and budget")
    if cfg.cells == "route":  # the route-only rule's own pick, at λ or at the budget's λ
        mean_c = C_cal.mean(0)
        lam_r = lam if lam is not None else _largest_lambda(
            partial(_route_mean_cost, R=R_cal, C=C_cal, mean_c=mean_c), budget)
        rule = routing.CellRule("route", lam=float(lam_r), cost=mean_c)
    elif cfg.cells == "quantile":
        rule = routing.CellRule.quantile(R_cal, tuple(cfg.stages), cfg.bins)
    else:
        raise ValueError(f"cells must be one of {routing.CELL_RULES}, got {cfg.cells!r}")
    groups = rule.labels(R_cal)
    kwargs = policy_kwargs(method, cfg)
    if budget is None:
        pol: AnyPolicy = fit_policy(P_cal, Y_cal, C_cal, lam, n_bins=cfg.n_bins, groups=groups,
                                    **kwargs)
        return RoutedPolicy(pol, rule, {"lambda": lam})
    pol, info = calibrate_lambda(P_cal, Y_cal, C_cal, budget, groups=groups,
                                 n_bins=cfg.n_bins, iters=iters, mix=mix, **kwargs)
    return RoutedPolicy(pol, rule, info)


def routed(method: str, t: PromptTable, cv: CvScores, rs: RouterScores, lam: float,
           cfg: RoutingConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(answering stage [N], stages run [N, L]) of each prompt, out of fold, at λ; the cost
    is ``charge(ran, t.cost) + rs.embed_cost``."""
    cfg = cfg or RoutingConfig()
    N, L = t.correct.shape
    stage, ran = np.zeros(N, int), np.zeros((N, L), bool)
    C = t.cost
    for f, P_cal in cv.P_cal.items():
        te, tr = cv.fold == f, cv.fold != f
        if method.startswith("router-"):
            stage[te] = routing.route_decisions(rs.R_test[te], C[tr].mean(0), lam)
            ran[te] = np.arange(L)[None, :] == stage[te][:, None]
            continue
        fitted = fit_routed_policy(method, P_cal, t.correct[tr], C[tr], rs.R_cal[f], cfg,
                                   lam=lam)
        ev = evaluate(fitted.policy, cv.P_test[te], t.correct[te], C[te],
                      fitted.cells(rs.R_test[te]))
        stage[te], ran[te] = ev["stage"], ev["ran"]
    return stage, ran


def routed_at_budget(method: str, t: PromptTable, cv: CvScores, rs: RouterScores,
                     budget: float, cfg: RoutingConfig | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Out-of-fold decisions when the method is tuned, on its calibration folds only, to a
    mean cost (router included) ≤ ``budget``: (stage, cost, λ of each fold)."""
    cfg = cfg or RoutingConfig()
    N = len(t.ids)
    stage, cost, lambdas = np.zeros(N, int), np.zeros(N), []
    C = t.cost
    for f, P_cal in cv.P_cal.items():
        te, tr = cv.fold == f, cv.fold != f
        left = budget - float(rs.embed_cost[tr].mean())  # what the stages may spend
        if method.startswith("router-"):
            mean_c = C[tr].mean(0)
            lam = _largest_lambda(partial(_route_mean_cost, R=rs.R_cal[f], C=C[tr],
                                          mean_c=mean_c), left)
            s = routing.route_decisions(rs.R_test[te], mean_c, lam)
            stage[te], cost[te] = s, C[te][np.arange(te.sum()), s]
        else:
            fitted = fit_routed_policy(method, P_cal, t.correct[tr], C[tr], rs.R_cal[f],
                                       cfg, budget=left, iters=25)
            lam = fitted.info["lambda"]
            ev = evaluate(fitted.policy, cv.P_test[te], t.correct[te], C[te],
                          fitted.cells(rs.R_test[te]), t.keys[te])
            stage[te], cost[te] = ev["stage"], ev["cost"]
        lambdas.append(float(lam))
    return stage, cost + rs.embed_cost, lambdas


def _route_mean_cost(lam: float, R: np.ndarray, C: np.ndarray, mean_c: np.ndarray) -> float:
    return float(C[np.arange(len(C)), routing.route_decisions(R, mean_c, lam)].mean())


def _largest_lambda(mean_cost: Callable[[float], float], budget: float, lo: float = 1e-3,
                    hi: float = 1e3, iters: int = 40) -> float:
    """Bisection on log λ: the largest λ whose calibration mean cost stays ≤ budget (the
    smallest λ tried if none does). Cost grows with λ for a route-only rule."""
    if mean_cost(lo) > budget:
        return lo
    if mean_cost(hi) <= budget:
        return hi
    a, b = np.log(lo), np.log(hi)
    for _ in range(iters):
        mid = (a + b) / 2
        a, b = (mid, b) if mean_cost(float(np.exp(mid))) <= budget else (a, mid)
    return float(np.exp(a))
