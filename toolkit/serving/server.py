"""``python cli.py serve``: build a cascade bundle, or serve one over HTTP with uvicorn.

One config (``configs/serve/default.yaml``) names both the bundle and what it must contain
(stages, decoding), so ``--build_bundle true`` makes the bundle from it and a plain run refuses
a bundle that does not match it. Safety defaults: loopback only; binding any other address
requires an API key (``--api_key`` or the ``TOOLKIT_API_KEY`` environment variable, which keeps
the key out of ``ps``). ``LAMBDA_VALUE`` in the environment overrides λ as in the seed: the
policy is refitted at that λ on the bundle's calibration table, and a warning says that the
bundle's calibrated budget no longer holds.

A routing bundle (``build.routing``) also loads its embedding model and embeds every request
first; a model whose slug or sha256 differs from the bundle's is refused before anything
loads (``embedding_model`` may say where the model lives, not change which one it is).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import sys
from dataclasses import replace
from typing import Any

from toolkit.cascade.bundle import BuildRecipe
from toolkit.generation.base import DecodingConfig
from toolkit.serving.app import Limits, create_app
from toolkit.serving.bundle import BundleError, check_models, load_bundle

log = logging.getLogger("toolkit.serving")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def lambda_override(bundle_meta: dict[str, Any]) -> float | None:
    """λ from ``LAMBDA_VALUE`` (None when unset), with the seed's name and a loud warning."""
    raw = os.environ.get("LAMBDA_VALUE")
    if raw is None or raw.strip() == "":
        return None
    try:
        lam = float(raw)
    except ValueError:
        raise BundleError(f"LAMBDA_VALUE must be a number, got {raw!r}") from None
    if not lam > 0 or lam == float("inf"):
        raise BundleError(f"LAMBDA_VALUE must be a positive number, got {raw!r}")
    budget = bundle_meta.get("budget")
    voided = (f"the bundle's calibrated budget (mean cost <= {budget['target']:g} top-stage "
              "calls) no longer holds" if budget else "the bundle's calibrated λ is not used")
    print(f"warning: LAMBDA_VALUE={lam:g} overrides the bundle's λ={bundle_meta['lambda']:.4g}; "
          f"the policy is refitted on the bundle's calibration table, and {voided}",
          file=sys.stderr)
    return lam


def serve(bundle: str = "runs/bundle/smollm2-qwen0.5b", stages: list[str] | None = None,
          decoding: DecodingConfig | None = None, build_bundle: bool = False,
          build: BuildRecipe | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, wait_ms: float = 10.0,
          max_queue: int = 64, admission: str = "join", limits: Limits | None = None,
          dtype: str = "float32",
          device: str = "cpu", threads: int | None = None, model_name: str = "cascade",
          log_level: str = "info", embedding_model: str | None = None
          ) -> dict[str, Any] | None:
    """Serve a cascade bundle over HTTP (FastAPI + uvicorn), or build the bundle.

    Endpoints: POST /generate (the seed's), POST /v1/chat/completions and /v1/completions
    (OpenAI-compatible, `stream: true` supported), GET /stats, /metrics (Prometheus), /health,
    /openapi.json. Concurrent requests are micro-batched per stage.

    Args:
        bundle: the bundle folder (bundle.json, predictor.onnx, calibration.json).
        stages: the models the bundle must hold, smallest first (zoo:<slug> or folders);
            None = whatever the bundle holds.
        decoding: decoding the bundle must have been calibrated with; None = the bundle's.
        build_bundle: build the bundle from `stages`, `decoding` and `build`, then exit.
        build: how to build it (records, predictor, lam or budget).
        host: address to bind; anything but loopback needs an API key.
        port: TCP port.
        api_key: Bearer token clients must send (default: $TOOLKIT_API_KEY; none on loopback).
        max_batch: most requests decoded together in one stage batch.
        wait_ms: how long a request may wait for others to join its batch.
        max_queue: most requests queued or running; more get 503 with Retry-After.
        admission: ``join``: a request joins its stage's running batch at the next decoding
            step (up to max_batch); ``batch``: it waits until that batch ends (the earlier
            behaviour, kept for comparison).
        limits: per-request limits (body size, prompt tokens, max_tokens) and the timeout.
        dtype: model weights dtype.
        device: cpu or cuda[:i].
        threads: torch intra-op threads (None = torch's default).
        model_name: the `model` reported in OpenAI responses.
        log_level: uvicorn's log level.
        embedding_model: where a routing bundle's embedding model is loaded from (zoo:<slug>
            or a folder); None = the one the bundle names. Its slug and sha256 must be the
            bundle's.
    """
    limits = limits or Limits()
    if build_bundle:
        if not stages or decoding is None or build is None:
            raise BundleError("--build_bundle needs stages, decoding and build in the config")
        from toolkit.cascade.bundle import build_bundle as make_bundle

        path = make_bundle(bundle, stages, decoding, build)
        print(f"bundle written to {path}")
        return {"bundle": str(path)}
    api_key = api_key or os.environ.get("TOOLKIT_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise BundleError(f"binding {host} (not loopback) needs an API key: set "
                          "TOOLKIT_API_KEY or --api_key")
    if admission not in ("join", "batch"):
        raise BundleError(f"admission must be 'join' or 'batch', got {admission!r}")
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                        ("limits.max_tokens_limit", limits.max_tokens_limit),
                        ("limits.max_prompt_tokens", limits.max_prompt_tokens)):
        if value <= 0:
            raise BundleError(f"{name} must be positive, got {value}")
    loaded = load_bundle(bundle, stages, decoding)
    if loaded.router is not None:  # refuse another embedding model before loading anything
        from toolkit.cascade.live_routing import check_embedding_model

        check_embedding_model(loaded.meta["router"]["embedding"], embedding_model)
    elif embedding_model:
        raise BundleError(f"embedding_model is for routing bundles; {bundle} has no router")
    lam = lambda_override(loaded.meta)
    policy = loaded.refit_lambda(lam) if lam is not None else loaded.policy

    import torch
    import uvicorn

    from toolkit.cascade.live import LiveCascade
    from toolkit.cascade.stopping import MixedPolicy
    from toolkit.generation.hf_backend import TransformersBackend
    from toolkit.serving.engine import CascadeEngine
    from toolkit.serving.stats import ServerStats

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    backends = [TransformersBackend(s["model"], dtype=dtype, device=device)
                for s in loaded.stages]
    check_models(loaded, backends)
    cal_decoding = replace(loaded.decoding, max_new_tokens=limits.max_tokens_limit)
    router = None
    if loaded.router is not None:
        from toolkit.cascade.live_routing import load_prompt_router

        router = load_prompt_router(loaded.meta["router"], loaded.router, loaded.decoding,
                                    embedding_model, device)
    cascade = LiveCascade(backends, loaded.predictor, policy, cal_decoding, batch_size=max_batch,
                          router=router)
    stats = ServerStats(len(backends), [b.info.slug for b in backends],
                        routing=router is not None)
    engine = CascadeEngine(cascade, stats, max_batch=max_batch, wait_ms=wait_ms,
                           max_queue=max_queue, admission=admission)
    # Names and hashes only: /stats must not reveal where files live on the server.
    info = {"bundle": loaded.path.name,
            "bundle_sha256": hashlib.sha256((loaded.path / "bundle.json").read_bytes()
                                            ).hexdigest(),
            "stages": [{"slug": b.info.slug, "sha256": b.info.sha256} for b in backends],
            "lambda": policy.lam, "lambda_from_env": lam is not None,
            "budget": None if lam is not None else loaded.meta.get("budget"),
            "predictor_sha256": loaded.meta["predictor"]["sha256"],
            "feature_schema": loaded.predictor.schema.id,
            "entry_stage": (policy.first_stage("") if not isinstance(policy, MixedPolicy) else
                            {"low": policy.low.first_stage(""),
                             "high": policy.high.first_stage(""), "q_high": policy.q})}
    if router is not None:
        spec = loaded.meta["router"]
        info["entry_stage"] = "per prompt (router cell)"
        info["router"] = {"kind": spec["kind"], "method": spec["method"],
                          "sha256": spec["sha256"], "cells": spec["cells"],
                          "embedding_model": {k: spec["embedding"][k]
                                              for k in ("slug", "sha256", "layers")}}
    app = create_app(engine, limits, api_key, model_name, info)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(limits.request_timeout_s) + 5)
    slugs = [st["slug"] for st in info["stages"]]
    print(f"serving {slugs} (λ={policy.lam:.4g}) on http://{host}:{port}",
          file=sys.stderr, flush=True)
    uvicorn.Server(config).run()
    return None

