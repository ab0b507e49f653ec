"""Routers: from the prompt alone, the probability that each stage answers it correctly.

A router reads a prompt representation (pooled hidden states of a small model, see
``prompt_embeddings.py``; its forward is charged to every policy that uses it) and predicts
``R[i, k] = P(stage k answers prompt i correctly)`` before any stage runs. Three peers, written
from their published descriptions:

* ``logistic``: one standardised logistic regression per stage (a small classifier);
* ``knn``: the mean correctness of the k nearest calibration prompts (cosine similarity), the
  RouteLLM-style similarity router;
* ``mf``: matrix factorisation (RouteLLM): a prompt is projected to a small latent space and
  each stage has a latent vector; ``logit = v_k · (W x) + b_k``, trained with cross-entropy on
  every (prompt, stage) correctness label.

Two ways to use R:

* **route only** (``route_decisions``): answer with the stage minimising
  ``cost_k + λ · (1 − R_k)``; no draft is ever looked at;
* **cascade routing** (a ``CellRule`` + ``stopping.fit_policy``): the router's predictions
  put each prompt in a cell; the stopping policy is solved exactly per cell on calibration
  data, so the entry stage and every post-draft decision are chosen per prompt from what the
  router saw. Cells are either quantile bins of chosen stages' R, or the stage the route-only
  rule itself picks (``route_cells``): with ``final_entry`` the solver may then keep the
  continuous router's choice for a cell, or escalate after its draft where calibration says
  that pays. ``escalate=False`` in ``fit_policy`` turns the same solver into a cell-wise
  route-only policy; cells by task give today's cascade.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROUTERS = ("logistic", "knn", "mf")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z) without overflow (numpy only: the server loads routers without scipy)."""
    return np.exp(-np.logaddexp(0.0, -z))


def _standardise(X_train: np.ndarray, X: np.ndarray) -> np.ndarray:
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    return (X - mean) / std


@dataclass
class Router:
    """A fitted router as named plain arrays, so it can be saved without pickle (``save``:
    an npz read with ``allow_pickle=False``) and served by numpy alone.

    ``logistic``: ``mean``, ``std`` (standardisation), ``coef`` [L, D], ``intercept`` [L],
    ``const`` [L] (a stage always or never right in training: its R, else NaN);
    ``knn``: ``mean``, ``unit_train`` [N, D] (centred, unit-norm training prompts),
    ``Y_train`` [N, L], ``k``; ``mf``: ``mean``, ``std``, ``W`` [D, r], ``V`` [L, r], ``b`` [L].
    """

    kind: str
    arrays: dict[str, np.ndarray]

    @property
    def num_stages(self) -> int:
        return int(len(self.arrays["Y_train"][0] if self.kind == "knn"
                       else self.arrays["intercept" if self.kind == "logistic" else "b"]))

    @property
    def dim(self) -> int:
        return int(self.arrays["mean"].shape[0])

    def predict(self, X: np.ndarray) -> np.ndarray:
        """R [M, L]: the predicted probability that each stage answers each prompt right."""
        a = self.arrays
        X = np.asarray(X, dtype=np.float64)
        if self.kind == "logistic":
            Xs = (X - a["mean"]) / a["std"]
            R = np.empty((len(X), len(a["intercept"])))
            for s in range(R.shape[1]):
                if np.isnan(a["const"][s]):
                    R[:, s] = _sigmoid(Xs @ a["coef"][s:s + 1].T + a["intercept"][s])[:, 0]
                else:
                    R[:, s] = a["const"][s]
            return R
        if self.kind == "knn":
            q = X - a["mean"]
            sim = (q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-12)) @ a["unit_train"].T
            k = int(a["k"])
            nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            return a["Y_train"][nearest].mean(1)
        if self.kind == "mf":
            xt = ((X - a["mean"]) / a["std"]).astype(np.float32)
            return _sigmoid((xt @ a["W"]) @ a["V"].T + a["b"]).astype(np.float64)
        raise ValueError(f"unknown router {self.kind!r}; choose from {ROUTERS}")

    def save(self, path: str | Path) -> Path:
        """Write the router as an npz of plain arrays (kind included)."""
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, kind=np.array(self.kind), **self.arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Router:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "kind"}
            kind = str(z["kind"])
        if kind not in ROUTERS:
            raise ValueError(f"{path}: unknown router kind {kind!r}")
        return cls(kind, arrays)


def fit_router(kind: str, X_train: np.ndarray, Y_train: np.ndarray, seed: int = 0,
               k: int = 20, rank: int = 16, steps: int = 400) -> Router:
    """Fit a router on (X_train [N, D], Y_train [N, L] 0/1)."""
    X_train = np.asarray(X_train, dtype=np.float64)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        Xs = (X_train - mean) / std
        L, D = Y_train.shape[1], X_train.shape[1]
        coef, intercept, const = np.zeros((L, D)), np.zeros(L), np.full(L, np.nan)
        for s in range(L):
            y = Y_train[:, s]
            if y.min() == y.max():  # a stage always (or never) right on these prompts
                const[s] = y[0]
                continue
            # C=0.05: hidden states are ~1,000 wide and prompts a few hundred; strong L2.
            clf = LogisticRegression(C=0.05, max_iter=2000, random_state=seed).fit(Xs, y)
            coef[s], intercept[s] = clf.coef_[0], clf.intercept_[0]
        return Router(kind, {"mean": mean, "std": std, "coef": coef, "intercept": intercept,
                             "const": const})
    if kind == "knn":
        c = X_train - mean
        unit = c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-12)
        return Router(kind, {"mean": mean, "unit_train": unit, "Y_train": Y_train,
                             "k": np.array(min(k, len(X_train)))})
    if kind == "mf":
        return Router(kind, {"mean": mean, "std": std,
                             **_matrix_factorisation(X_train, Y_train, seed, rank, steps)})
    raise ValueError(f"unknown router {kind!r}; choose from {ROUTERS}")


def fit_predict(kind: str, X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray,
                seed: int = 0, k: int = 20, rank: int = 16, steps: int = 400) -> np.ndarray:
    """Fit a router on (X_train [N, D], Y_train [N, L] 0/1) and predict R [M, L] for X_test."""
    return fit_router(kind, X_train, Y_train, seed, k, rank, steps).predict(X_test)


def _matrix_factorisation(X_train: np.ndarray, Y_train: np.ndarray, seed: int, rank: int,
                          steps: int) -> dict[str, np.ndarray]:
    """W, V, b of ``logit = v_k · (W x) + b_k`` (x standardised), trained with AdamW."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small problem; one thread fixes the summation order
    try:
        with torch.inference_mode(False), torch.enable_grad():
            g = torch.Generator().manual_seed(seed)
            x = torch.from_numpy(_standardise(X_train, X_train).astype(np.float32))
            y = torch.from_numpy(Y_train.astype(np.float32))
            D, L = x.shape[1], y.shape[1]
            W = (torch.randn(D, rank, generator=g) / D ** 0.5).requires_grad_()
            V = (torch.randn(L, rank, generator=g) / rank ** 0.5).requires_grad_()
            b = torch.zeros(L, requires_grad=True)
            opt = torch.optim.AdamW([W, V, b], lr=1e-2, weight_decay=1e-2)
            for _ in range(steps):
                opt.zero_grad()
                logits = (x @ W) @ V.T + b
                torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
                opt.step()
            return {"W": W.detach().numpy().copy(), "V": V.detach().numpy().copy(),
                    "b": b.detach().numpy().copy()}
    finally:
        torch.set_num_threads(threads)


def out_of_fold(kind: str, X: np.ndarray, Y: np.ndarray, folds: np.ndarray,
                seed: int = 0) -> np.ndarray:
    """R of every prompt from a router fitted without its fold."""
    R = np.zeros(Y.shape)
    for f in np.unique(folds):
        tr = folds != f
        R[~tr] = fit_predict(kind, X[tr], Y[tr], X[~tr], seed)
    return R


def route_decisions(R: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """Route only: per prompt, the stage minimising expected cost_k + λ · (1 − R_k).

    ``cost`` is [L] (mean cost of each stage on calibration prompts) or [N, L].
    """
    cost = np.broadcast_to(cost, R.shape)
    return np.argmin(cost + lam * (1.0 - R), axis=1)


def route_cells(R: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """Cell label of each prompt when cells are the route-only decision itself: the stage
    ``route_decisions`` picks at ``lam`` (``"route:1"``), so a policy solved per cell can
    reproduce the continuous router and depart from it where calibration says so."""
    return np.array([f"route:{s}" for s in route_decisions(R, cost, lam)])


def cell_edges(R_cal: np.ndarray, stages: list[int], n_bins: int) -> list[np.ndarray]:
    """Inner quantile edges (on calibration prompts) of each chosen stage's R."""
    return [np.unique(np.quantile(R_cal[:, s], np.linspace(0, 1, n_bins + 1)[1:-1]))
            for s in stages]


def cell_labels(R: np.ndarray, stages: list[int], edges: list[np.ndarray]) -> np.ndarray:
    """Cell label of each prompt: the bin of each chosen stage's R, joined (``"1:2|2:0"``)."""
    parts = [np.searchsorted(e, R[:, s], side="right") for s, e in zip(stages, edges)]
    return np.array(["|".join(f"{s}:{b}" for s, b in zip(stages, row))
                     for row in np.stack(parts, 1)])


def router_cells(R_cal: np.ndarray, R: np.ndarray, stages: list[int], n_bins: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cell labels of calibration and other prompts: the quantile bin (edges from R_cal) of
    each chosen stage's R, joined (e.g. ``"1:2|2:0"``)."""
    edges = cell_edges(R_cal, stages, n_bins)
    return cell_labels(R_cal, stages, edges), cell_labels(R, stages, edges)


CELL_RULES = ("quantile", "route")


@dataclass
class CellRule:
    """How a prompt's router predictions ``R`` [N, L] pick its cell; stored in bundles.

    ``quantile``: the bin of each of ``stages``' R between ``edges`` (inner quantiles of the
    calibration prompts' R), joined as ``"1:2|2:0"``. ``route``: the stage the route-only rule
    picks at ``lam`` with mean stage costs ``cost`` (``"route:1"``)."""

    kind: str = "quantile"
    stages: tuple[int, ...] = ()
    edges: list[np.ndarray] = field(default_factory=list)
    lam: float | None = None
    cost: np.ndarray | None = None

    @classmethod
    def quantile(cls, R_cal: np.ndarray, stages: tuple[int, ...], bins: int) -> CellRule:
        return cls("quantile", tuple(stages), cell_edges(R_cal, list(stages), bins))

    def labels(self, R: np.ndarray) -> np.ndarray:
        if self.kind == "route":
            return route_cells(R, np.asarray(self.cost), float(self.lam))
        return cell_labels(R, list(self.stages), self.edges)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": self.kind, "stages": list(self.stages),
                             "edges": [e.tolist() for e in self.edges]}
        if self.kind == "route":
            d.update({"lambda": self.lam, "stage_cost": np.asarray(self.cost).tolist()})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellRule:
        kind = d.get("rule", "quantile")  # bundles before route cells carry quantile edges
        if kind not in CELL_RULES:
            raise ValueError(f"unknown cell rule {kind!r}; known: {CELL_RULES}")
        route = kind == "route"
        return cls(kind, tuple(int(s) for s in d.get("stages", ())),
                   [np.asarray(e, dtype=np.float64) for e in d.get("edges", ())],
                   float(d["lambda"]) if route else None,
                   np.asarray(d["stage_cost"], dtype=np.float64) if route else None)
