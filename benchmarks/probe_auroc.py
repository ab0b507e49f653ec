"""How well each feature schema predicts a stage's correctness after its draft, out of fold.

    python benchmarks/probe_auroc.py [--data_dir data/cascade] [--stages 0 1 2] [--C 0.1]

Per stage, over every labelled record of that stage with a ground-truth score: a logistic
regression (standardised features, L2 strength ``1/C``; ``prompt_router_auroc.out_of_fold``)
fitted on 4 folds scores the 5th, folds by ``replay.fold_of(id, 5)`` as every replay
evaluation. Three inputs: ``topk-v1`` (the record's log-prob statistics), ``probe-v1`` (the
stage model's pooled hidden states over its answer, from the sidecar ``python cli.py probe``
writes) and both concatenated. A stage without a probe sidecar, or with a stale or incomplete
one, is printed as missing with the reason, never dropped silently. Also prints the probe
forward's mean cost relative to the stage's own mean call.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="data/cascade")
    ap.add_argument("--stages", type=int, nargs="*", default=None,
                    help="stages to report (default: every labelled stage)")
    ap.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    args = ap.parse_args()

    labelled = sorted({int(p.name[5:].split("-", 1)[0]) for p in record_files(args.data_dir)})
    schema = build_schema("topk", max(labelled) + 1)
    print(f"{args.data_dir}: {FOLDS}-fold out-of-fold logistic regression (standardised, "
          f"C={args.C}), folds by prompt id")
    print(f"| stage | model | n | accuracy | AUROC {schema.id} | AUROC {PROBE_SCHEMA} | "
          "AUROC both | probe layers (dim) | probe FLOPs / stage call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in args.stages if args.stages is not None else labelled:
        rows = [r for r in stage_rows(args.data_dir, k) if r["correct"] is not None]
        ids = [r["id"] for r in rows]
        y = np.array([float(r["correct"]) for r in rows])
        folds = np.array([fold_of(i, FOLDS) for i in ids])
        topk = np.stack([record_features(r, schema) for r in rows]).astype(np.float64)
        auc_topk = roc_auc_score(y, out_of_fold(topk, y, folds, args.C))
        head = f"| {k} | {rows[0]['model']} | {len(rows)} | {y.mean():.3f} | {auc_topk:.3f} |"
        try:
            probe, flops, meta = load_probe(args.data_dir, k, ids,
                                            sha256=rows[0].get("model_sha256"))
        except UserError as e:
            print(f"{head} missing | missing | ({e}) | |")
            continue
        auc_probe = roc_auc_score(y, out_of_fold(probe, y, folds, args.C))
        both = np.concatenate([topk, probe], 1)
        auc_both = roc_auc_score(y, out_of_fold(both, y, folds, args.C))
        ratio = flops.mean() / np.mean([r["cost_flops"] for r in rows])
        print(f"{head} {auc_probe:.3f} | {auc_both:.3f} | {meta['layers']} ({meta['dim']}) | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
