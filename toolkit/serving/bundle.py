"""The cascade bundle: everything the server needs, pinned by hashes; loading and checks.

A bundle is a folder::

    bundle.json        stages (model name, slug, sha256, non-embedding params), decoding,
                       predictor (file, sha256, feature schema), policy (policy_to_dict),
                       lambda or budget, calibration summary, provenance
    predictor.onnx     the quality predictor (feature schema in its metadata)
    calibration.json   the calibration table: predicted p, correctness and cost of every stage
                       for every calibration prompt (refits the policy when LAMBDA_VALUE is set)
    router.npz         (version 2, a cascade-routing bundle) the router's arrays; bundle.json's
                       ``router`` section names its embedding model (slug, sha256, layers,
                       pooling, chat formatting) and the cells the policy's entry is chosen by;
                       with router kind ``predictor`` there is no router.npz: the router is
                       the router heads inside predictor.onnx (whose post-draft heads then read
                       the prompt embedding too)

Why a bundle and not "models + a predictor path": the stopping policy is only meaningful for
the exact models, decoding settings and predictor its calibration data came from. The server
compares its config's stages and decoding with the bundle and every file and model hash with
the ones recorded, and refuses to start on any difference (``BundleError``, one line).

Bundles are built from labelled records by ``toolkit.cascade.bundle`` (``python cli.py serve
--config … --build_bundle true``); this module only reads them, and imports neither torch nor
Lightning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.live_routing import HeadsRouter
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.routing import Router
from toolkit.cascade.stopping import AnyPolicy, StoppingPolicy, fit_policy, policy_from_dict
from toolkit.common.errors import UserError
from toolkit.generation.base import DecodingConfig

FORMAT, VERSION = "toolkit-cascade-bundle", 1
ROUTER_VERSION = 2  # a bundle that routes prompts (older servers refuse it: they read v1 only)
# Decoding fields that change what a stage answers (max_new_tokens may differ: it is a cap).
DECODING_KEYS = ("temperature", "top_p", "top_k", "chat_template", "system_prompt")


class BundleError(UserError, ValueError):
    """A bundle is missing, inconsistent, or does not match the serving config."""


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    meta: dict[str, Any]
    predictor: OnnxQualityPredictor
    policy: AnyPolicy
    calibration: dict[str, Any] = field(default_factory=dict)
    router: Router | HeadsRouter | None = None
    """The prompt router of a cascade-routing bundle (its spec: ``meta["router"]``)."""

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.meta["stages"]

    @property
    def decoding(self) -> DecodingConfig:
        return DecodingConfig(**self.meta["decoding"])

    def refit_lambda(self, lam: float) -> StoppingPolicy:
        """The policy at another λ, fitted on the bundle's own calibration table. Route
        cells (the route-only rule's pick at λ) move with λ, as in replay: the router section
        of ``meta`` then holds the new λ, and the calibration prompts' cells are recomputed."""
        from toolkit.cascade.routing import CellRule

        cal, fit = self.calibration, self.meta["policy_fit"]
        routed = {}
        if self.router is not None:
            cells = np.asarray(cal["cells"])
            spec = self.meta["router"]["cells"]
            if spec.get("rule") == "route":
                spec["lambda"] = float(lam)
                cells = CellRule.from_dict(spec).labels(np.asarray(cal["R"]))
            routed = {"groups": cells, "escalate": bool(fit["escalate"]),
                      "shared_decisions": bool(fit["shared_decisions"]),
                      "final_entry": bool(fit.get("final_entry", False)),
                      "crossfit": int(fit.get("crossfit", 0))}
        return fit_policy(np.asarray(cal["P"]), np.asarray(cal["Y"]), np.asarray(cal["C"]),
                          lam, n_bins=int(fit["n_bins"]),
                          allow_skip=bool(fit.get("allow_skip", True)), **routed)


def sha256_file(path: Path) -> str:
    from toolkit.models.zoo import sha256_file as _sha

    return _sha(path)


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
    if meta.get("format") != FORMAT or meta.get("version") not in (VERSION, ROUTER_VERSION):
        raise BundleError(f"{meta_path} is not a {FORMAT} v{VERSION} or v{ROUTER_VERSION} file")
    if (meta["version"] == ROUTER_VERSION) != ("router" in meta):
        raise BundleError(f"{meta_path}: a v{ROUTER_VERSION} bundle carries a router and only "
                          "it does; rebuild it with --build_bundle true")
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
    router = _load_router(path, meta, predictor) if "router" in meta else None
    return Bundle(path, meta, predictor, policy, calibration, router)


def _load_router(path: Path, meta: dict[str, Any], predictor: OnnxQualityPredictor
                 ) -> Router | HeadsRouter:
    spec = meta["router"]
    if spec["kind"] == "predictor":  # the router heads inside predictor.onnx
        router = HeadsRouter(predictor)
        if router.dim != spec["embedding"]["dim"]:
            raise BundleError(f"{path / spec['file']} reads {router.dim}-wide embeddings, "
                              f"the bundle's are {spec['embedding']['dim']}-wide")
        return router
    file = path / spec["file"]
    if not file.is_file() or sha256_file(file) != spec["sha256"]:
        raise BundleError(f"{file} is missing or differs from the sha256 in bundle.json")
    router = Router.load(file)
    if router.num_stages != len(meta["stages"]) or router.dim != spec["embedding"]["dim"]:
        raise BundleError(f"{file} predicts {router.num_stages} stages from {router.dim}-wide "
                          f"embeddings; the bundle has {len(meta['stages'])} stages and "
                          f"{spec['embedding']['dim']}-wide embeddings")
    return router


def check_models(bundle: Bundle, backends: list[Any]) -> None:
    """Refuse models whose weights differ from the ones the bundle was calibrated with."""
    for k, (stage, backend) in enumerate(zip(bundle.stages, backends)):
        if stage["sha256"] and backend.info.sha256 != stage["sha256"]:
            raise BundleError(f"stage {k} ({stage['model']}): loaded weights have sha256 "
                              f"{str(backend.info.sha256)[:12]}…, the bundle expects "
                              f"{stage['sha256'][:12]}…")
