"""How well each feature schema predicts a stage's correctness after its draft, out of fold.

    python benchmarks/probe_auroc.py [--data_dir data/cascade] [--stages 0 1 2] [--C 0.1]
        [--task humaneval [gsm_symbolic ...]]

Per stage, over every labelled record of that stage with a ground-truth score: a logistic
regression (standardised features, L2 strength ``1/C``; ``prompt_router_auroc.out_of_fold``)
fitted on 4 folds scores the 5th, folds by ``replay.fold_of(id, 5)`` as every replay
evaluation (``--task``: only these tasks' records, fitted and scored within them; one task
alone is where task identity cannot help). Three inputs: ``topk-v1`` (the record's log-prob
statistics), ``probe-v1`` (the stage model's pooled hidden states over its answer, from the sidecar
``python cli.py probe`` writes) and both concatenated. A stage without a probe sidecar, or
with a stale or incomplete one, is printed as missing with the reason, never dropped
silently. Each gain over ``topk-v1`` comes with a paired bootstrap 95% interval over records
(the same out-of-fold scores resampled; resamples with one class only are dropped); the last
column is the probe forward's mean cost relative to the stage's own mean call.
"""

from __future__ import annotations

import argparse

import numpy as np
from prompt_router_auroc import FOLDS, out_of_fold  # this script's folder is on sys.path
from sklearn.metrics import roc_auc_score

from toolkit.cascade.features import build_schema, record_features
from toolkit.cascade.probe_features import PROBE_SCHEMA, load_probe, stage_rows
from toolkit.cascade.prompt_table import record_files
from toolkit.cascade.replay import fold_of
from toolkit.common.errors import UserError

N_BOOT = 2000


def gain(y: np.ndarray, p: np.ndarray, base: np.ndarray, seed: int = 0) -> str:
    """AUROC(p) − AUROC(base) on the same records, with a paired bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(N_BOOT):
        b = rng.integers(0, len(y), len(y))
        if 0 < y[b].mean() < 1:
            diffs.append(roc_auc_score(y[b], p[b]) - roc_auc_score(y[b], base[b]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return f"{roc_auc_score(y, p) - roc_auc_score(y, base):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="data/cascade")
    ap.add_argument("--stages", type=int, nargs="*", default=None,
                    help="stages to report (default: every labelled stage)")
    ap.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    ap.add_argument("--task", nargs="+", default=None,
                    help="only these tasks' records (default: all)")
    args = ap.parse_args()

    labelled = sorted({int(p.name[5:].split("-", 1)[0]) for p in record_files(args.data_dir)})
    schema = build_schema("topk", max(labelled) + 1)
    where = args.data_dir + (f" (tasks {', '.join(args.task)})" if args.task else "")
    print(f"{where}: {FOLDS}-fold out-of-fold logistic regression (standardised, C={args.C}), "
          "folds by prompt id")
    print(f"| stage | model | n (correct) | AUROC {schema.id} | AUROC {PROBE_SCHEMA} | AUROC both "
          "| probe − topk [95% CI] | both − topk [95% CI] | probe layers (dim) "
          "| probe FLOPs / stage call |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in args.stages if args.stages is not None else labelled:
        rows = [r for r in stage_rows(args.data_dir, k) if r["correct"] is not None
                and (not args.task or r["task"] in args.task)]
        ids = [r["id"] for r in rows]
        y = np.array([float(r["correct"]) for r in rows])
        folds = np.array([fold_of(i, FOLDS) for i in ids])
        if not 0 < y.mean() < 1:
            print(f"| {k} | {rows[0]['model'] if rows else ''} | {len(rows)} ({int(y.sum())}) "
                  "| one class only: no AUROC | | | | | | |")
            continue
        topk = np.stack([record_features(r, schema) for r in rows]).astype(np.float64)
        p_topk = out_of_fold(topk, y, folds, args.C)
        head = (f"| {k} | {rows[0]['model']} | {len(rows)} ({int(y.sum())}) | "
                f"{roc_auc_score(y, p_topk):.3f} |")
        try:
            probe, flops, meta = load_probe(args.data_dir, k, ids,
                                            sha256=rows[0].get("model_sha256"))
        except UserError as e:
            print(f"{head} missing | missing | | | ({e}) | |")
            continue
        p_probe = out_of_fold(probe, y, folds, args.C)
        p_both = out_of_fold(np.concatenate([topk, probe], 1), y, folds, args.C)
        ratio = flops.mean() / np.mean([r["cost_flops"] for r in rows])
        print(f"{head} {roc_auc_score(y, p_probe):.3f} | {roc_auc_score(y, p_both):.3f} | "
              f"{gain(y, p_probe, p_topk)} | {gain(y, p_both, p_topk)} | "
              f"{meta['layers']} ({meta['dim']}) | {ratio:.2f} |")


if __name__ == "__main__":
    main()
