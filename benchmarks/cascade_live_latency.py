"""Live cascade latency at batch 1: real zoo models, the shipped ONNX predictor, one request at
a time (SPEC §D2: latency percentiles come from live runs at batch 1 only).

    python benchmarks/cascade_live_latency.py [--n 8] [--lam 4] [--threads 2]

The policy is fitted on all labelled records scored by the shipped predictor
(``replay.policy_from_records``, entry decision per task), then ``LiveCascade`` runs the
test-split prompts one by one with the records' own decoding settings, so each request pays
for exactly the stages the policy runs. Prints p50/p95/p99 latency, the stages reached and
whether each live decision equals the replayed decision on that prompt's records. The policy
has seen these prompts' records (in-sample): this measures latency, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.cascade import replay
from toolkit.cascade.features import record_features
from toolkit.cascade.live import LiveCascade
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.prompt_table import record_files
from toolkit.common.io import atomic_write_text, read_jsonl
from toolkit.generation.base import DecodingConfig
from toolkit.generation.hf_backend import TransformersBackend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data/cascade")
    ap.add_argument("--predictor", default="checkpoints/cascade/predictor/predictor.onnx")
    ap.add_argument("--lam", type=float, default=4.0)
    ap.add_argument("--n", type=int, default=8, help="test-split prompts, alternating tasks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/benchmarks/cascade_live_latency.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    predictor = OnnxQualityPredictor(args.predictor)
    policy = replay.policy_from_records(args.data_dir, predictor, args.lam)
    by_stage: dict[int, dict[str, dict]] = {}
    for path in record_files(args.data_dir):
        for r in read_jsonl(path):
            by_stage.setdefault(int(r["stage"]), {})[r["id"]] = r
    top = by_stage[max(by_stage)]
    tasks = sorted({r["task"] for r in top.values()})
    test = {t: sorted(i for i, r in top.items() if r["split"] == "test" and r["task"] == t)
            for t in tasks}
    ids = [i for pair in zip(*test.values()) for i in pair][:args.n]
    rec0 = top[ids[0]]
    decoding = DecodingConfig(**rec0["decoding"])
    backends = [TransformersBackend(f"zoo:{by_stage[k][ids[0]]['model']}")
                for k in sorted(by_stage)]
    live = LiveCascade(backends, predictor, policy, decoding, batch_size=1)

    rows = []
    for i in ids:
        task = top[i]["task"]
        t0 = time.perf_counter()
        res = live.run([top[i]["prompt"]], [task])[0]
        wall = time.perf_counter() - t0
        feats = np.stack([record_features(by_stage[k][i], predictor.schema)
                          for k in sorted(by_stage)])
        p = predictor.predict(feats, predictor.schema)[:, 0]
        replayed, _ = policy.run(p, task)
        rows.append({"id": i, "task": task, "latency_s": wall, "stage": res.stopped_at_stage,
                     "replay_stage": int(replayed),
                     "stages_run": [t.stage for t in res.trace]})
        print(json.dumps(rows[-1]), flush=True)
    lat = np.array([r["latency_s"] for r in rows])
    summary = {f"p{q}_s": float(np.quantile(lat, q / 100)) for q in (50, 95, 99)}
    summary.update(n=len(rows), lam=args.lam, threads=args.threads,
                   stages=[sum(r["stage"] == k for r in rows) for k in sorted(by_stage)],
                   live_equals_replay=sum(r["stage"] == r["replay_stage"] for r in rows))
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
