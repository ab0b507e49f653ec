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
* **cascade routing** (``router_cells`` + ``stopping.fit_policy``): the router's predictions
  put each prompt in a cell (quantile bins of chosen stages' R); the stopping policy is solved
  exactly per cell on calibration data, so the entry stage and every post-draft decision are
  chosen per prompt from what the router saw. ``escalate=False`` in ``fit_policy`` turns the
  same solver into a binned route-only policy; cells by task give today's cascade.
"""

from __future__ import annotations

import numpy as np

ROUTERS = ("logistic", "knn", "mf")


def _standardise(X_train: np.ndarray, X: np.ndarray) -> np.ndarray:
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    return (X - mean) / std


def fit_predict(kind: str, X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray,
                seed: int = 0, k: int = 20, rank: int = 16, steps: int = 400) -> np.ndarray:
    """Fit a router on (X_train [N, D], Y_train [N, L] 0/1) and predict R [M, L] for X_test."""
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        Xs, Xt = _standardise(X_train, X_train), _standardise(X_train, X_test)
        R = np.empty((len(X_test), Y_train.shape[1]))
        for s in range(Y_train.shape[1]):
            y = Y_train[:, s]
            if y.min() == y.max():  # a stage always (or never) right on these prompts
                R[:, s] = y[0]
                continue
            # C=0.05: hidden states are ~1,000 wide and prompts a few hundred; strong L2.
            clf = LogisticRegression(C=0.05, max_iter=2000, random_state=seed).fit(Xs, y)
            R[:, s] = clf.predict_proba(Xt)[:, 1]
        return R
    if kind == "knn":
        def unit(a: np.ndarray) -> np.ndarray:
            a = a - X_train.mean(0)
            return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)

        sim = unit(X_test) @ unit(X_train).T  # [M, N] cosine similarity
        k = min(k, len(X_train))
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        return Y_train[nearest].mean(1)
    if kind == "mf":
        return _matrix_factorisation(X_train, Y_train, X_test, seed, rank, steps)
    raise ValueError(f"unknown router {kind!r}; choose from {ROUTERS}")


def _matrix_factorisation(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray,
                          seed: int, rank: int, steps: int) -> np.ndarray:
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
            xt = torch.from_numpy(_standardise(X_train, X_test).astype(np.float32))
            with torch.no_grad():
                return torch.sigmoid((xt @ W) @ V.T + b).numpy().astype(np.float64)
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


def router_cells(R_cal: np.ndarray, R: np.ndarray, stages: list[int], n_bins: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cell labels of calibration and other prompts: the quantile bin (edges from R_cal) of
    each chosen stage's R, joined (e.g. ``"1:2|2:0"``)."""
    def cells(M: np.ndarray) -> np.ndarray:
        parts = []
        for s in stages:
            edges = np.unique(np.quantile(R_cal[:, s], np.linspace(0, 1, n_bins + 1)[1:-1]))
            parts.append(np.searchsorted(edges, M[:, s], side="right"))
        return np.array(["|".join(f"{s}:{b}" for s, b in zip(stages, row))
                         for row in np.stack(parts, 1)])

    return cells(R_cal), cells(R)
