"""``python cli.py test --method <cascade|always-top|...>``: replay evaluation as a test loop.

The DataModule yields prompt indices (sharded over ranks by the Trainer's sampler); the module
emits one row per prompt for its method; on epoch end every rank's rows are gathered, sorted by
id and de-duplicated, and rank 0 computes every metric once and writes results.json,
examples.jsonl, plots and TensorBoard entries into the run directory. The decisions themselves
come from ``replay.py`` (the same code the live runner uses to decide).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from toolkit.cascade import replay, route_replay, routing
from toolkit.cascade.features import CascadeInputError
from toolkit.cascade.prompt_table import count_prompts, load_prompt_table
from toolkit.evaluation.harness import EvaluationModule, pyplot
from toolkit.evaluation.results import RunReport, metric, paired_difference

FIXED = ("always-top", "always-first", "fixed-2stage", "oracle", "oracle-route")
METHODS = (*FIXED, "random", "threshold", "cascade", *route_replay.ROUTED)
LEARNED = ("cascade", "threshold", *route_replay.ROUTED)


class PromptIndexDataModule(LightningDataModule):
    """Indices of the fully labelled prompts (map-style: the Trainer shards it over ranks)."""

    def __init__(self, data_dir: str = "data/cascade", num_stages: int = 3,
                 batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def test_dataloader(self) -> DataLoader:
        n = count_prompts(self.hparams.data_dir, self.hparams.num_stages)
        return DataLoader(list(range(n)), batch_size=self.hparams.batch_size)


class CascadeReplayEval(EvaluationModule):
    """Replay one cascade method on the labelled records (see ``replay.py``).

    Args:
        method: one of always-top, always-first, fixed-2stage, oracle, oracle-route, random,
            threshold, cascade, route-only, cascade-routing, router-logistic, router-knn,
            router-mf (``route_replay.py``).
        data_dir: labelled records (``cli.py label``).
        lam: λ, the price of a wrong answer in top-stage-call units (cascade, threshold).
        sweep: λ values for the quality–cost curve (null: 0.1 … 50, finer where the curve
            bends on these records).
        budgets: mean-cost budgets (top-stage units) at which cascade, threshold and random
            are compared with paired bootstrap intervals; each learned method is tuned to the
            budget on its calibration folds only.
        budget_mixing: hold the cascade to each budget with a ``MixedPolicy`` (per prompt,
            between the two λ that bracket the budget), so it spends the budget instead of
            the largest deterministic cost under it.
        folds: cross-validation folds over prompts.
        n_bins: bins of each stage's score in the stopping policy's history.
        risk_prior: (α0, β0) Beta prior of the risk adjustment, or null for none.
        schema: predictor feature schema (topk, full, seed, no_entropy, no_logprobs, minimal).
        num_stages: stages of the cascade.
        seed: seed of predictor training and of ``random``.
        random_seeds: seeds averaged for ``random``.
        router: the router whose predictions put prompts in cells for route-only and
            cascade-routing: ``predictor`` (the predictor module's router heads; its
            post-draft heads then read the prompt embedding too, as ``fit`` trains it), or a
            peer on the embeddings: logistic, knn, mf.
        router_model: slug of the model whose prompt embeddings the routers read (the
            sidecar ``<data_dir>/prompt_embeddings/<slug>.npz``, ``python cli.py embed``).
        router_stages: stages whose predicted correctness defines a prompt's cell.
        router_bins: quantile bins of each of those predictions.
        router_cells: ``quantile`` (cells from ``router_stages`` × ``router_bins``) or
            ``route`` (a cell is the stage the route-only rule picks at the policy's λ).
        final_entry: a cell may answer with its entry stage and never escalate, so
            cascade-routing's policies include route-only's on the same cells.
        crossfit: with final_entry, judge a cell's "follow the pooled post-draft table" on
            calibration prompts that table was not solved on (this many parts); 0 = in-sample.
        peers: the learned methods compared at every budget, beside the run's own.
        leave_family_out: cross-validate by task family instead of by prompt: each family's
            prompts are decided by a predictor, router and policy fitted on the other families
            only (calibration folds inside those stay by prompt), and results.json gets
            ``leave_family_out``: per held-out family, the run's method against ``random``
            escalation at the same mean cost on that family, paired (at λ and each budget).
    """

    def __init__(self, method: str = "cascade", data_dir: str = "data/cascade", lam: float = 1.0,
                 sweep: list[float] | None = None, budgets: list[float] | None = None,
                 budget_mixing: bool = True, folds: int = 5, n_bins: int = 3,
                 risk_prior: list[float] | None = None,
                 schema: str = "topk", num_stages: int = 3, seed: int = 0,
                 random_seeds: int = 3, router: str = "logistic",
                 router_model: str = "smollm2-135m-instruct",
                 router_stages: list[int] | None = None, router_bins: int = 2,
                 router_cells: str = "route", final_entry: bool = True, crossfit: int = 0,
                 peers: list[str] | None = None, leave_family_out: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sweep = sweep or [0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10, 15, 20, 50]
        self.budgets = budgets or []
        self.peers = list(peers) if peers is not None else ["cascade", "threshold"]

    def setup(self, stage: str) -> None:
        # Checked here, not in __init__: jsonargparse would bury the message in its own.
        hp = self.hparams
        if hp.method not in METHODS:
            raise CascadeInputError(f"unknown cascade method {hp.method!r}; choose from {METHODS}")
        if hp.lam <= 0:
            raise CascadeInputError(f"lam must be > 0, got {hp.lam}")
        if self.budgets and min(self.budgets) <= 0:
            raise CascadeInputError(f"budgets must be > 0, got {self.budgets}")
        if hp.router_cells not in routing.CELL_RULES:
            raise CascadeInputError(f"router_cells must be one of {routing.CELL_RULES}, got "
                                    f"{hp.router_cells!r}")
        if hp.router not in ("predictor", *routing.ROUTERS):
            raise CascadeInputError(f"unknown router {hp.router!r}; choose from "
                                    f"{('predictor', *routing.ROUTERS)}")
        bad = [p for p in self.peers if p not in LEARNED]
        if bad:
            raise CascadeInputError(f"peers must be learned methods {LEARNED}, got {bad}")

    # ------------------------------------------------------------ decisions
    def on_test_start(self) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        self.table = t = load_prompt_table(hp.data_dir, hp.schema, hp.num_stages)
        self.cv, self.curve, self.extra = None, None, {}
        prior = tuple(hp.risk_prior) if hp.risk_prior else None
        # method -> (answering stage, cost paid, recorded latency) per prompt
        self.decisions: dict[str, tuple[np.ndarray, ...]] = {}
        for m in FIXED:
            stage, ran = replay.fixed_method(m, t)
            self.decisions[m] = (stage, replay.charge(ran, t.cost), replay.charge(ran, t.wall_s))
        self.curves: dict[str, list[dict[str, float]]] = {}
        if hp.method in ("random", *LEARNED):
            self.cv = replay.cv_scores(t, hp.folds, hp.seed,
                                       progress=self.trainer.is_global_zero,
                                       by_family=hp.leave_family_out)
            cv = replay.cross_validated(t, self.cv, hp.lam, hp.n_bins, prior)
            self.decisions["cascade"] = (cv["cascade_stage"], cv["cascade_cost"],
                                         cv["cascade_latency"])
            self.decisions["threshold"] = (cv["threshold_stage"], cv["threshold_cost"],
                                           replay.paid(t.wall_s, cv["threshold_stage"]))
            self.curve = [self._point(lam, prior) for lam in self.sweep]
            for m in ("cascade", "threshold"):
                self.curves[m] = [{"lambda": p["lambda"], "cost": p[f"{m}_cost"],
                                   "accuracy": p[f"{m}_accuracy"]} for p in self.curve]
            self.budget_stages: dict[float, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
            self.extra["budgets"] = [self._budget(b, prior) for b in self.budgets]
            self.extra["predictor_auroc"] = replay.auroc_against_logistic(t, self.cv, hp.seed)
            routed = [m for m in dict.fromkeys([hp.method, *self.peers])
                      if m in route_replay.ROUTED]
            if routed:
                self._routing(routed)
        target = float(self.decisions.get("cascade", self.decisions["fixed-2stage"])[1].mean())
        self.random_runs = [replay.random_escalation(t, target, hp.seed + s)
                            for s in range(hp.random_seeds)]
        stage = self.random_runs[0]
        self.decisions["random"] = (stage, replay.paid(t.cost, stage),
                                    replay.paid(t.wall_s, stage))
        if hp.leave_family_out and hp.method in LEARNED:
            self.extra.setdefault("leave_family_out", {})["at_lambda"] = \
                self._families_vs_random(*self.decisions[hp.method][:2])
        self.fit_s = time.perf_counter() - t0

    def _families_vs_random(self, stage: np.ndarray, cost: np.ndarray) -> dict[str, Any]:
        """Per held-out family: the method's accuracy and cost, and its accuracy minus that of
        random escalation tuned to the method's mean cost on that family (``random_seeds``
        seeds averaged per prompt), paired over the family's prompts."""
        t, hp = self.table, self.hparams
        fam = np.array([replay.family_of(x) for x in t.tasks])
        out = {}
        for f in sorted(set(fam)):
            rows = np.flatnonzero(fam == f)
            sub = t.subset(rows)
            acc = self._accuracy(stage)[rows]
            target = float(cost[rows].mean())
            rand = np.mean([sub.correct[np.arange(len(rows)),
                                        replay.random_escalation(sub, target, hp.seed + k)]
                            for k in range(hp.random_seeds)], 0)
            out[f] = {"n": int(len(rows)), "accuracy": metric(acc),
                      "relative_cost": metric(cost[rows]),
                      "minus_random_at_matched_cost": paired_difference(acc, rand)}
        return out

    def _accuracy(self, stage: np.ndarray) -> np.ndarray:
        return self.table.correct[np.arange(len(stage)), stage]

    def _point(self, lam: float, prior: Any) -> dict[str, float]:
        cv = replay.cross_validated(self.table, self.cv, lam, self.hparams.n_bins, prior)
        return {"lambda": lam,
                "cascade_cost": float(cv["cascade_cost"].mean()),
                "cascade_accuracy": float(self._accuracy(cv["cascade_stage"]).mean()),
                "threshold_cost": float(cv["threshold_cost"].mean()),
                "threshold_accuracy": float(self._accuracy(cv["threshold_stage"]).mean())}

    def _budget(self, budget: float, prior: Any) -> dict[str, Any]:
        """Cascade vs threshold vs random, each held to ``budget`` (paired, same prompts)."""
        d = replay.at_budget(self.table, self.cv, budget, self.hparams.n_bins, prior,
                             self.hparams.seed, self.hparams.budget_mixing)
        self.budget_stages[budget] = {m: (d[f"{m}_stage"], d[f"{m}_cost"])
                                      for m in ("cascade", "threshold", "random")}
        acc = {m: self._accuracy(d[f"{m}_stage"]) for m in ("cascade", "threshold", "random")}
        out: dict[str, Any] = {"budget": budget, "lambdas": d["lambdas"],
                               "mix_q": d["mix_q"]}
        for m in acc:
            out[m] = {"accuracy": metric(acc[m]), "relative_cost": metric(d[f"{m}_cost"])}
        for other in ("threshold", "random"):
            out[f"cascade_minus_{other}_accuracy"] = paired_difference(acc["cascade"],
                                                                       acc[other])
        return out

    # ------------------------------------------------------------- routing
    def _routing(self, routed: list[str]) -> None:
        """Decisions, λ curves and budget comparisons of the methods that read the prompt
        first (``route_replay.py``), charged the router's forward."""
        from toolkit.cascade.prompt_embeddings import load_sidecar

        hp, t = self.hparams, self.table
        emb, flops, meta = load_sidecar(hp.data_dir, t.ids, hp.router_model)
        embed_cost = np.asarray(flops, dtype=np.float64) / t.flops[:, -1].mean()
        kinds = {m.removeprefix("router-") if m.startswith("router-") else hp.router
                 for m in routed}
        # The predictor with router heads reads the prompt: its own CV scores (post-draft p
        # and router R), used by the cell-based methods when router = predictor.
        self.cv_prompt = replay.cv_scores(t, hp.folds, hp.seed, embeddings=emb,
                                          progress=self.trainer.is_global_zero,
                                          by_family=hp.leave_family_out) \
            if "predictor" in kinds else None
        self.router_scores = {k: route_replay.router_scores(
            self.cv_prompt if k == "predictor" else self.cv, emb, t.correct, embed_cost, k,
            hp.seed) for k in sorted(kinds)}
        cfg = route_replay.RoutingConfig(tuple(hp.router_stages or (0, 1, 2)), hp.router_bins,
                                         hp.n_bins, cells=hp.router_cells,
                                         final_entry=hp.final_entry, crossfit=hp.crossfit)
        self.routing_cfg = cfg
        for m in routed:
            rs, cv = self._router_of(m), self._cv_of(m)
            stage, ran = route_replay.routed(m, t, cv, rs, hp.lam, cfg)
            self.decisions[m] = (stage, replay.charge(ran, t.cost) + rs.embed_cost,
                                 replay.charge(ran, t.wall_s))
            self.curves[m] = []
            for lam in self.sweep:
                s, r = route_replay.routed(m, t, cv, rs, lam, cfg)
                self.curves[m].append({
                    "lambda": lam, "cost": float((replay.charge(r, t.cost) + rs.embed_cost)
                                                 .mean()),
                    "accuracy": float(self._accuracy(s).mean())})
        budgets = []
        for b in self.budgets:
            stages = dict(self.budget_stages[b])
            lambdas = {}
            for m in routed:
                s, c, lams = route_replay.routed_at_budget(m, t, self._cv_of(m),
                                                           self._router_of(m), b, cfg)
                stages[m], lambdas[m] = (s, c), lams
            budgets.append(self._compare_at_budget(b, stages, lambdas))
        self.extra["routing"] = {
            "router": hp.router, "router_model": meta.get("slug", hp.router_model),
            "router_sha256": meta.get("sha256"), "cells": {
                "rule": cfg.cells, "stages": list(cfg.stages), "bins": cfg.bins,
                "final_entry": cfg.final_entry, "crossfit": cfg.crossfit},
            "embed_relative_cost": float(embed_cost.mean()),
            "router_auroc": {k: [float(roc_auc_score(t.correct[:, s], rs.R_test[:, s]))
                                 if 0 < t.correct[:, s].mean() < 1 else None
                                 for s in range(t.num_stages)]
                             for k, rs in self.router_scores.items()},
            "budgets": budgets}
        if self.cv_prompt is not None:  # post-draft heads that also read the prompt
            self.extra["routing"]["predictor_with_prompt_auroc"] = [
                float(roc_auc_score(t.correct[:, s], self.cv_prompt.P_test[:, s]))
                if 0 < t.correct[:, s].mean() < 1 else None for s in range(t.num_stages)]

    def _cv_of(self, method: str) -> replay.CvScores:
        """The predictor scores a routed method decides on: the prompt-reading predictor's
        when its router is the predictor's heads."""
        use = not method.startswith("router-") and self.hparams.router == "predictor"
        return self.cv_prompt if use else self.cv

    def _router_of(self, method: str) -> route_replay.RouterScores:
        kind = method.removeprefix("router-") if method.startswith("router-") else \
            self.hparams.router
        return self.router_scores[kind]

    def _compare_at_budget(self, budget: float, stages: dict[str, tuple[np.ndarray, ...]],
                           lambdas: dict[str, list[float]]) -> dict[str, Any]:
        """Every method held to ``budget``, and the focus method (the run's, or
        cascade-routing) minus each other, paired over prompts."""
        focus = self.hparams.method if self.hparams.method in stages else "cascade-routing"
        acc = {m: self._accuracy(s) for m, (s, _) in stages.items()}
        out: dict[str, Any] = {"budget": budget, "focus": focus, "lambdas": lambdas,
                               "methods": {m: {"accuracy": metric(acc[m]),
                                               "relative_cost": metric(c)}
                                           for m, (_, c) in stages.items()}}
        if focus in acc:
            out["focus_minus"] = {m: paired_difference(acc[focus], acc[m])
                                  for m in acc if m != focus}
            if self.hparams.leave_family_out:
                out["families"] = self._families_vs_random(*stages[focus])
        return out

    def _cost_at_top_minus_1pt(self, method: str) -> float | None:
        """The lowest held-out relative cost on the method's λ curve at which its accuracy is
        within 1 point of always-top's; None if never reached."""
        goal = float(self._accuracy(self.decisions["always-top"][0]).mean()) - 0.01
        ok = [p["cost"] for p in self.curves.get(method, []) if p["accuracy"] >= goal - 1e-12]
        return min(ok) if ok else None

    def test_step(self, batch: torch.Tensor, _: int) -> None:
        t = self.table
        stage, cost, latency = self.decisions[self.hparams.method]
        for i in batch.tolist():
            s = int(stage[i])
            self.rows.append({"id": str(t.ids[i]), "task": str(t.tasks[i]), "stage": s,
                              "cost": float(cost[i]), "latency_s": float(latency[i]),
                              "correct": float(t.correct[i, s]),
                              "agreement": float(t.agree[i, s] if s < t.num_stages - 1
                                                 else 1.0)})

    # -------------------------------------------------------------- results
    def build_report(self, rows: list[dict[str, Any]]) -> RunReport:
        extra = {"comparison": self._comparison(), "curve": self.curve, "curves": self.curves,
                 "cost_at_top_minus_1pt": {m: self._cost_at_top_minus_1pt(m)
                                           for m in self.curves}, **self.extra}
        return RunReport(self.hparams.method, self._metrics(rows), rows, dict(self.hparams),
                         self.hparams.seed, self._models(),
                         {"name": str(self.hparams.data_dir),
                          "split": f"all ({self.hparams.folds}-fold CV)"},
                         {"fit_s": self.fit_s}, extra)

    def _metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        L = self.table.num_stages
        stages = np.array([r["stage"] for r in rows])
        costs = np.array([r["cost"] for r in rows])
        lat = np.array([r["latency_s"] for r in rows])
        full = self.table.cost.sum(1).mean()
        learned = {}
        if self.hparams.method in self.curves:
            learned["cost_at_top_minus_1pt"] = {
                "value": self._cost_at_top_minus_1pt(self.hparams.method), "n": len(rows),
                "goal": "always-top accuracy - 1 point, lowest relative cost on the λ curve"}
        return {**learned, "accuracy": metric([r["correct"] for r in rows]),
                "agreement_with_top": metric([r["agreement"] for r in rows]),
                "relative_cost": metric(costs),
                "cost_saving_seed": {"value": float(1 - costs.mean() / full), "n": len(rows)},
                "stage_distribution": [float((stages == k).mean()) for k in range(L)],
                # Replayed from the wall times recorded while labelling (continuous batches of
                # 16 on 2 shared CPU cores): the latency these decisions would have had there.
                "latency_recorded_s": {f"p{q}": float(np.quantile(lat, q / 100))
                                       for q in (50, 95, 99)}}

    def _comparison(self) -> dict[str, Any]:
        t = self.table
        out: dict[str, Any] = {}
        for m, (stage, cost, _) in self.decisions.items():
            out[m] = {"accuracy": metric(self._accuracy(stage)), "relative_cost": metric(cost)}
        if len(self.random_runs) > 1:
            out["random"]["accuracy_over_seeds"] = [float(self._accuracy(s).mean())
                                                    for s in self.random_runs]
        if "cascade" in self.decisions:
            for other in ("random", "threshold", "always-top"):
                out[f"cascade_minus_{other}_accuracy"] = paired_difference(
                    self._accuracy(self.decisions["cascade"][0]),
                    self._accuracy(self.decisions[other][0]))
            # The cost at which the λ sweep first comes within 2 points of always-top, beside
            # the least cost at which a routing oracle reaches the same accuracy.
            goal = out["always-top"]["accuracy"]["value"] - 0.02
            ok = [p for p in self.curve if p["cascade_accuracy"] >= goal - 1e-12]
            best = min(ok, key=lambda p: p["cascade_cost"]) if ok else None
            out["top_minus_2_points"] = {
                "target_accuracy": goal,
                "cascade_cost": best["cascade_cost"] if best else None,
                "cascade_lambda": best["lambda"] if best else None,
                "oracle_cost": replay.oracle_cost_at(t, goal)}
        return out

    def _models(self) -> list[dict[str, Any]]:
        from toolkit.cascade.prompt_table import record_files
        from toolkit.common.io import read_jsonl

        seen = {}
        for path in record_files(self.hparams.data_dir):
            r = next(iter(read_jsonl(path)), None)
            if r:
                seen[r["stage"]] = {"stage": r["stage"], "slug": r["model"],
                                    "sha256": r["model_sha256"], "quantisation": r["quantisation"]}
        return [seen[k] for k in sorted(seen)]

    def figures(self, rows: list[dict[str, Any]], report: RunReport) -> dict[str, Any]:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        curves, comparison = report.extra["curves"], report.extra["comparison"]
        for (m, points), style in zip(curves.items(), itertools.cycle(["o-", "s--", "d-.",
                                                                        "x:", "^-", "v--"])):
            ax.plot([p["cost"] for p in points], [p["accuracy"] for p in points], style,
                    markersize=4, label=f"{m} (λ sweep)")
        # One marker per fixed method, named in the legend: text labels beside the points
        # overlap where two methods have the same accuracy at nearly the same cost.
        markers = itertools.cycle("^v<>DPX*")
        for m, v in comparison.items():
            if m in FIXED or m == "random":
                ax.plot(v["relative_cost"]["value"], v["accuracy"]["value"], next(markers),
                        color="k", linestyle="none", markersize=7, fillstyle="none", label=m)
        ax.set_xlabel("relative cost (always-top = 1)")
        ax.set_ylabel("accuracy (ground truth)")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"quality vs cost, {len(self.table.ids)} prompts, "
                     f"{self.hparams.folds}-fold CV")
        fig.tight_layout()
        return {"quality_vs_cost": fig}
