"""Replay evaluation: decide on cached stage records, with exact cost accounting.

Every stage of every prompt was run once by ``label``; replaying a policy on those records
costs seconds instead of hours (RouteLLM-style). Methods, per prompt:

* ``always-top`` / ``always-first``: run one stage and answer with it;
* ``fixed-2stage``: the seed's draft-then-verify: pay stage 0 and the top, answer with the top;
* ``oracle``: pay every stage up to the cheapest correct one (the top if none is correct);
* ``oracle-route``: pay only that stage;
* ``random``: escalate with a fixed probability, tuned to the cascade's mean cost;
* ``threshold``: FrugalGPT-style, answer at the first stage whose predicted p ≥ t;
* ``cascade``: the trained predictor + the optimal stopping policy (``stopping.py``).

Learned methods are evaluated by K-fold cross-validation over prompts: a prompt's decision
comes from a predictor and a policy fitted without it. The policy is fitted on out-of-fold
predictions of the training folds (nested), so its calibration data look like test data.
Costs are in units of the mean top-stage call, so a mean cost of 0.5 = half of always-top.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.cascade.prompt_table import PromptTable, load_prompt_table
from toolkit.cascade.stopping import (
    StoppingPolicy,
    calibrate_lambda,
    evaluate,
    fit_policy,
)


def family_of(task: str) -> str:
    """A task's family: its name without a ``_s<seed>`` suffix (``gsm_symbolic_s3000`` is
    more GSM-Symbolic problems from another seed, the same family)."""
    import re

    return re.sub(r"_s\d+$", "", str(task))


def fold_of(prompt_id: str, folds: int) -> int:
    return int(hashlib.sha256(f"fold:{prompt_id}".encode()).hexdigest()[:8], 16) % folds


# ----------------------------------------------------------------- predictor
def stage_targets(t: PromptTable) -> np.ndarray:
    """[N, L, 2] (correct, agreement) targets of the quality predictor, as ``fit`` trains it:
    the top stage's agreement with itself is no label (NaN)."""
    agree = t.agree.copy()
    agree[:, -1] = np.nan
    return np.stack([t.correct, agree], -1)


def fit_predictor(t: PromptTable, rows: np.ndarray, seed: int = 0, steps: int = 300,
                  embeddings: np.ndarray | None = None, **hparams: object) -> object:
    """The predictor trained on the prompts ``rows`` (bool [N]) of ``t``, every stage a row;
    with ``embeddings`` [N, D] (each prompt's), it has router heads and reads the prompt.
    ``hparams``: other ``QualityPredictor`` arguments."""
    from toolkit.cascade.predictor_module import train_quality_predictor

    X, T = t.features[rows], stage_targets(t)[rows]
    L = t.num_stages
    extra = {} if embeddings is None else {
        "embeddings": np.repeat(embeddings[rows], L, 0),  # prompt-major, as the reshape
        "stages": np.tile(np.arange(L), int(rows.sum()))}
    return train_quality_predictor(X.reshape(-1, X.shape[-1]), T.reshape(-1, 2),
                                   t.schema.name, L, steps=steps, seed=seed, **extra, **hparams)


def predictor_scores(model: object, t: PromptTable, rows: np.ndarray,
                     embeddings: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(post-draft p [n, L], router R [n, L] or None) of the prompts ``rows``."""
    from toolkit.cascade.predictor_module import predict_correct, predict_route

    e = None if embeddings is None else embeddings[rows]
    P = predict_correct(model, t.features[rows], e)
    return P, (None if e is None else predict_route(model, e))


def out_of_fold_scores(t: PromptTable, folds: np.ndarray, seed: int = 0, steps: int = 300,
                       embeddings: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted p (and, with ``embeddings``, router R) of every (prompt, stage) from a
    predictor that never saw the prompt."""
    P = np.zeros(t.correct.shape)
    R = None if embeddings is None else np.zeros(t.correct.shape)
    for f in np.unique(folds):
        tr = folds != f
        model = fit_predictor(t, tr, seed, steps, embeddings)
        P[~tr], r = predictor_scores(model, t, ~tr, embeddings)
        if R is not None:
            R[~tr] = r
    return P, R


# ------------------------------------------------------------------ methods
def fixed_method(name: str, t: PromptTable) -> tuple[np.ndarray, np.ndarray]:
    """(answering stage [N], stages run [N, L] bool) of each prompt for the non-learned
    methods; ``charge`` turns the stages run into cost or seconds."""
    N, L = t.correct.shape
    top = L - 1
    if name == "always-top":
        stage = np.full(N, top)
        return stage, ran_only(stage, L)
    if name == "always-first":
        stage = np.zeros(N, int)
        return stage, ran_only(stage, L)
    if name == "fixed-2stage":
        stage = np.full(N, top)
        return stage, ran_only(stage, L) | ran_only(np.zeros(N, int), L)
    first_ok = np.where(t.correct.any(1), t.correct.argmax(1), top)
    if name == "oracle":
        return first_ok, ran_upto(first_ok, L)
    if name == "oracle-route":
        return first_ok, ran_only(first_ok, L)
    raise ValueError(f"unknown fixed method {name!r}")


def ran_only(stage: np.ndarray, L: int) -> np.ndarray:
    """[N, L] mask: only stage[i] ran."""
    return np.arange(L)[None, :] == np.asarray(stage)[:, None]


def ran_upto(stage: np.ndarray, L: int) -> np.ndarray:
    """[N, L] mask: stages 0..stage[i] ran, in order (threshold, random, oracle)."""
    return np.arange(L)[None, :] <= np.asarray(stage)[:, None]


def charge(ran: np.ndarray, per_call: np.ndarray) -> np.ndarray:
    """What each prompt paid: the sum of ``per_call`` (cost units, FLOPs or recorded seconds,
    [N, L]) over the stages it ran."""
    return np.where(ran, per_call, 0.0).sum(1)


def paid(C: np.ndarray, stage: np.ndarray) -> np.ndarray:
    """Cost of running stages 0..stage[i] in order (threshold, random, oracle)."""
    return charge(ran_upto(stage, C.shape[1]), C)


def random_escalation(t: PromptTable, target_cost: float, seed: int) -> np.ndarray:
    """Answering stage of each prompt when every stage continues to the next with
    probability q, q tuned so E[cost] = target_cost (stages run: ``ran_upto``)."""
    mean_c = t.cost.mean(0)
    L = len(mean_c)

    def expected(q: float) -> float:
        return float(sum(q ** k * mean_c[k] for k in range(L)))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < target_cost else (lo, mid)
    q = (lo + hi) / 2
    rng = np.random.default_rng(seed)
    go = rng.random((len(t.ids), L - 1)) < q
    return np.where((~go).any(1), (~go).argmax(1), L - 1)


def threshold_decisions(P: np.ndarray, t_value: float) -> np.ndarray:
    L = P.shape[1]
    ok = P[:, :-1] >= t_value
    return np.where(ok.any(1), ok.argmax(1), L - 1)


def _threshold_sweep(P: np.ndarray, Y: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every distinct threshold on calibration prompts with its mean cost and accuracy."""
    cands = np.unique(np.concatenate([P[:, :-1].ravel(), [1.01]]))
    # [T, N] answering stage of each prompt under each threshold, without a Python loop.
    ok = P[None, :, :-1] >= cands[:, None, None]
    stage = np.where(ok.any(2), ok.argmax(2), P.shape[1] - 1)
    cost = np.take_along_axis(np.cumsum(C, 1)[None], stage[..., None], 2)[..., 0].mean(1)
    acc = np.take_along_axis(Y[None], stage[..., None], 2)[..., 0].mean(1)
    return cands, cost, acc


def tune_threshold(P: np.ndarray, Y: np.ndarray, C: np.ndarray, lam: float) -> float:
    """The threshold minimising mean cost + λ(1 − correct) on calibration prompts."""
    cands, cost, acc = _threshold_sweep(P, Y, C)
    return float(cands[np.argmin(cost + lam * (1 - acc))])


def threshold_for_budget(P: np.ndarray, Y: np.ndarray, C: np.ndarray, budget: float) -> float:
    """The most accurate threshold whose mean calibration cost stays within ``budget``
    (the cheapest one if none does)."""
    cands, cost, acc = _threshold_sweep(P, Y, C)
    ok = cost <= budget
    if not ok.any():
        return float(cands[np.argmin(cost)])
    return float(cands[ok][np.argmax(acc[ok])])


def oracle_cost_at(t: PromptTable, accuracy: float) -> float:
    """Least mean cost at which a routing oracle (knows every answer, runs one stage per
    prompt) reaches ``accuracy``: it fixes the prompts that are cheapest to get right and
    answers the rest with the cheapest stage. NaN if no routing reaches that accuracy."""
    N, L = t.correct.shape
    can = t.correct.any(1)
    need = int(np.ceil(accuracy * N - 1e-9))
    if need > can.sum():
        return float("nan")
    C = t.cost
    cheapest = C.min(1)
    first_ok = t.correct.argmax(1)
    extra = np.where(can, C[np.arange(N), first_ok] - cheapest, np.inf)
    return float((cheapest.sum() + np.sort(extra)[:need].sum()) / N)


@dataclass
class CvScores:
    """Predictor scores for K-fold CV, computed once and shared by every λ and method."""

    fold: np.ndarray  # [N] fold of each prompt
    P_test: np.ndarray  # [N, L] scores from the predictor that did not see the prompt
    P_cal: dict[int, np.ndarray]  # fold -> [N_train, L] nested out-of-fold training scores
    # The same for the router heads, when the predictor reads the prompt embedding:
    R_test: np.ndarray | None = None
    R_cal: dict[int, np.ndarray] | None = None
    # [N] fold of each prompt for the nested (calibration) predictions inside training folds:
    # hashed by prompt id (equal to ``fold`` unless the outer folds are families).
    inner: np.ndarray | None = None
    families: list[str] | None = None  # outer fold k = families[k] (leave one family out)


def cv_scores(t: PromptTable, folds: int = 5, seed: int = 0, steps: int = 300,
              progress: bool = False, embeddings: np.ndarray | None = None,
              by_family: bool = False) -> CvScores:
    """Train the predictor once per fold (plus the nested calibration folds).

    ``by_family``: leave one family out: the outer folds are the task families (a prompt's
    predictor, router and policy never saw its family); the nested calibration folds inside
    the training families stay ``folds`` hashed folds by prompt id.

    ``embeddings`` [N, D] (each prompt's, from the sidecar) give the predictor router heads
    and prompt-reading post-draft heads (``predictor_module``); their router predictions are
    out of fold in the same way. ``progress`` shows a bar over the outer folds on stderr (a
    ``test`` run trains folds × folds predictors before its first decision, a minute or more
    on 2 cores).
    """
    from tqdm import tqdm

    inner = np.array([fold_of(i, folds) for i in t.ids])
    fam = [family_of(x) for x in t.tasks]
    families = sorted(set(fam)) if by_family else None
    if families is not None and len(families) < 2:
        raise ValueError(f"leave-one-family-out needs two families or more, got {families}")
    fold = inner if families is None else np.array([families.index(x) for x in fam])
    P_test, P_cal = np.zeros(t.correct.shape), {}
    R_test = None if embeddings is None else np.zeros(t.correct.shape)
    R_cal: dict[int, np.ndarray] = {}
    for f in tqdm(np.unique(fold), desc="replay: cross-validation folds", unit="fold",
                  file=sys.stderr, disable=not progress):
        te, tr = fold == f, fold != f
        # The policy's calibration scores are out-of-fold inside the training folds, so they
        # look like the scores it will see at test time (in-sample scores are overconfident).
        P_cal[int(f)], r_cal = out_of_fold_scores(
            t.subset(tr), inner[tr], seed, steps, None if embeddings is None else embeddings[tr])
        model = fit_predictor(t, tr, seed, steps, embeddings)
        P_test[te], r = predictor_scores(model, t, te, embeddings)
        if R_test is not None:
            R_test[te], R_cal[int(f)] = r, r_cal
    return CvScores(fold, P_test, P_cal, R_test, R_cal if R_test is not None else None, inner,
                    families)


def cross_validated(t: PromptTable, cv: CvScores, lam: float, n_bins: int = 3,
                    risk_prior: tuple[float, float] | None = None,
                    groups: bool = True) -> dict[str, np.ndarray]:
    """Out-of-fold decisions of ``cascade`` and ``threshold`` at one λ: answering stage,
    cost and recorded latency of each prompt."""
    N, L = t.correct.shape
    out = {"cascade_stage": np.zeros(N, int), "cascade_ran": np.zeros((N, L), bool),
           "threshold_stage": np.zeros(N, int)}
    C, grp = t.cost, (t.tasks if groups else None)
    for f, P_cal in cv.P_cal.items():
        te, tr = cv.fold == f, cv.fold != f
        pol: StoppingPolicy = fit_policy(P_cal, t.correct[tr], C[tr], lam, n_bins=n_bins,
                                         groups=None if grp is None else grp[tr],
                                         risk_prior=risk_prior)
        ev = evaluate(pol, cv.P_test[te], t.correct[te], C[te],
                      None if grp is None else grp[te])
        out["cascade_stage"][te], out["cascade_ran"][te] = ev["stage"], ev["ran"]
        thr = tune_threshold(P_cal, t.correct[tr], C[tr], lam)
        out["threshold_stage"][te] = threshold_decisions(cv.P_test[te], thr)
    out["cascade_cost"] = charge(out["cascade_ran"], C)
    out["cascade_latency"] = charge(out["cascade_ran"], t.wall_s)
    out["threshold_cost"] = paid(C, out["threshold_stage"])
    return out


def at_budget(t: PromptTable, cv: CvScores, budget: float, n_bins: int = 3,
              risk_prior: tuple[float, float] | None = None,
              seed: int = 0, mix: bool = True) -> dict[str, np.ndarray | list]:
    """Out-of-fold decisions of ``cascade`` and ``threshold`` when each is tuned, on its
    calibration folds only, to a mean cost ≤ ``budget``; ``random`` is then tuned to the
    cascade's realised mean cost so that the three are compared at (about) equal cost.

    ``mix``: the cascade is a ``MixedPolicy`` whose expected calibration cost is the budget
    (``mix_q`` lists each fold's share of prompts on the costlier side, or None).
    """
    N = len(t.ids)
    C = t.cost
    out: dict[str, np.ndarray | list] = {"cascade_stage": np.zeros(N, int),
                                         "cascade_cost": np.zeros(N),
                                         "threshold_stage": np.zeros(N, int), "lambdas": [],
                                         "mix_q": []}
    for f, P_cal in cv.P_cal.items():
        te, tr = cv.fold == f, cv.fold != f
        pol, info = calibrate_lambda(P_cal, t.correct[tr], C[tr], budget, groups=t.tasks[tr],
                                     n_bins=n_bins, risk_prior=risk_prior, iters=25, mix=mix)
        ev = evaluate(pol, cv.P_test[te], t.correct[te], C[te], t.tasks[te], t.keys[te])
        out["cascade_stage"][te], out["cascade_cost"][te] = ev["stage"], ev["cost"]
        out["lambdas"].append(info["lambda"])
        out["mix_q"].append(info["mixed"]["q"] if "mixed" in info else None)
        thr = threshold_for_budget(P_cal, t.correct[tr], C[tr], budget)
        out["threshold_stage"][te] = threshold_decisions(cv.P_test[te], thr)
    out["threshold_cost"] = paid(C, out["threshold_stage"])
    out["random_stage"] = random_escalation(t, float(out["cascade_cost"].mean()), seed)
    out["random_cost"] = paid(C, out["random_stage"])
    return out


def policy_from_records(data_dir: str | Path, predictor: object, lam: float,
                        n_bins: int = 3, risk_prior: tuple[float, float] | None = None,
                        by_task: bool = True) -> StoppingPolicy:
    """Fit a stopping policy on labelled records scored by a given (ONNX) predictor.

    ``by_task`` makes the entry decision per task; live prompts then need their task as group.
    """
    schema = predictor.schema  # type: ignore[attr-defined]
    t = load_prompt_table(data_dir, schema, schema.num_stages)
    P = np.stack([predictor.predict(t.features[:, k])[:, 0]  # type: ignore[attr-defined]
                  for k in range(t.num_stages)], 1)
    policy = fit_policy(P, t.correct, t.cost, lam, n_bins=n_bins,
                        groups=t.tasks if by_task else None, risk_prior=risk_prior)
    policy.meta = {"data_dir": str(data_dir), "prompts": len(t.ids),
                   "mean_top_flops": float(t.flops[:, -1].mean())}
    return policy


def auroc_against_logistic(t: PromptTable, cv: CvScores, seed: int = 0,
                           n_boot: int = 1000) -> dict[str, object]:
    """Out-of-fold AUROC (ground-truth correctness) of the MLP predictor beside a
    logistic-regression baseline fitted on the same features and folds (scikit-learn), pooled
    over stages and per stage, with a paired bootstrap interval (over prompts) of the
    difference."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    N, L, F = t.features.shape
    P_lr = np.zeros(t.correct.shape)
    for f in np.unique(cv.fold):
        te, tr = cv.fold == f, cv.fold != f
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        lr.fit(t.features[tr].reshape(-1, F), t.correct[tr].reshape(-1))
        P_lr[te] = lr.predict_proba(t.features[te].reshape(-1, F))[:, 1].reshape(-1, L)

    def auc(P: np.ndarray, rows: np.ndarray, stage: int | None = None) -> float:
        y = t.correct[rows] if stage is None else t.correct[rows, stage]
        p = P[rows] if stage is None else P[rows, stage]
        return float(roc_auc_score(y.ravel(), p.ravel())) if 0 < y.mean() < 1 else float("nan")

    rows = np.arange(N)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        b = rng.integers(0, N, N)
        diffs.append(auc(cv.P_test, b) - auc(P_lr, b))
    diffs = np.asarray(diffs)
    diffs = diffs[np.isfinite(diffs)]
    per_stage = {str(k): {"mlp": auc(cv.P_test, rows, k), "logistic_regression": auc(P_lr, rows, k)}
                 for k in range(L)}
    return {"mlp": auc(cv.P_test, rows), "logistic_regression": auc(P_lr, rows),
            "difference": {"value": auc(cv.P_test, rows) - auc(P_lr, rows),
                           "ci95": [float(np.quantile(diffs, 0.025)),
                                    float(np.quantile(diffs, 0.975))], "n": int(N)},
            "per_stage": per_stage, "features": t.schema.id}
