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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.cascade.features import CascadeInputError, FeatureSchema, build_schema, record_features
from toolkit.cascade.records_datamodule import record_files
from toolkit.cascade.stopping import (
    StoppingPolicy,
    calibrate_lambda,
    evaluate,
    fit_policy,
    prompt_key,
)
from toolkit.common.io import read_jsonl


@dataclass
class PromptTable:
    """All stages of every fully labelled prompt, as aligned arrays."""

    ids: np.ndarray  # [N] prompt ids
    tasks: np.ndarray  # [N] task name (a prompt-only feature)
    Y: np.ndarray  # [N, L] ground-truth correctness of each stage's answer
    A: np.ndarray  # [N, L] agreement with the top stage's answer (BLEU > threshold)
    C: np.ndarray  # [N, L] cost of each stage, in mean-top-call units
    flops: np.ndarray  # [N, L] cost in FLOPs
    X: np.ndarray  # [N, L, F] predictor features
    schema: FeatureSchema
    wall: np.ndarray | None = None  # [N, L] recorded seconds of each stage's call (labelling)
    keys: np.ndarray | None = None  # [N] prompt_key of each prompt (MixedPolicy draws)

    @property
    def num_stages(self) -> int:
        return self.Y.shape[1]


def load_prompt_table(data_dir: str | Path, schema: str = "topk", num_stages: int = 3,
                      bleu_threshold: float = 0.8) -> PromptTable:
    sch = build_schema(schema, num_stages)
    by_id: dict[str, dict[int, dict]] = {}
    for path in record_files(data_dir):
        for r in read_jsonl(path):
            by_id.setdefault(r["id"], {})[int(r["stage"])] = r
    ids = sorted(i for i, st in by_id.items() if len(st) == num_stages
                 and all(st[k]["correct"] is not None for k in range(num_stages)))
    if not ids:
        raise CascadeInputError(f"no prompt under {data_dir} has scored records for all "
                         f"{num_stages} stages")
    rec = [[by_id[i][k] for k in range(num_stages)] for i in ids]
    Y = np.array([[float(s["correct"]) for s in row] for row in rec])
    A = np.array([[float(s["agreement_bleu"] > bleu_threshold) for s in row] for row in rec])
    flops = np.array([[float(s["cost_flops"]) for s in row] for row in rec])
    X = np.stack([np.stack([record_features(s, sch) for s in row]) for row in rec])
    wall = np.array([[float(s.get("wall_s", np.nan)) for s in row] for row in rec])
    keys = np.array([prompt_key(row[0]["prompt"]) for row in rec])
    return PromptTable(np.array(ids), np.array([row[0]["task"] for row in rec]), Y, A,
                       flops / flops[:, -1].mean(), flops, X, sch, wall, keys)


def fold_of(prompt_id: str, folds: int) -> int:
    return int(hashlib.sha256(f"fold:{prompt_id}".encode()).hexdigest()[:8], 16) % folds


# ----------------------------------------------------------------- predictor
def train_predictor(X: np.ndarray, y: np.ndarray, hidden: tuple[int, ...] = (256, 128),
                    steps: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4,
                    dropout: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """A small MLP (the QualityPredictor's architecture) fitted full-batch on (X, y)."""
    # Replay runs inside Trainer.test, which disables autograd; this fit needs it back. One
    # thread: a 700-row MLP gains nothing from more, and on a busy machine extra intra-op
    # threads make it many times slower (measured: 829 s vs seconds for 25 fits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _train_predictor(X, y, hidden, steps, lr, weight_decay, dropout, seed)
    finally:
        torch.set_num_threads(threads)


def _train_predictor(X: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], steps: int,
                     lr: float, weight_decay: float, dropout: float,
                     seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(X.astype(np.float32))
    t = torch.from_numpy(y.astype(np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    layers: list[torch.nn.Module] = []
    width = x.shape[1]
    for h in hidden:
        lin = torch.nn.Linear(width, h)
        torch.nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5, generator=g)
        layers += [lin, torch.nn.ReLU()]
        width = h
    layers += [torch.nn.Dropout(dropout), torch.nn.Linear(width, 1)]
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net((x - mean) / std).squeeze(-1), t)
        loss.backward()
        opt.step()
    net.eval()

    class Scorer(torch.nn.Module):
        def forward(self, feats: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(net((feats - mean) / std).squeeze(-1))

    return Scorer()


def predict(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    """p for every (prompt, stage): X [N, L, F] -> [N, L]."""
    n, L, F = X.shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order everywhere: replay results are reproducible
    try:
        with torch.no_grad():
            x = torch.from_numpy(X.reshape(n * L, F).astype(np.float32))
            return model(x).numpy().reshape(n, L)
    finally:
        torch.set_num_threads(threads)


def out_of_fold_scores(X: np.ndarray, Y: np.ndarray, folds: np.ndarray,
                       seed: int = 0, steps: int = 300) -> np.ndarray:
    """Predicted p of every (prompt, stage) from a predictor that never saw the prompt."""
    P = np.zeros(Y.shape)
    for f in np.unique(folds):
        tr = folds != f
        model = train_predictor(X[tr].reshape(-1, X.shape[-1]), Y[tr].reshape(-1), seed=seed,
                                steps=steps)
        P[~tr] = predict(model, X[~tr])
    return P


# ------------------------------------------------------------------ methods
def fixed_method(name: str, t: PromptTable) -> tuple[np.ndarray, np.ndarray]:
    """(answering stage, cost paid) of each prompt for the non-learned methods."""
    N, L = t.Y.shape
    top = L - 1
    if name == "always-top":
        return np.full(N, top), t.C[:, top]
    if name == "always-first":
        return np.zeros(N, int), t.C[:, 0]
    if name == "fixed-2stage":
        return np.full(N, top), t.C[:, 0] + t.C[:, top]
    first_ok = np.where(t.Y.any(1), t.Y.argmax(1), top)
    if name == "oracle":
        return first_ok, paid(t.C, first_ok)
    if name == "oracle-route":
        return first_ok, t.C[np.arange(N), first_ok]
    raise ValueError(f"unknown fixed method {name!r}")


def random_escalation(t: PromptTable, target_cost: float, seed: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Continue to the next stage with probability q, q tuned so E[cost] = target_cost."""
    mean_c = t.C.mean(0)
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
    stage = np.where((~go).any(1), (~go).argmax(1), L - 1)
    return stage, paid(t.C, stage)


def threshold_decisions(P: np.ndarray, t_value: float) -> np.ndarray:
    L = P.shape[1]
    ok = P[:, :-1] >= t_value
    return np.where(ok.any(1), ok.argmax(1), L - 1)


def paid(C: np.ndarray, stage: np.ndarray) -> np.ndarray:
    """Cost of running stages 0..stage[i] in order (threshold, random, oracle)."""
    return np.cumsum(C, 1)[np.arange(len(stage)), stage]


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
    N, L = t.Y.shape
    can = t.Y.any(1)
    need = int(np.ceil(accuracy * N - 1e-9))
    if need > can.sum():
        return float("nan")
    cheapest = t.C.min(1)
    first_ok = t.Y.argmax(1)
    extra = np.where(can, t.C[np.arange(N), first_ok] - cheapest, np.inf)
    return float((cheapest.sum() + np.sort(extra)[:need].sum()) / N)


@dataclass
class CvScores:
    """Predictor scores for K-fold CV, computed once and shared by every λ and method."""

    fold: np.ndarray  # [N] fold of each prompt
    P_test: np.ndarray  # [N, L] scores from the predictor that did not see the prompt
    P_cal: dict[int, np.ndarray]  # fold -> [N_train, L] nested out-of-fold training scores


def cv_scores(t: PromptTable, folds: int = 5, seed: int = 0, steps: int = 300) -> CvScores:
    fold = np.array([fold_of(i, folds) for i in t.ids])
    P_test, P_cal = np.zeros(t.Y.shape), {}
    for f in np.unique(fold):
        te, tr = fold == f, fold != f
        # The policy's calibration scores are out-of-fold inside the training folds, so they
        # look like the scores it will see at test time (in-sample scores are overconfident).
        P_cal[int(f)] = out_of_fold_scores(t.X[tr], t.Y[tr], fold[tr], seed, steps)
        model = train_predictor(t.X[tr].reshape(-1, t.X.shape[-1]), t.Y[tr].reshape(-1),
                                seed=seed, steps=steps)
        P_test[te] = predict(model, t.X[te])
    return CvScores(fold, P_test, P_cal)


def cross_validated(t: PromptTable, cv: CvScores, lam: float, n_bins: int = 3,
                    risk_prior: tuple[float, float] | None = None,
                    groups: bool = True) -> dict[str, np.ndarray]:
    """Out-of-fold decisions of ``cascade`` and ``threshold`` at one λ."""
    N = len(t.ids)
    out = {"cascade_stage": np.zeros(N, int), "cascade_cost": np.zeros(N),
           "cascade_latency": np.full(N, np.nan), "threshold_stage": np.zeros(N, int)}
    grp = t.tasks if groups else None
    for f, P_cal in cv.P_cal.items():
        te, tr = cv.fold == f, cv.fold != f
        pol: StoppingPolicy = fit_policy(P_cal, t.Y[tr], t.C[tr], lam, n_bins=n_bins,
                                         groups=None if grp is None else grp[tr],
                                         risk_prior=risk_prior)
        ev = evaluate(pol, cv.P_test[te], t.Y[te], t.C[te], None if grp is None else grp[te])
        out["cascade_stage"][te], out["cascade_cost"][te] = ev["stage"], ev["cost"]
        if t.wall is not None:  # the same decisions, paying recorded seconds instead of cost
            out["cascade_latency"][te] = evaluate(pol, cv.P_test[te], t.Y[te], t.wall[te],
                                                  None if grp is None else grp[te])["cost"]
        thr = tune_threshold(P_cal, t.Y[tr], t.C[tr], lam)
        out["threshold_stage"][te] = threshold_decisions(cv.P_test[te], thr)
    out["threshold_cost"] = paid(t.C, out["threshold_stage"])
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
    keys = t.keys if t.keys is not None else t.ids
    out: dict[str, np.ndarray | list] = {"cascade_stage": np.zeros(N, int),
                                         "cascade_cost": np.zeros(N),
                                         "threshold_stage": np.zeros(N, int), "lambdas": [],
                                         "mix_q": []}
    for f, P_cal in cv.P_cal.items():
        te, tr = cv.fold == f, cv.fold != f
        pol, info = calibrate_lambda(P_cal, t.Y[tr], t.C[tr], budget, groups=t.tasks[tr],
                                     n_bins=n_bins, risk_prior=risk_prior, iters=25, mix=mix)
        ev = evaluate(pol, cv.P_test[te], t.Y[te], t.C[te], t.tasks[te], keys[te])
        out["cascade_stage"][te], out["cascade_cost"][te] = ev["stage"], ev["cost"]
        out["lambdas"].append(info["lambda"])
        out["mix_q"].append(info["mixed"]["q"] if "mixed" in info else None)
        thr = threshold_for_budget(P_cal, t.Y[tr], t.C[tr], budget)
        out["threshold_stage"][te] = threshold_decisions(cv.P_test[te], thr)
    out["threshold_cost"] = paid(t.C, out["threshold_stage"])
    out["random_stage"], out["random_cost"] = random_escalation(
        t, float(out["cascade_cost"].mean()), seed)
    return out


def policy_from_records(data_dir: str | Path, predictor: object, lam: float,
                        n_bins: int = 3, risk_prior: tuple[float, float] | None = None,
                        by_task: bool = True) -> StoppingPolicy:
    """Fit a stopping policy on labelled records scored by a given (ONNX) predictor.

    ``by_task`` makes the entry decision per task; live prompts then need their task as group.
    """
    schema = predictor.schema  # type: ignore[attr-defined]
    t = load_prompt_table(data_dir, schema.name, schema.num_stages)
    P = np.stack([predictor.predict(t.X[:, k])[:, 0]  # type: ignore[attr-defined]
                  for k in range(t.num_stages)], 1)
    policy = fit_policy(P, t.Y, t.C, lam, n_bins=n_bins, groups=t.tasks if by_task else None,
                        risk_prior=risk_prior)
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

    N, L, F = t.X.shape
    P_lr = np.zeros(t.Y.shape)
    for f in np.unique(cv.fold):
        te, tr = cv.fold == f, cv.fold != f
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        lr.fit(t.X[tr].reshape(-1, F), t.Y[tr].reshape(-1))
        P_lr[te] = lr.predict_proba(t.X[te].reshape(-1, F))[:, 1].reshape(-1, L)

    def auc(P: np.ndarray, rows: np.ndarray, stage: int | None = None) -> float:
        y = t.Y[rows] if stage is None else t.Y[rows, stage]
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
