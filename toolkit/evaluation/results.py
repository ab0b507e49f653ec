"""The one results writer: ``results.json`` (versioned), ``examples.jsonl`` and run metadata.

Every ``test`` run of every method writes through here, so results are comparable across
systems. Metrics are ``{value, ci95, n}`` with a bootstrap 95% interval over examples;
comparisons between two methods on the same examples use a paired bootstrap. Rows from
several processes are gathered on rank 0 and sorted by example id before any metric is
computed, so 1-process and N-process runs write byte-identical results (timings aside, which
live in their own block).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.common.io import atomic_write_json, atomic_write_text, json_default

SCHEMA_VERSION = 1
PACKAGES = ("torch", "lightning", "transformers", "torchmetrics", "onnxruntime", "sacrebleu",
            "scikit-learn", "numpy")


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, seed: int = 0) -> list[float]:
    """Percentile 95% interval of ``stat`` over examples resampled with replacement."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = np.array([stat(x[i]) for i in idx]) if stat is not np.mean else x[idx].mean(1)
    return [float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))]


def metric(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    x = np.asarray(values, dtype=np.float64)
    return {"value": float(x.mean()) if len(x) else float("nan"),
            "ci95": bootstrap_ci(x, seed=seed), "n": int(len(x))}


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Mean of a − b over the same examples, with a paired bootstrap 95% interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return metric(d, seed)


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              check=False).stdout.strip()

    return {"sha": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def ids_hash(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


@dataclass
class RunReport:
    """What one evaluation run reports: everything ``results.json`` holds besides the
    provenance this module adds itself (git state, packages, threads, python)."""

    method: str
    metrics: dict[str, Any]
    examples: list[dict[str, Any]]  # one row per example, each with an ``id``
    config: dict[str, Any]
    seed: int
    models: list[dict[str, Any]]  # slug, sha256, quantisation of every model used
    data: dict[str, Any]  # name, split (``n`` and ``ids_hash`` are added here)
    timings: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific top-level blocks
    command: str | None = None  # the command line as typed (the CLI passes it in)


def write_results(run_dir: str | Path, report: RunReport) -> Path:
    """Write results.json and examples.jsonl (rows sorted by id) into ``run_dir``."""
    run_dir = Path(run_dir)
    repo = Path(__file__).resolve().parents[2]
    import torch

    rows = sorted(report.examples, key=lambda r: str(r["id"]))
    results = {
        "schema_version": SCHEMA_VERSION, "method": report.method, "git": git_state(repo),
        "command": report.command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": report.config, "seed": report.seed, "packages": package_versions(),
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "models": report.models,
        "data": {**report.data, "n": len(rows),
                 "ids_hash": ids_hash([str(r["id"]) for r in rows])},
        "metrics": report.metrics, "timings": report.timings, **report.extra,
    }
    atomic_write_text(run_dir / "examples.jsonl",
                      "".join(json.dumps(r, sort_keys=True, default=json_default) + "\n"
                              for r in rows))
    atomic_write_json(run_dir / "results.json",
                      json.loads(json.dumps(results, default=json_default)))
    return run_dir / "results.json"


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank (torch.distributed), or the rows as they are."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def collect_rows(rows: list[dict[str, Any]], trainer: Any
                 ) -> tuple[list[dict[str, Any]] | None, Path]:
    """Every rank's rows, de-duplicated by id (samplers may repeat an example to even out
    ranks) and sorted by id, on rank 0 (None on the other ranks), and the run directory.

    Every rank must call it: both the gather and ``Trainer.log_dir`` (a broadcast) are
    collective under DDP, and a rank that skips them hangs the others.
    """
    merged = {r["id"]: r for r in gather_rows(rows)}
    run_dir = Path(trainer.log_dir or ".")
    if trainer.global_rank != 0:
        return None, run_dir
    return [merged[k] for k in sorted(merged)], run_dir
