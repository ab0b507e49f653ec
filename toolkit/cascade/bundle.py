"""Building a cascade bundle from labelled records (``serve --build_bundle true``).

A bundle (the folder ``toolkit.serving.bundle`` loads and serves) pins everything the server
needs by hashes: stages, decoding, the predictor's ONNX file and the stopping policy, with the
calibration table the policy was fitted on. Building is cascade work, so it lives here:

* records of the chosen stages are taken from ``label``'s output (the stages may be a prefix
  or any subset of the labelled ladder; each record's model hash and decoding must match);
* the predictor is either a ``.onnx`` from a fit run (its schema must have as many stages as
  the bundle) or trained here on the records' train split with the one trainer
  (``predictor_module.train_quality_predictor``: the model class, heads and loss ``fit``
  ships);
* the policy is fitted on the held-out prompts (val + test splits), scored by that predictor,
  so calibration looks like live traffic;
* with ``build.routing``, the bundle also carries a router on the prompt embeddings and the
  policy picks the entry stage per router cell (``bundle_routing.py``; format version 2).
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.bundle_routing import RouterRecipe, embedding_spec, fit_routing
from toolkit.cascade.features import FeatureSchema, build_schema
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.prompt_table import PromptTable, load_prompt_table
from toolkit.cascade.stopping import calibrate_lambda, evaluate, fit_policy, policy_to_dict
from toolkit.common.io import atomic_write_json
from toolkit.generation.base import DecodingConfig
from toolkit.serving.bundle import (
    DECODING_KEYS,
    FORMAT,
    ROUTER_VERSION,
    VERSION,
    BundleError,
    sha256_file,
)


@dataclass
class BuildRecipe:
    """How ``--build_bundle`` makes the bundle."""

    records: str = "data/cascade"
    """Labelled records (``python cli.py label``) of (at least) the bundle's stages."""
    predictor: str | None = None
    """A ``predictor.onnx`` from a fit run with as many stages as the bundle; None = train one
    on the records' train split."""
    lam: float | None = None
    """λ, the price of a wrong answer in top-stage calls. Exactly one of lam / budget."""
    budget: float | None = None
    """Calibrate λ so the mean cost per prompt (top-stage units) stays ≤ this."""
    n_bins: int = 3
    """Quantile bins of each stage's p in the policy's histories."""
    allow_skip: bool = True
    """Let the policy skip leading stages (start at a larger model) when that pays."""
    mix: bool = True
    """With a budget: randomise (per prompt, by a hash of its text) between the two policies
    that bracket it, so the expected cost is the budget instead of the largest deterministic
    cost under it (which can be far below it; see ``stopping.MixedPolicy``)."""
    schema: str = "topk"
    """Feature schema of a predictor trained here (topk, full, seed)."""
    train_steps: int = 400
    """Full-batch AdamW steps when training the predictor here."""
    seed: int = 0
    routing: RouterRecipe | None = None
    """Route each prompt before any stage runs (a router on the prompt embeddings of
    ``python cli.py embed``); None = today's cascade."""


def _identity(model: str) -> dict[str, Any]:
    """Name, slug, sha256 and non-embedding parameters of a model, without loading weights."""
    from transformers import AutoConfig

    from toolkit.models import loading

    resolved = loading.resolve(model)
    counts = loading.parameter_counts(AutoConfig.from_pretrained(resolved.path))
    return {"model": model, "slug": resolved.slug, "sha256": resolved.sha256,
            "non_embedding_params": int(counts["non_embedding"])}


def _stage_table(records: str, stages: list[dict[str, Any]], decoding: DecodingConfig,
                 schema: FeatureSchema) -> PromptTable:
    """The prompt × stage table of the bundle's stages (by slug), refusing records made with
    other weights or decoding settings."""
    want = {k: getattr(decoding, k) for k in DECODING_KEYS}

    def expect(path: Path, r: dict[str, Any], k: int) -> None:
        if stages[k]["sha256"] and r.get("model_sha256") not in (None, stages[k]["sha256"]):
            raise BundleError(f"{path}: records of {r['model']} were made with weights "
                              f"{str(r['model_sha256'])[:12]}…, the bundle's model is "
                              f"{stages[k]['sha256'][:12]}…")
        got = {key: r["decoding"].get(key) for key in DECODING_KEYS}
        if got != want:
            raise BundleError(f"{path}: records decoded with {got}, the bundle decodes "
                              f"with {want}; label again or change the config's decoding")

    try:
        return load_prompt_table(records, schema, slugs=[s["slug"] for s in stages],
                                 expect=expect)
    except BundleError:
        raise
    except ValueError as err:  # no complete prompt: say it in the bundle's terms
        raise BundleError(f"{err} ({', '.join(s['slug'] for s in stages)})") from None


def build_bundle(out: str | Path, stages: list[str], decoding: DecodingConfig,
                 recipe: BuildRecipe) -> Path:
    """Build a bundle folder at ``out`` (replaced atomically); returns its path."""
    if (recipe.lam is None) == (recipe.budget is None):
        raise BundleError("give exactly one of build.lam and build.budget")
    if len(stages) < 2:
        raise BundleError(f"a cascade needs at least 2 stages, got {len(stages)}")
    heads = recipe.routing is not None and recipe.routing.router == "predictor"
    if recipe.routing is not None:
        recipe.routing.cell_stages(len(stages))  # refuse a bad recipe before any training
    if heads and recipe.predictor:
        raise BundleError("build.routing.router predictor trains the bundle's predictor with "
                          "router heads; drop build.predictor")
    ident = [_identity(m) for m in stages]
    if recipe.predictor:
        schema = OnnxQualityPredictor(recipe.predictor).schema
        if schema.num_stages != len(stages):
            raise BundleError(f"{recipe.predictor} scores {schema.num_stages} stages, the "
                              f"bundle has {len(stages)}")
    else:
        schema = build_schema(recipe.schema, len(stages))
    table = _stage_table(recipe.records, ident, decoding, schema)
    embeddings = None if recipe.routing is None else embedding_spec(  # a stale sidecar: now
        recipe.records, recipe.routing.model or stages[0], decoding, table.ids)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if recipe.predictor:
            shutil.copyfile(recipe.predictor, tmp / "predictor.onnx")
            predictor, trained = OnnxQualityPredictor(tmp / "predictor.onnx"), None
        else:
            predictor, trained = _train_and_export(table, recipe, tmp / "predictor.onnx",
                                                   embeddings if heads else None)
        cal = table.splits != "train"
        if cal.sum() < 10:
            raise BundleError(f"only {int(cal.sum())} held-out (val/test) prompts to "
                              "calibrate the policy on")
        held = table.subset(cal)
        e_cal = embeddings[0][cal] if heads else None
        P = np.stack([predictor.predict(held.features[:, k], embedding=e_cal)[:, 0]
                      for k in range(len(stages))], 1)
        Y, C = held.correct, held.cost
        routed, groups, embed_cost = None, None, np.zeros(len(held.ids))
        if recipe.routing is not None:
            routed = fit_routing(recipe.routing, table, cal, P, embeddings, recipe.records,
                                 recipe.lam, recipe.budget, recipe.n_bins, recipe.mix,
                                 recipe.seed, predictor.route(e_cal) if heads else None)
            policy, groups = routed.routed.policy, routed.routed.cells(routed.R_cal)
            embed_cost = routed.embed_cost
            budget = None if recipe.budget is None else {
                **routed.routed.info, "embed_cost": float(embed_cost.mean())}
        elif recipe.budget is not None:
            policy, budget = calibrate_lambda(P, Y, C, recipe.budget, n_bins=recipe.n_bins,
                                              allow_skip=recipe.allow_skip, mix=recipe.mix)
        else:
            policy = fit_policy(P, Y, C, recipe.lam, n_bins=recipe.n_bins,
                                allow_skip=recipe.allow_skip)
            budget = None
        ev = evaluate(policy, P, Y, C, groups, keys=held.keys)
        meta = {
            "format": FORMAT, "version": VERSION if routed is None else ROUTER_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stages": ident, "decoding": asdict(decoding),
            "predictor": {"file": "predictor.onnx",
                          "sha256": sha256_file(tmp / "predictor.onnx"),
                          "feature_schema": predictor.schema.to_dict(),
                          "source": recipe.predictor or "trained by --build_bundle",
                          "trained": trained},
            "lambda": policy.lam, "budget": None if budget is None else {
                "metric": "cost", "target": recipe.budget, **budget},
            "policy_fit": {"n_bins": recipe.n_bins, "allow_skip": recipe.allow_skip,
                           "mix": recipe.mix, **(routed.policy_kwargs if routed else {})},
            "policy": policy_to_dict(policy),
            "calibration": {
                "file": "calibration.json", "records": str(recipe.records),
                "prompts": int(cal.sum()), "splits": ["val", "test"],
                "mean_top_flops": float(held.flops[:, -1].mean()),
                "stops_per_stage": np.bincount(ev["stage"], minlength=len(stages)).tolist(),
                "mean_cost": float((ev["cost"] + embed_cost).mean()),
                "accuracy": float(ev["correct"].mean()),
                "records_max_new_tokens": table.max_new_tokens},
        }
        cal_table = {"ids": held.ids.tolist(), "P": P.tolist(), "Y": Y.tolist(),
                     "C": C.tolist()}
        if routed is not None:
            if routed.router is not None:
                routed.router.save(tmp / "router.npz")
            file = tmp / routed.section["file"]
            meta["router"] = {**routed.section, "sha256": sha256_file(file)}
            meta["calibration"]["entries_per_stage"] = np.bincount(
                [policy.for_key(str(k)).first_stage(str(g)) for k, g in zip(held.keys, groups)],
                minlength=len(stages)).tolist()
            cal_table |= {"R": routed.R_cal.tolist(), "cells": groups.tolist(),
                          "embed_cost": embed_cost.tolist()}
        atomic_write_json(tmp / "calibration.json", cal_table)
        atomic_write_json(tmp / "bundle.json", meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _train_and_export(table: PromptTable, recipe: BuildRecipe, onnx_path: Path,
                      embeddings: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None
                      ) -> tuple[OnnxQualityPredictor, dict[str, Any]]:
    """Train the predictor on the train split (the one trainer), export and parity-check it;
    with ``embeddings`` (``embedding_spec`` of the table's prompts) it gets router heads."""
    from toolkit.cascade.onnx_export import check_parity, export_onnx
    from toolkit.cascade.replay import fit_predictor

    tr = table.splits == "train"
    F, L = table.features.shape[-1], table.num_stages
    emb = None if embeddings is None else embeddings[0]
    module = fit_predictor(table, tr, recipe.seed, recipe.train_steps, emb)
    if emb is not None:
        module.embedding_spec = embeddings[2]
    check_emb = None if emb is None else np.repeat(emb[~tr], L, 0)  # prompt-major rows
    export_onnx(module, onnx_path)
    check_parity(module, onnx_path, table.features[~tr].reshape(-1, F), check_emb)
    return OnnxQualityPredictor(onnx_path), {
        "train_prompts": int(tr.sum()), "steps": recipe.train_steps,
        "target": "correct + agreement heads" + (" + router heads" if emb is not None else "")}
