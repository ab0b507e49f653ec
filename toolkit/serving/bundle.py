"""The cascade bundle: everything the server needs, pinned by hashes, built from labelled records.

A bundle is a folder::

    bundle.json        stages (model name, slug, sha256, non-embedding params), decoding,
                       predictor (file, sha256, feature schema), policy (policy_to_dict),
                       lambda or budget, calibration summary, provenance
    predictor.onnx     the quality predictor (feature schema in its metadata)
    calibration.json   the calibration table: predicted p, correctness and cost of every stage
                       for every calibration prompt (refits the policy when LAMBDA_VALUE is set)

Why a bundle and not "models + a predictor path": the stopping policy is only meaningful for
the exact models, decoding settings and predictor its calibration data came from. The server
compares its config's stages and decoding with the bundle and every file and model hash with
the ones recorded, and refuses to start on any difference (``BundleError``, one line).

Building (``python cli.py serve --config … --build_bundle true``): records of the chosen stages
are taken from ``label``'s output (the stages may be a prefix or any subset of the labelled
ladder; each record's model hash must match). The predictor is either a ``.onnx`` from a fit
run (its schema must have as many stages as the bundle) or trained here on the records' train
split (correctness head; a minute on CPU). The policy is fitted on the held-out prompts (val +
test splits), scored by that predictor, so calibration looks like live traffic.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.features import build_schema, record_features
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.records_datamodule import record_files
from toolkit.cascade.stopping import (
    AnyPolicy,
    StoppingPolicy,
    calibrate_lambda,
    fit_policy,
    policy_from_dict,
    policy_to_dict,
    prompt_key,
)
from toolkit.common.io import atomic_write_json, read_jsonl
from toolkit.generation.base import DecodingConfig

FORMAT, VERSION = "toolkit-cascade-bundle", 1
# Decoding fields that change what a stage answers (max_new_tokens may differ: it is a cap).
DECODING_KEYS = ("temperature", "top_p", "top_k", "chat_template", "system_prompt")


class BundleError(ValueError):
    """A bundle is missing, inconsistent, or does not match the serving config."""


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


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    meta: dict[str, Any]
    predictor: OnnxQualityPredictor
    policy: AnyPolicy
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.meta["stages"]

    @property
    def decoding(self) -> DecodingConfig:
        return DecodingConfig(**self.meta["decoding"])

    def refit_lambda(self, lam: float) -> StoppingPolicy:
        """The policy at another λ, fitted on the bundle's own calibration table."""
        cal = self.calibration
        return fit_policy(np.asarray(cal["P"]), np.asarray(cal["Y"]), np.asarray(cal["C"]),
                          lam, n_bins=int(self.meta["policy_fit"]["n_bins"]),
                          allow_skip=bool(self.meta["policy_fit"].get("allow_skip", True)))


def sha256_file(path: Path) -> str:
    from toolkit.models.zoo import sha256_file as _sha

    return _sha(path)


def _identity(model: str) -> dict[str, Any]:
    """Name, slug, sha256 and non-embedding parameters of a model, without loading weights."""
    from transformers import AutoConfig

    from toolkit.models import loading

    resolved = loading.resolve(model)
    counts = loading.parameter_counts(AutoConfig.from_pretrained(resolved.path))
    return {"model": model, "slug": resolved.slug, "sha256": resolved.sha256,
            "non_embedding_params": int(counts["non_embedding"])}


def _stage_records(records: str, stages: list[dict[str, Any]], decoding: DecodingConfig
                   ) -> dict[str, list[dict[str, Any]]]:
    """{prompt id: [record of bundle stage 0, 1, …]} for prompts labelled at every stage."""
    by_slug = {s["slug"]: k for k, s in enumerate(stages)}
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    want = {k: getattr(decoding, k) for k in DECODING_KEYS}
    for path in record_files(records):
        for r in read_jsonl(path):
            k = by_slug.get(r["model"])
            if k is None or r.get("correct") is None:
                continue
            if stages[k]["sha256"] and r.get("model_sha256") not in (None, stages[k]["sha256"]):
                raise BundleError(f"{path}: records of {r['model']} were made with weights "
                                  f"{str(r['model_sha256'])[:12]}…, the bundle's model is "
                                  f"{stages[k]['sha256'][:12]}…")
            got = {key: r["decoding"].get(key) for key in DECODING_KEYS}
            if got != want:
                raise BundleError(f"{path}: records decoded with {got}, the bundle decodes "
                                  f"with {want}; label again or change the config's decoding")
            rows.setdefault(r["id"], {})[k] = {**r, "stage": k}
    full = {i: [st[k] for k in range(len(stages))] for i, st in rows.items()
            if len(st) == len(stages)}
    if not full:
        raise BundleError(f"no prompt under {records} has scored records for every stage "
                          f"({', '.join(by_slug)})")
    return dict(sorted(full.items()))


def _train_predictor(X: np.ndarray, y: np.ndarray, schema: str, num_stages: int,
                     steps: int, seed: int) -> Any:
    """The toolkit's QualityPredictor, fitted full batch on the correctness target."""
    import torch

    from toolkit.cascade.predictor_module import QualityPredictor

    torch.manual_seed(seed)
    module = QualityPredictor(schema=schema, num_stages=num_stages)
    x, t = torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    module.set_feature_stats(x.mean(0), x.std(0))
    opt = module.configure_optimizers()
    module.train()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logits = module.net((x - module.feat_mean) / module.feat_std)[:, 0]
            torch.nn.functional.binary_cross_entropy_with_logits(logits, t).backward()
            opt.step()
    return module.eval()


def build_bundle(out: str | Path, stages: list[str], decoding: DecodingConfig,
                 recipe: BuildRecipe) -> Path:
    """Build a bundle folder at ``out`` (replaced atomically); returns its path."""
    if (recipe.lam is None) == (recipe.budget is None):
        raise BundleError("give exactly one of build.lam and build.budget")
    if len(stages) < 2:
        raise BundleError(f"a cascade needs at least 2 stages, got {len(stages)}")
    ident = [_identity(m) for m in stages]
    rows = _stage_records(recipe.records, ident, decoding)
    ids = list(rows)
    split = np.array([rows[i][0]["split"] for i in ids])
    Y = np.array([[float(r["correct"]) for r in rows[i]] for i in ids])
    flops = np.array([[float(r["cost_flops"]) for r in rows[i]] for i in ids])
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists()
                                else _mkdir(out.parent)))
    try:
        if recipe.predictor:
            shutil.copyfile(recipe.predictor, tmp / "predictor.onnx")
            predictor = OnnxQualityPredictor(tmp / "predictor.onnx")
            if predictor.schema.num_stages != len(stages):
                raise BundleError(f"{recipe.predictor} scores {predictor.schema.num_stages} "
                                  f"stages, the bundle has {len(stages)}")
            schema, trained = predictor.schema, None
        else:
            schema = build_schema(recipe.schema, len(stages))
        X = np.stack([np.stack([record_features(r, schema) for r in rows[i]]) for i in ids])
        cal = split != "train"
        if not recipe.predictor:
            from toolkit.cascade.onnx_export import check_parity, export_onnx

            tr = ~cal
            module = _train_predictor(X[tr].reshape(-1, schema.dim), Y[tr].reshape(-1),
                                      recipe.schema, len(stages), recipe.train_steps,
                                      recipe.seed)
            export_onnx(module, tmp / "predictor.onnx")
            check_parity(module, tmp / "predictor.onnx", X[cal].reshape(-1, schema.dim))
            predictor = OnnxQualityPredictor(tmp / "predictor.onnx")
            trained = {"train_prompts": int(tr.sum()), "steps": recipe.train_steps,
                       "target": "correct"}
        if cal.sum() < 10:
            raise BundleError(f"only {int(cal.sum())} held-out (val/test) prompts to "
                              "calibrate the policy on")
        P = np.stack([predictor.predict(X[cal, k])[:, 0] for k in range(len(stages))], 1)
        C = flops[cal] / flops[cal, -1].mean()
        if recipe.budget is not None:
            policy, budget = calibrate_lambda(P, Y[cal], C, recipe.budget, n_bins=recipe.n_bins,
                                              allow_skip=recipe.allow_skip, mix=recipe.mix)
        else:
            policy = fit_policy(P, Y[cal], C, recipe.lam, n_bins=recipe.n_bins,
                                allow_skip=recipe.allow_skip)
            budget = None
        from toolkit.cascade.stopping import evaluate

        keys = np.array([prompt_key(rows[i][0]["prompt"]) for i in ids])[cal]
        ev = evaluate(policy, P, Y[cal], C, keys=keys)
        meta = {
            "format": FORMAT, "version": VERSION,
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
                           "mix": recipe.mix},
            "policy": policy_to_dict(policy),
            "calibration": {
                "file": "calibration.json", "records": str(recipe.records),
                "prompts": int(cal.sum()), "splits": ["val", "test"],
                "mean_top_flops": float(flops[cal, -1].mean()),
                "stops_per_stage": np.bincount(ev["stage"], minlength=len(stages)).tolist(),
                "mean_cost": float(ev["cost"].mean()), "accuracy": float(ev["correct"].mean()),
                "records_max_new_tokens": sorted({int(rows[i][0]["decoding"]["max_new_tokens"])
                                                  for i in ids})},
        }
        atomic_write_json(tmp / "calibration.json",
                          {"ids": np.array(ids)[cal].tolist(), "P": P.tolist(),
                           "Y": Y[cal].tolist(), "C": C.tolist()})
        atomic_write_json(tmp / "bundle.json", meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_bundle(path: str | Path, stages: list[str] | None = None,
                decoding: DecodingConfig | None = None) -> Bundle:
    """Read a bundle and check it against the serving config and its own hashes.

    Model weights are checked later, when the backends load (``check_models``).
    """
    path = Path(path)
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"no bundle at {path} (no bundle.json); build it with "
                          "`python cli.py serve --config … --build_bundle true`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BundleError(f"{meta_path} is not a {FORMAT} v{VERSION} file")
    names = [s["model"] for s in meta["stages"]]
    if stages is not None and list(stages) != names:
        raise BundleError(f"bundle {path} holds stages {names}, the config asks for "
                          f"{list(stages)}; rebuild it with --build_bundle true")
    if decoding is not None:
        got = {k: meta["decoding"].get(k) for k in DECODING_KEYS}
        want = {k: getattr(decoding, k) for k in DECODING_KEYS}
        if got != want:
            raise BundleError(f"bundle {path} was calibrated with decoding {got}, the config "
                              f"asks for {want}; rebuild it with --build_bundle true")
    onnx_path = path / meta["predictor"]["file"]
    if not onnx_path.is_file() or sha256_file(onnx_path) != meta["predictor"]["sha256"]:
        raise BundleError(f"{onnx_path} is missing or differs from the sha256 in bundle.json")
    predictor = OnnxQualityPredictor(onnx_path)
    predictor.schema.check_compatible(meta["predictor"]["feature_schema"])
    policy = policy_from_dict(meta["policy"])
    if predictor.schema.num_stages != len(names) or policy.num_stages != len(names):
        raise BundleError(f"bundle {path}: {len(names)} stages but the predictor scores "
                          f"{predictor.schema.num_stages} and the policy has {policy.num_stages}")
    cal_path = path / meta["calibration"]["file"]
    calibration = json.loads(cal_path.read_text()) if cal_path.is_file() else {}
    return Bundle(path, meta, predictor, policy, calibration)


def check_models(bundle: Bundle, backends: list[Any]) -> None:
    """Refuse models whose weights differ from the ones the bundle was calibrated with."""
    for k, (stage, backend) in enumerate(zip(bundle.stages, backends)):
        if stage["sha256"] and backend.info.sha256 != stage["sha256"]:
            raise BundleError(f"stage {k} ({stage['model']}): loaded weights have sha256 "
                              f"{str(backend.info.sha256)[:12]}…, the bundle expects "
                              f"{stage['sha256'][:12]}…")
