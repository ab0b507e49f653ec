"""``python cli.py test --method qstar|qstar-fixed|qstar-entropy|base|teacher``.

Every method answers the same problems of a task with ground truth (default: the first 16
HumanEval problems, greedy, at most 256 new tokens) and is scored by the task's own scorer:

* ``qstar``: q* with α from ``kl_symmetry``; ``qstar-fixed``: fixed α; ``qstar-entropy``:
  α = H(π_θ)/(H(π_θ)+H(π_t));
* ``base``: π_θ alone; ``teacher``: π_t alone (the two ends q* interpolates between).

The DataModule yields problem indices (map-style, so the Trainer shards them over ranks); the
module generates for its share, keeps one row per problem, and on epoch end rank 0 gathers all
rows, sorts them by id and computes every metric once (results.json, examples.jsonl, a plot of
the per-token α and KL distributions, TensorBoard). Models load in ``on_test_start``, so
parsing a config (``--print_config``) never touches weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from toolkit.evaluation.harness import EvaluationModule, pyplot
from toolkit.evaluation.results import RunReport, metric
from toolkit.generation.base import DecodingConfig, GenerationRequest

METHODS = {"qstar": "kl_symmetry", "qstar-fixed": "fixed", "qstar-entropy": "entropy",
           "base": None, "teacher": None}
DIAG = ("alpha", "ess_ratio", "kl_theta", "kl_t")
CONDITIONS = ("meets_ess", "meets_kl", "meets_alpha")


class QStarTaskDataModule(LightningDataModule):
    """Indices of a task's problems; the task itself is shared with the module via ``task``.

    Args:
        task: humaneval, gsm_symbolic, or a local .jsonl/.json/.parquet file with ground truth.
        task_options: the task's own options (e.g. ``{seed: 42, size: 200}`` for gsm_symbolic).
        limit: the first N problems (null: all).
        batch_size: problems per batch, decoded together.
    """

    def __init__(self, task: str = "humaneval", task_options: dict[str, Any] | None = None,
                 limit: int | None = 16, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.task is None:
            from toolkit.tasks import build_task

            self.task = build_task(self.hparams.task, **(self.hparams.task_options or {}))
            self.examples = self.task.examples()[: self.hparams.limit]

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(list(range(len(self.examples))), batch_size=self.hparams.batch_size)


class QStarEval(EvaluationModule):
    """Generate with one method on the DataModule's task and score against ground truth.

    Args:
        method: qstar | qstar-fixed | qstar-entropy | base | teacher.
        model_theta: π_θ (zoo:<slug> or folder); ``base`` uses it alone.
        model_t: π_t, sharing π_θ's tokenizer; ``teacher`` uses it alone.
        fixed_alpha: α of ``qstar-fixed``.
        decoding: decoding settings (greedy by default; q* mixes after temperature scaling).
        dtype: weights dtype.
        device: cpu or cuda.
        seed: recorded in results.json (sampling seeds come from ``decoding.seed``).
        resume_dir: keep every scored row in ``<resume_dir>/<method>.rows.jsonl`` as soon as
            its batch is done, and skip the batches already there when run again (one
            process; the file's config fingerprint refuses a changed configuration). Lets a
            long comparison (``configs/qstar/compare.yaml``) run across sessions.
    """

    def __init__(self, method: str = "qstar",
                 model_theta: str = "zoo:qwen2.5-coder-0.5b-instruct",
                 model_t: str = "zoo:qwen2.5-coder-1.5b-instruct", fixed_alpha: float = 0.5,
                 decoding: DecodingConfig | None = None,
                 dtype: str = "float32", device: str = "cpu", seed: int = 0,
                 resume_dir: str | None = None) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown q* method {method!r}; choose from {', '.join(METHODS)}")
        self.save_hyperparameters()
        self.decoding = decoding or DecodingConfig(max_new_tokens=256)
        self.rows: list[dict[str, Any]] = []
        self.engine: Any = None
        self.store: Any = None
        self.stored: dict[str, dict[str, Any]] = {}

    def _open_store(self) -> None:
        from toolkit.common.io import JsonlAppender

        hp, dm = self.hparams, self.trainer.datamodule
        if self.trainer.world_size > 1:
            raise ValueError("resume_dir works in one process; drop it or use devices=1")
        config = {k: v for k, v in dict(hp).items() if k not in ("device", "resume_dir")}
        config.update(decoding=self.decoding.__dict__, data=dict(dm.hparams))
        self.store = JsonlAppender(Path(hp.resume_dir) / f"{hp.method}.rows.jsonl", "id",
                                   json.loads(json.dumps(config, default=str)))
        self.stored = {r["id"]: r for r in self.store.rows()}

    def on_test_start(self) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        if hp.resume_dir:
            self._open_store()
        if METHODS[hp.method] is not None:
            from toolkit.qstar.sampler import QStarSampler

            self.engine = QStarSampler(hp.model_theta, hp.model_t, METHODS[hp.method],
                                       hp.fixed_alpha, hp.dtype, hp.device)
            self.models = [{"role": "theta", **self.engine.theta.info.__dict__},
                           {"role": "t", **self.engine.t.info.__dict__}]
        else:
            from toolkit.generation.hf_backend import TransformersBackend

            name = hp.model_theta if hp.method == "base" else hp.model_t
            self.engine = TransformersBackend(name, dtype=hp.dtype, device=hp.device)
            self.models = [{"role": "theta" if hp.method == "base" else "t",
                            **self.engine.info.__dict__}]
        self.load_s = time.perf_counter() - t0

    def test_step(self, batch: torch.Tensor, _: int) -> None:
        dm = self.trainer.datamodule
        idx = batch.tolist()
        examples = [dm.examples[i] for i in idx]
        if examples and all(ex.id in self.stored for ex in examples):
            self.rows += [self.stored[ex.id] for ex in examples]  # done in an earlier run
            return
        reqs = [GenerationRequest(ex.prompt, seed=i) for i, ex in zip(idx, examples)]
        t0 = time.perf_counter()
        # One DataModule batch is one decoding batch (its batch_size sets both).
        outs = self.engine.generate(reqs, self.decoding, batch_size=len(reqs))
        wall = time.perf_counter() - t0
        scores = dm.task.score_many(examples, [o.text for o in outs])
        for ex, out, ok in zip(examples, outs, scores):
            row: dict[str, Any] = {
                "id": ex.id, "correct": None if ok is None else float(ok),
                "tokens": out.generated_tokens, "stop_reason": out.stop_reason,
                "wall": float(out.wall_s), "wall_share": wall / len(outs),
                "completion": out.text}
            for key in DIAG:
                arr = out.extra.get(key)
                row[f"{key}_mean"] = float(np.mean(arr)) if arr is not None and len(arr) \
                    else None
            for key in CONDITIONS:
                arr = out.extra.get(key)
                row[f"frac_{key}"] = float(np.mean(arr)) if arr is not None and len(arr) \
                    else None
            # Per-token values for the plot only (popped before examples.jsonl is written).
            row["_tokens"] = {k: np.asarray(out.extra[k], dtype=float).tolist()
                              for k in ("alpha", "kl_theta", "kl_t") if k in out.extra}
            self.rows.append(row)
        if self.store is not None:
            self.store.append(self.rows[-len(outs):])

    def build_report(self, rows: list[dict[str, Any]]) -> RunReport:
        # Per-token values feed the plot only; they stay out of examples.jsonl.
        self.per_token = [r.pop("_tokens") for r in rows]
        dm = self.trainer.datamodule
        config = {**dict(self.hparams), "decoding": self.decoding.__dict__,
                  "data": dict(dm.hparams)}
        return RunReport(self.hparams.method, self._metrics(rows), rows, config,
                         self.hparams.seed, self.models, {"name": dm.hparams.task,
                                                          "split": "test"},
                         {"load_s": self.load_s,
                          "generate_s": float(sum(r["wall_share"] for r in rows))})

    def _metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r["correct"] for r in rows if r["correct"] is not None]
        tokens = sum(r["tokens"] for r in rows)
        wall = sum(r["wall_share"] for r in rows)
        out: dict[str, Any] = {
            "accuracy": metric(scored),
            "tokens_per_s": {"value": tokens / wall if wall > 0 else float("nan"),
                             "n": len(rows)},
            "mean_new_tokens": metric([r["tokens"] for r in rows]),
            # answers stopped by max_new_tokens: a low limit scores as wrong answers
            "frac_cut": metric([float(r["stop_reason"] == "length") for r in rows])}
        for key in (*(f"{k}_mean" for k in DIAG), *(f"frac_{k}" for k in CONDITIONS)):
            values = [r[key] for r in rows if r[key] is not None]
            if values:  # base and teacher have no mixture diagnostics
                out[key] = metric(values)
        return out

    def figures(self, rows: list[dict[str, Any]], report: RunReport) -> dict[str, Any]:
        per_token = self.per_token
        values = {k: np.concatenate([p.get(k, []) for p in per_token] or [[]])
                  for k in ("alpha", "kl_theta", "kl_t")}
        if not len(values["alpha"]):
            return {}  # single-model methods: nothing mixed, nothing to plot
        plt = pyplot()
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.hist(values["alpha"], bins=40, range=(0, 1), color="tab:blue")
        a1.axvspan(0.2, 0.8, color="tab:green", alpha=0.1, label="seed: α in [0.2, 0.8]")
        a1.set_xlabel("α per token")
        a1.legend(fontsize=8)
        finite = {k: v[np.isfinite(v)] for k, v in values.items()}
        top = max(float(np.quantile(np.concatenate([finite["kl_theta"], finite["kl_t"]]), 0.99))
                  if len(finite["kl_theta"]) else 1.0, 1e-6)
        for k, label in (("kl_theta", "KL(q‖π_θ)"), ("kl_t", "KL(q‖π_t)")):
            a2.hist(finite[k], bins=40, range=(0, top), alpha=0.5, label=label)
        a2.set_xlabel("KL per token (nats)")
        a2.legend(fontsize=8)
        fig.suptitle(f"{self.hparams.method}: {len(values['alpha'])} tokens, "
                     f"{len(per_token)} problems")
        fig.tight_layout()
        return {"alpha_kl": fig}
