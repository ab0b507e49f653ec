"""``python cli.py test --method <cascade|always-top|...>``: replay evaluation as a test loop.

The DataModule yields prompt indices (sharded over ranks by the Trainer's sampler); the module
emits one row per prompt for its method; on epoch end every rank's rows are gathered, sorted by
id and de-duplicated, and rank 0 computes every metric once and writes results.json,
examples.jsonl, plots and TensorBoard entries into the run directory. The decisions themselves
come from ``replay.py`` (the same code the live runner uses to decide).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from toolkit.cascade import replay
from toolkit.evaluation.results import collect_rows, metric, paired_difference, write_results

FIXED = ("always-top", "always-first", "fixed-2stage", "oracle", "oracle-route")
METHODS = (*FIXED, "random", "threshold", "cascade")


class PromptIndexDataModule(LightningDataModule):
    """Indices of the fully labelled prompts (map-style: the Trainer shards it over ranks)."""

    def __init__(self, data_dir: str = "data/cascade", num_stages: int = 3,
                 batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def test_dataloader(self) -> DataLoader:
        n = len(replay.load_prompt_table(self.hparams.data_dir,
                                         num_stages=self.hparams.num_stages).ids)
        return DataLoader(list(range(n)), batch_size=self.hparams.batch_size)


class CascadeReplayEval(LightningModule):
    """Replay one cascade method on the labelled records (see ``replay.py``).

    Args:
        method: one of always-top, always-first, fixed-2stage, oracle, oracle-route, random,
            threshold, cascade.
        data_dir: labelled records (``cli.py label``).
        lam: λ, the price of a wrong answer in top-stage-call units (cascade, threshold).
        sweep: λ values for the quality–cost curve.
        folds: cross-validation folds over prompts.
        n_bins: bins of each stage's score in the stopping policy's history.
        risk_prior: (α0, β0) Beta prior of the risk adjustment, or null for none.
        schema: predictor feature schema.
        num_stages: stages of the cascade.
        seed: seed of predictor training and of ``random``.
        random_seeds: seeds averaged for ``random``.
    """

    def __init__(self, method: str = "cascade", data_dir: str = "data/cascade", lam: float = 1.0,
                 sweep: list[float] | None = None,
                 folds: int = 5, n_bins: int = 3, risk_prior: list[float] | None = None,
                 schema: str = "topk", num_stages: int = 3, seed: int = 0,
                 random_seeds: int = 3) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown cascade method {method!r}; choose from {METHODS}")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.save_hyperparameters()
        self.sweep = sweep or [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0]
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------ decisions
    def on_test_start(self) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        self.table = t = replay.load_prompt_table(hp.data_dir, hp.schema, hp.num_stages)
        self.cv = None
        prior = tuple(hp.risk_prior) if hp.risk_prior else None
        self.decisions: dict[str, tuple[np.ndarray, np.ndarray]] = {
            m: replay.fixed_method(m, t) for m in FIXED}
        if hp.method in ("cascade", "threshold", "random"):
            self.cv = replay.cv_scores(t, hp.folds, hp.seed)
            cv = replay.cross_validated(t, self.cv, hp.lam, hp.n_bins, prior)
            self.decisions["cascade"] = (cv["cascade_stage"], cv["cascade_cost"])
            self.decisions["threshold"] = (cv["threshold_stage"], cv["threshold_cost"])
            self.curve = [self._point(lam, prior) for lam in self.sweep]
        target = float(self.decisions.get("cascade", self.decisions["fixed-2stage"])[1].mean())
        self.random_runs = [replay.random_escalation(t, target, hp.seed + s)
                            for s in range(hp.random_seeds)]
        self.decisions["random"] = self.random_runs[0]
        self.fit_s = time.perf_counter() - t0

    def _point(self, lam: float, prior: Any) -> dict[str, float]:
        t = self.table
        cv = replay.cross_validated(t, self.cv, lam, self.hparams.n_bins, prior)
        n = np.arange(len(t.ids))
        return {"lambda": lam,
                "cascade_cost": float(cv["cascade_cost"].mean()),
                "cascade_accuracy": float(t.Y[n, cv["cascade_stage"]].mean()),
                "threshold_cost": float(cv["threshold_cost"].mean()),
                "threshold_accuracy": float(t.Y[n, cv["threshold_stage"]].mean())}

    def test_step(self, batch: torch.Tensor, _: int) -> None:
        t = self.table
        stage, cost = self.decisions[self.hparams.method]
        for i in batch.tolist():
            s = int(stage[i])
            self.rows.append({"id": str(t.ids[i]), "task": str(t.tasks[i]), "stage": s,
                              "cost": float(cost[i]), "correct": float(t.Y[i, s]),
                              "agreement": float(t.A[i, s] if s < t.num_stages - 1 else 1.0)})

    # -------------------------------------------------------------- results
    def on_test_epoch_end(self) -> None:
        rows_sorted = collect_rows(self.rows, self.trainer.global_rank)
        self.rows = []
        if rows_sorted is None:
            return
        metrics = self._metrics(rows_sorted)
        run_dir = Path(self.trainer.log_dir or ".")
        extra = {"comparison": self._comparison(), "curve": getattr(self, "curve", None)}
        write_results(run_dir, self.hparams.method, metrics, rows_sorted,
                      dict(self.hparams), self.hparams.seed, self._models(),
                      {"name": str(self.hparams.data_dir), "split": "all (5-fold CV)"},
                      {"fit_s": self.fit_s}, extra)
        self._plots(run_dir, extra)
        for k, v in metrics.items():
            if isinstance(v, dict) and "value" in v:
                self.log(f"test/{self.hparams.method}/{k}", v["value"], rank_zero_only=True)
        print(f"results: {run_dir / 'results.json'}")

    def _metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        L = self.table.num_stages
        stages = np.array([r["stage"] for r in rows])
        costs = np.array([r["cost"] for r in rows])
        full = self.table.C.sum(1).mean()
        out = {"accuracy": metric([r["correct"] for r in rows]),
               "agreement_with_top": metric([r["agreement"] for r in rows]),
               "relative_cost": metric(costs),
               "cost_saving_seed": {"value": float(1 - costs.mean() / full), "n": len(rows)},
               "stage_distribution": [float((stages == k).mean()) for k in range(L)]}
        return out

    def _comparison(self) -> dict[str, Any]:
        t, n = self.table, np.arange(len(self.table.ids))
        out = {}
        for m, (stage, cost) in self.decisions.items():
            out[m] = {"accuracy": metric(t.Y[n, stage]), "relative_cost": metric(cost)}
        if len(self.random_runs) > 1:
            accs = [float(t.Y[n, s].mean()) for s, _ in self.random_runs]
            out["random"]["accuracy_over_seeds"] = accs
        if "cascade" in self.decisions:
            for other in ("random", "threshold", "always-top"):
                out[f"cascade_minus_{other}_accuracy"] = paired_difference(
                    t.Y[n, self.decisions["cascade"][0]], t.Y[n, self.decisions[other][0]])
        return out

    def _models(self) -> list[dict[str, Any]]:
        from toolkit.cascade.records_datamodule import record_files
        from toolkit.common.io import read_jsonl

        seen = {}
        for path in record_files(self.hparams.data_dir):
            r = next(iter(read_jsonl(path)), None)
            if r:
                seen[r["stage"]] = {"stage": r["stage"], "slug": r["model"],
                                    "sha256": r["model_sha256"], "quantisation": r["quantisation"]}
        return [seen[k] for k in sorted(seen)]

    def _plots(self, run_dir: Path, extra: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        if extra["curve"]:
            c = extra["curve"]
            ax.plot([p["cascade_cost"] for p in c], [p["cascade_accuracy"] for p in c], "o-",
                    label="cascade (λ sweep)")
            ax.plot([p["threshold_cost"] for p in c], [p["threshold_accuracy"] for p in c],
                    "s--", label="threshold (λ sweep)")
        for m, v in extra["comparison"].items():
            if m in METHODS and m not in ("cascade", "threshold"):
                ax.plot(v["relative_cost"]["value"], v["accuracy"]["value"], "k^")
                ax.annotate(m, (v["relative_cost"]["value"], v["accuracy"]["value"]), fontsize=7)
        ax.set_xlabel("relative cost (always-top = 1)")
        ax.set_ylabel("accuracy (ground truth)")
        ax.legend(fontsize=8)
        ax.set_title(f"quality vs cost, {len(self.table.ids)} prompts, 5-fold CV")
        fig.tight_layout()
        fig.savefig(run_dir / "plots" / "quality_vs_cost.png", dpi=120)
        for logger in self.trainer.loggers:
            if hasattr(logger.experiment, "add_figure"):
                logger.experiment.add_figure("test/quality_vs_cost", fig)
        plt.close(fig)


class CascadeReplayCallback(Callback):
    """During fit: after each validation epoch, replay the whole cascade on the val prompts.

    The current predictor scores every (prompt, stage); the stopping policy is fitted on the
    train-split prompts (their scores are in-sample, so this is optimistic about calibration:
    a watch dial, not the evaluation; ``test --method cascade`` cross-validates properly) and
    replayed on the val prompts. Logs ``val/cascade_accuracy``, ``val/cascade_relative_cost``
    and ``val/cascade_stage_<k>`` so the end-to-end effect is visible while training.

    Args:
        lam: λ of the stopping policy.
        data_dir: the labelled records (as the DataModule's).
    """

    def __init__(self, lam: float = 1.0, data_dir: str = "data/cascade") -> None:
        self.lam, self.data_dir = lam, data_dir
        self.table: replay.PromptTable | None = None

    def on_validation_epoch_end(self, trainer: Any, pl_module: LightningModule) -> None:
        from toolkit.cascade.stopping import evaluate, fit_policy
        from toolkit.common.splits import split_of

        if trainer.sanity_checking:
            return
        if self.table is None:
            self.table = replay.load_prompt_table(self.data_dir, pl_module.hparams.schema,
                                                  pl_module.hparams.num_stages)
            self.split = np.array([split_of(i) for i in self.table.ids])
        t = self.table
        n, L, F = t.X.shape
        with torch.no_grad():
            x = torch.from_numpy(t.X.reshape(n * L, F)).to(pl_module.device)
            P = pl_module(x)[:, 0].cpu().numpy().reshape(n, L)
        tr, va = self.split == "train", self.split == "val"
        if not tr.any() or not va.any():
            return
        policy = fit_policy(P[tr], t.Y[tr], t.C[tr], self.lam, groups=t.tasks[tr])
        ev = evaluate(policy, P[va], t.Y[va], t.C[va], t.tasks[va])
        pl_module.log("val/cascade_accuracy", float(ev["correct"].mean()))
        pl_module.log("val/cascade_relative_cost", float(ev["cost"].mean()))
        for k in range(L):
            pl_module.log(f"val/cascade_stage_{k}", float((ev["stage"] == k).mean()))
