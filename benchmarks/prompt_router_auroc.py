"""How well the prompt embeddings predict each stage's correctness before any draft.

    python benchmarks/prompt_router_auroc.py [--data_dir data/cascade]
        [--model_slug smollm2-135m-instruct] [--C 0.1]

Reads the labelled records (``load_prompt_table``) and the embedding sidecar that
``python cli.py embed`` writes beside them, then fits, per stage, a logistic regression
(standardised embeddings, L2 strength ``1/C``) on 4 folds and scores the 5th, folds by
``replay.fold_of(id, 5)`` as every replay evaluation. Prints the out-of-fold AUROC per stage,
next to the same regression on task identity alone (one-hot), and the embedding forward's cost
relative to the mean top-stage call (what a router charges per prompt).
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from toolkit.cascade.prompt_embeddings import load_sidecar
from toolkit.cascade.prompt_table import load_prompt_table
from toolkit.cascade.replay import fold_of

FOLDS = 5


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, c: float) -> np.ndarray:
    """P(correct) of every prompt from a regression fitted on the other folds."""
    p = np.full(len(y), np.nan)
    for f in range(FOLDS):
        test = folds == f
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        model.fit(x[~test], y[~test])
        p[test] = model.predict_proba(x[test])[:, 1]
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="data/cascade")
    ap.add_argument("--model_slug", default="smollm2-135m-instruct")
    ap.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    args = ap.parse_args()

    t = load_prompt_table(args.data_dir, None)
    emb, flops, meta = load_sidecar(args.data_dir, t.ids, args.model_slug)
    folds = np.array([fold_of(i, FOLDS) for i in t.ids])
    tasks = (t.tasks[:, None] == np.unique(t.tasks)[None, :]).astype(np.float64)
    print(f"{len(t.ids)} prompts; embeddings {meta['slug']} layers {meta['layers']} "
          f"(dim {meta['dim']}); {FOLDS}-fold out-of-fold logistic regression (C={args.C})")
    print(f"embedding forward: mean {flops.mean():.3g} FLOPs = "
          f"{flops.mean() / t.flops[:, -1].mean():.4f} of the mean top-stage call")
    print("| stage | accuracy | AUROC embeddings | AUROC task only |")
    print("|---|---|---|---|")
    for s in range(t.num_stages):
        y = t.correct[:, s]
        auc = roc_auc_score(y, out_of_fold(emb, y, folds, args.C))
        base = roc_auc_score(y, out_of_fold(tasks, y, folds, args.C))
        print(f"| {s} | {y.mean():.3f} | {auc:.3f} | {base:.3f} |")


if __name__ == "__main__":
    main()
