"""Quality-predictor latency: ONNX runtime against torch eager, side by side in one run.

    python benchmarks/predictor_latency.py [--ckpt runs/fit/fit/<time>/checkpoints/last.ckpt]

Without --ckpt, the newest run under runs/fit is used (make one with `python cli.py fit`).
Batch-1 calls are timed one by one (p50, p99 over --calls calls, 1 thread, after warm-up),
alternating blocks of ONNX and torch so that machine noise hits both alike; rows/s at batch
1024. Goal (issue 3): ONNX p50 ≤ 20 µs and p99 ≤ 50 µs here; the seed's budget is 300 µs.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np
import torch

from toolkit.cascade.onnx_export import export_onnx
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.predictor_module import QualityPredictor


def _times(fn, x, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn(x)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--calls", type=int, default=5000)
    a = ap.parse_args()
    ckpt = a.ckpt or max(glob.glob("runs/fit/*/*/checkpoints/last.ckpt"), key=os.path.getmtime)
    torch.set_num_threads(1)
    module = QualityPredictor.load_from_checkpoint(ckpt).eval()
    onnx_path = export_onnx(module, os.path.join(os.path.dirname(ckpt), "bench.onnx"))
    rt = OnnxQualityPredictor(onnx_path, threads=1)
    x1 = np.random.default_rng(0).normal(size=(1, module.schema.dim)).astype(np.float32)
    t1 = torch.from_numpy(x1)

    def run_onnx(x):
        return rt.session.run(None, {rt.input_name: x})

    def run_torch(x):
        with torch.inference_mode():
            return module(x)

    for _ in range(500):
        run_onnx(x1)
        run_torch(t1)
    onnx_t, torch_t = [], []
    for _ in range(10):  # alternate blocks
        onnx_t += _times(run_onnx, x1, a.calls // 10)
        torch_t += _times(run_torch, t1, a.calls // 10)
    xb = np.random.default_rng(1).normal(size=(1024, module.schema.dim)).astype(np.float32)
    tb = torch.from_numpy(xb)
    rows = {}
    for name, fn, x in (("onnx", run_onnx, xb), ("torch", run_torch, tb)):
        t = min(_times(fn, x, 50)) / 1e6
        rows[name] = 1024 / t
    print(f"checkpoint {ckpt} ({module.schema.id}, {module.schema.dim} features), 1 thread")
    print(f"{'runtime':8} {'p50 µs':>8} {'p99 µs':>8} {'rows/s @1024':>14}")
    for name, t in (("onnx", onnx_t), ("torch", torch_t)):
        t = np.sort(t)
        print(f"{name:8} {np.median(t):8.1f} {t[int(0.99 * len(t))]:8.1f} {rows[name]:14,.0f}")
    print(f"torch / onnx p50 ratio: {np.median(torch_t) / np.median(onnx_t):.1f}x")


if __name__ == "__main__":
    main()
