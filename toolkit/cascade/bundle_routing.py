"""The router of a cascade-routing bundle (``serve --build_bundle true`` with ``build.routing``).

A routing bundle decides per prompt before any stage runs: a router reads the prompt's
embedding (the sidecar made by ``python cli.py embed``), predicts each stage's correctness,
and the prompt's cell (the bins of those predictions) picks its entry stage; after each draft
the stopping policy decides as in any bundle. Fitting mirrors the replay of
``route_replay.py`` with the bundle's records as the training folds:

* the served router is fitted on every labelled prompt of the bundle's stages;
* the policy's calibration prompts (val + test, scored by the bundle's predictor) get router
  predictions out of fold (``routing.out_of_fold``, folds by prompt id as in replay), so they
  look like live traffic; the cell edges are their quantiles;
* the policy is ``route_replay.fit_routed_policy`` on them, at the recipe's λ or with λ
  calibrated to the budget minus the mean embedding cost (the router is not free).

Everything is stored as plain files: ``router.npz`` (the router's arrays, no pickle) and the
``router`` section of ``bundle.json`` (embedding model slug, sha256, layers, pooling, chat
formatting; the cell rule: stages and edges, or the route rule's λ and stage costs; how the
policy was fitted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade import routing
from toolkit.cascade.prompt_embeddings import POOLING, EmbeddingSidecarError, load_sidecar
from toolkit.cascade.prompt_table import PromptTable
from toolkit.cascade.route_replay import (
    RoutedPolicy,
    RoutingConfig,
    fit_routed_policy,
    policy_kwargs,
)
from toolkit.generation.base import DecodingConfig
from toolkit.serving.bundle import BundleError

METHODS = ("cascade-routing", "route-only")


@dataclass
class RouterRecipe:
    """How a bundle's router and routing policy are made (``build.routing`` in the config)."""

    method: str = "cascade-routing"
    """cascade-routing (entry stage per router cell, then the stopping policy after each
    draft) or route-only (answer with the cell's entry stage, never escalate)."""
    router: str = "logistic"
    """Router on the prompt embeddings: logistic, knn or mf (``routing.ROUTERS``), or
    predictor: the bundle's predictor is trained with router heads (``predictor_module``)
    and they route; its post-draft heads then read the prompt embedding too."""
    model: str | None = None
    """Embedding model (zoo:<slug> or a folder) whose sidecar the router reads; None = the
    bundle's first stage."""
    stages: list[int] | None = None
    """Stages whose predicted correctness defines a cell; None = every stage."""
    bins: int = 2
    """Quantile bins of each of those predictions."""
    cells: str = "route"
    """quantile (bins of ``stages``' predictions) or route (a cell is the stage the
    route-only rule picks at the policy's λ; ``routing.CellRule``)."""
    final_entry: bool = True
    """A cell may answer with its entry stage and never escalate (pooled decisions only)."""
    crossfit: int = 0
    """With final_entry: parts for judging the pooled table out of sample (0 = in-sample)."""
    per_cell_decisions: bool = False
    """Post-draft decisions per cell too (else one pooled table; cells hold few prompts)."""
    folds: int = 5
    """Folds of the out-of-fold router predictions the policy is calibrated on."""

    def cell_stages(self, num_stages: int) -> tuple[int, ...]:
        """The cell stages, after checking the whole recipe (before anything is trained)."""
        if self.method not in METHODS:
            raise BundleError(f"build.routing.method must be one of {METHODS}, got "
                              f"{self.method!r}")
        if self.router not in (*routing.ROUTERS, "predictor"):
            raise BundleError(f"build.routing.router must be one of "
                              f"{(*routing.ROUTERS, 'predictor')}, got {self.router!r}")
        if self.cells not in routing.CELL_RULES:
            raise BundleError(f"build.routing.cells must be one of {routing.CELL_RULES}, got "
                              f"{self.cells!r}")
        if self.bins < 1 or self.folds < 2:
            raise BundleError(f"build.routing needs bins >= 1 and folds >= 2, got "
                              f"{self.bins} and {self.folds}")
        stages = tuple(range(num_stages)) if self.stages is None else tuple(self.stages)
        if not stages or not all(0 <= int(s) < num_stages for s in stages):
            raise BundleError(f"build.routing.stages must be stage indices below "
                              f"{num_stages}, got {list(stages)}")
        return tuple(int(s) for s in stages)


@dataclass
class FittedRouting:
    routed: RoutedPolicy
    router: routing.Router | None  # None: the predictor's router heads (in predictor.onnx)
    R_cal: np.ndarray  # [N_cal, L] out-of-fold router predictions of the calibration prompts
    embed_cost: np.ndarray  # [N_cal] embedding forward, in the calibration's cost units
    section: dict[str, Any]  # bundle.json's "router" (without the file's sha256)
    policy_kwargs: dict[str, bool]  # fit_policy's switches, for a λ override's refit


def embedding_spec(records: str, model: str, decoding: DecodingConfig,
                   ids: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The sidecar embeddings and FLOPs of ``ids`` and the spec the bundle stores; refuses a
    missing or stale sidecar (other model or weights, missing ids, other chat formatting or
    pooling) in one line naming the ``embed`` command that makes it."""
    from toolkit.models.loading import resolve

    resolved = resolve(model)
    emb, flops, meta = load_sidecar(records, ids, resolved.slug, resolved.sha256, model=model)
    for key, want in (("chat_template", decoding.chat_template),
                      ("system_prompt", decoding.system_prompt), ("pooling", POOLING)):
        if meta.get(key) != want:
            raise EmbeddingSidecarError(
                f"the prompt embeddings of {resolved.slug} under {records} were made with "
                f"{key}={meta.get(key)!r}, the bundle uses {want!r}; rebuild them with "
                f"`python cli.py embed --data_dir {records} --model {model} --force true`")
    spec = {"model": model, "slug": resolved.slug, "sha256": resolved.sha256,
            "layers": list(meta["layers"]), "pooling": meta["pooling"], "dim": int(meta["dim"]),
            "chat_template": meta["chat_template"], "system_prompt": meta["system_prompt"],
            "non_embedding_params": int(meta["non_embedding_params"])}
    return emb, flops, spec


def fit_routing(rr: RouterRecipe, table: PromptTable, cal: np.ndarray, P_cal: np.ndarray,
                embeddings: tuple[np.ndarray, np.ndarray, dict[str, Any]], records: str,
                lam: float | None, budget: float | None, n_bins: int, mix: bool,
                seed: int = 0, R_heads: np.ndarray | None = None) -> FittedRouting:
    """Fit the router and the routing policy (see the module docstring).

    ``table`` holds every labelled prompt of the bundle's stages, ``cal`` marks the
    calibration prompts, ``P_cal`` is the predictor's p of each of their stages and
    ``embeddings`` is ``embedding_spec`` of the table's prompts. With router ``predictor``,
    ``R_heads`` are the predictor's router predictions of the calibration prompts (held out
    from its training split, so they look like live traffic without extra folds).
    """
    from toolkit.cascade.replay import fold_of

    cell_stages = rr.cell_stages(table.num_stages)
    emb, flops, spec = embeddings
    router: routing.Router | None = None
    if rr.router == "predictor":
        if R_heads is None:
            raise BundleError("router 'predictor' needs the predictor's router predictions")
        R_oof = np.zeros(table.correct.shape)
        R_oof[cal] = R_heads
    else:
        folds = np.array([fold_of(str(i), rr.folds) for i in table.ids])
        R_oof = routing.out_of_fold(rr.router, emb, table.correct, folds, seed)
        router = routing.fit_router(rr.router, emb, table.correct, seed)
    held = table.subset(cal)
    embed_cost = flops[cal] / held.flops[:, -1].mean()
    cfg = RoutingConfig(cell_stages, rr.bins, n_bins, rr.per_cell_decisions, rr.cells,
                        rr.final_entry, rr.crossfit)
    routed = fit_routed_policy(
        rr.method, P_cal, held.correct, held.cost, R_oof[cal], cfg, lam=lam,
        budget=None if budget is None else budget - float(embed_cost.mean()), mix=mix)
    section = {"file": "predictor.onnx" if router is None else "router.npz",
               "kind": rr.router, "method": rr.method,
               "embedding": spec,
               "cells": {**routed.rule.to_dict(), "bins": rr.bins},
               "per_cell_decisions": rr.per_cell_decisions, "final_entry": rr.final_entry,
               "folds": rr.folds,
               "train_prompts": len(table.ids) if router is not None
               else int((table.splits == "train").sum()),
               "sidecar": str(Path(records) / "prompt_embeddings" / f"{spec['slug']}.npz"),
               "mean_embed_cost": float(embed_cost.mean())}
    return FittedRouting(routed, router, R_oof[cal], embed_cost, section,
                         policy_kwargs(rr.method, cfg))
