"""The seed's cascade ablations on the shipped records, all in one run (replay, 5-fold CV).

    python benchmarks/cascade_ablations.py [--budgets 0.3 0.5 0.7] [--out runs/benchmarks/...]

Feature sets (predictor schema): topk (default), full, no_entropy, no_logprobs, minimal, and
the seed's five features; risk adjustment (Beta prior on the stopping policy's accuracies):
off, Beta(1,1), Beta(2,2), on the default features. For each row: the out-of-fold AUROC of the
predictor (ground-truth correctness, all stages pooled) and the cascade's accuracy and mean
relative cost at each budget (λ tuned to the budget on the calibration folds only), exactly as
``python cli.py test --method cascade --model.schema S --model.risk_prior [a,b]`` computes
them. Prints a markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from toolkit.cascade import replay
from toolkit.cascade.prompt_table import PromptTable, load_prompt_table
from toolkit.common.io import atomic_write_text

SCHEMAS = ("topk", "full", "no_entropy", "no_logprobs", "minimal", "seed")
PRIORS = {"off": None, "Beta(1,1)": (1.0, 1.0), "Beta(2,2)": (2.0, 2.0)}


def row(t: PromptTable, cv: replay.CvScores, budgets: list[float],
        prior: tuple[float, float] | None) -> dict:
    n = np.arange(len(t.ids))
    out = {"auroc": float(roc_auc_score(t.correct.ravel(), cv.P_test.ravel()))}
    for b in budgets:
        d = replay.at_budget(t, cv, b, risk_prior=prior)
        out[str(b)] = {"accuracy": float(t.correct[n, d["cascade_stage"]].mean()),
                       "cost": float(d["cascade_cost"].mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data/cascade")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/benchmarks/cascade_ablations.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for schema in SCHEMAS:
        t = load_prompt_table(args.data_dir, schema)
        cv = replay.cv_scores(t, 5, args.seed)
        results[f"features={schema}"] = row(t, cv, args.budgets, None)
        if schema == "topk":
            for name, prior in PRIORS.items():
                if prior is not None:
                    results[f"risk={name}"] = row(t, cv, args.budgets, prior)
        print(f"{schema}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    head = "| ablation | AUROC | " + " | ".join(f"acc / cost @ {b}" for b in args.budgets)
    print(head + " |\n|---|---|" + "---|" * len(args.budgets))
    for name, r in results.items():
        cells = " | ".join(f"{r[str(b)]['accuracy']:.3f} / {r[str(b)]['cost']:.3f}"
                           for b in args.budgets)
        print(f"| {name} | {r['auroc']:.3f} | {cells} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"budgets": args.budgets, "rows": results}, indent=1))
    print(f"written {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
