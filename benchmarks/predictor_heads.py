"""Out-of-fold AUROC of the predictor's heads on the shipped records, per stage and setting.

    python benchmarks/predictor_heads.py [--seeds 0 1 2] \
        [--settings "router_l2=0.3" "router_l2=0.1" "draft_reads_prompt=False"]

For each setting (``QualityPredictor`` keyword arguments, comma-separated ``k=v``) and seed:
the predictor with router heads is trained on 4 of 5 prompt folds (``replay.fit_predictor``,
the trainer behind replay and bundles) and scores the held-out fold; printed are the AUROC of
its router heads (prompt only) and of its post-draft heads (draft + prompt), per stage and
pooled, next to two references on the same folds: the draft-only predictor (``topk-v1``
features) and a logistic-regression router on the same embeddings (``routing.py``). The
embeddings are the committed sidecar of ``data/cascade``; nothing needs a zoo model.
"""

from __future__ import annotations

import argparse
import ast

import numpy as np
from sklearn.metrics import roc_auc_score

from toolkit.cascade import routing
from toolkit.cascade.prompt_embeddings import load_sidecar
from toolkit.cascade.prompt_table import load_prompt_table
from toolkit.cascade.replay import fit_predictor, fold_of, predictor_scores


def _auc(Y: np.ndarray, P: np.ndarray) -> str:
    per = [roc_auc_score(Y[:, s], P[:, s]) for s in range(Y.shape[1])]
    pooled = roc_auc_score(Y.ravel(), P.ravel())
    return " / ".join(f"{a:.3f}" for a in per) + f"  (pooled {pooled:.3f})"


def _setting(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=", 1)
        out[k.strip()] = ast.literal_eval(v.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data/cascade")
    ap.add_argument("--embedding_model", default="smollm2-135m-instruct")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["router_l2=0.3"])
    a = ap.parse_args()
    t = load_prompt_table(a.data_dir, "topk", 3)
    E, _, _ = load_sidecar(a.data_dir, t.ids, a.embedding_model)
    N, L, _ = t.features.shape
    fold = np.array([fold_of(i, a.folds) for i in t.ids])
    print(f"{N} prompts, {a.folds} folds; AUROC per stage (0 / 1 / 2)")
    print(f"logistic router on the embeddings: "
          f"{_auc(t.correct, routing.out_of_fold('logistic', E, t.correct, fold))}")
    for text in ["draft-only", *a.settings]:
        for seed in a.seeds:
            P, R = np.zeros((N, L)), np.zeros((N, L))
            heads = text != "draft-only"
            for f in range(a.folds):
                tr, te = fold != f, fold == f
                m = fit_predictor(t, tr, seed, embeddings=E if heads else None,
                                  **(_setting(text) if heads else {}))
                P[te], r = predictor_scores(m, t, te, E if heads else None)
                if heads:
                    R[te] = r
            print(f"[{text}] seed {seed}: post-draft {_auc(t.correct, P)}"
                  + ("" if text == "draft-only" else f"; router {_auc(t.correct, R)}"),
                  flush=True)


if __name__ == "__main__":
    main()
