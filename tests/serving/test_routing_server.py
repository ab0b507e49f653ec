"""A cascade-routing bundle, built and served end to end (tiny random models, real commands).

The records are ``test_serve.build_tiny_bundle``'s: stage 0 is right on short prompts only,
stage 1 always, so a router on the prompt embeddings can tell them apart and the policy
should send long prompts straight to stage 1. The embeddings are made by the real
``embed`` command with stage 0's model, and the routing bundle by ``serve --build_bundle``.
The server's routes are checked against the route computed here, in the test process, from
the bundle's files with the library's embedder, router, cells and policy.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.serving.test_serve import (
    AUTH,
    LONG,
    SHORT,
    Server,
    build_tiny_bundle,
    get,
    post,
    write_config,
)

# Quantile cells here (the first layout); the "route-cells" case below builds the default.
ROUTING = {"method": "cascade-routing", "router": "logistic", "bins": 2, "folds": 4,
           "cells": "quantile", "final_entry": False}


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """(tmp, routing serve config, stages, error lines of builds refused for the sidecar)."""
    from toolkit import cli

    tmp = tmp_path_factory.mktemp("routing")
    _, stages = build_tiny_bundle(tmp, build={"train_steps": 100})
    cfg = write_config(tmp / "routing.yaml", tmp / "rbundle", stages,
                       build={"train_steps": 100, "routing": ROUTING})
    refused = {}

    def refuse(case: str) -> None:
        err = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
            cli.main(["serve", "--config", str(cfg), "--build_bundle", "true"])
        refused[case] = (e.value.code, err.getvalue().strip())

    refuse("missing")  # no sidecar yet
    cli.main(["embed", "--data_dir", str(tmp / "rec"), "--model", stages[0]])
    stale = tmp / "rec" / "prompt_embeddings" / "small.json"
    good = stale.read_text()
    stale.write_text(good.replace(json.loads(good)["sha256"], "0" * 64))
    refuse("stale")  # a sidecar made with other weights
    stale.write_text(good)
    assert cli.main(["serve", "--config", str(cfg), "--build_bundle", "true"])["bundle"]
    return tmp, cfg, stages, refused


def offline_routes(bundle_dir, prompts):
    """The route of each prompt from the bundle's files, computed here with the library."""
    from toolkit.cascade import routing
    from toolkit.cascade.prompt_embeddings import PromptEmbedder
    from toolkit.cascade.stopping import prompt_key
    from toolkit.serving.bundle import load_bundle

    b = load_bundle(bundle_dir)
    spec = b.meta["router"]
    embedder = PromptEmbedder(spec["embedding"]["model"], tuple(spec["embedding"]["layers"]),
                              b.decoding)
    E, flops = embedder.embed(prompts)
    R = b.router.predict(E.astype(np.float16).astype(np.float32))  # as the sidecar stores it
    rule = spec["cells"]
    if rule.get("rule") == "route":  # the route-only pick at the stored λ, a naive argmin
        cost, lam = rule["stage_cost"], rule["lambda"]
        cells = np.array([f"route:{min(range(len(r)), key=lambda k: cost[k] + lam * (1 - r[k]))}"
                          for r in R])
    else:
        cells = routing.cell_labels(R, rule["stages"], [np.asarray(e) for e in rule["edges"]])
    entry = [b.policy.for_key(prompt_key(p)).first_stage(str(c)) for p, c in zip(prompts, cells)]
    return entry, cells.tolist(), R, flops


def live_run(bundle_dir, stages, prompts, max_new_tokens=4):
    """The offline live cascade with the bundle's router (the server's stage settings)."""
    from dataclasses import replace

    from toolkit.cascade.live import LiveCascade
    from toolkit.cascade.live_routing import load_prompt_router
    from toolkit.generation.hf_backend import TransformersBackend
    from toolkit.serving.bundle import load_bundle

    b = load_bundle(bundle_dir)
    router = load_prompt_router(b.meta["router"], b.router, b.decoding)
    backends = [TransformersBackend(s, dtype="float64") for s in stages]
    decoding = replace(b.decoding, max_new_tokens=max_new_tokens)
    return b, LiveCascade(backends, b.predictor, b.policy, decoding, router=router).run(prompts)


def test_build_refuses_a_missing_or_stale_sidecar_in_one_line(routed):
    tmp, _, stages, refused = routed
    for case, fix in (("missing", f"python cli.py embed --data_dir {tmp / 'rec'} --model "
                                  f"{stages[0]}`"),
                      ("stale", f"--model {stages[0]} --force true`")):
        code, err = refused[case]
        assert code == 2 and fix in err and len(err.splitlines()) == 1, (case, err)


@pytest.mark.parametrize("admission", ["join", "batch"])
def test_served_route_is_the_offline_route_and_stats_count_it(routed, admission, tmp_path):
    tmp, cfg, stages, _ = routed
    if admission == "batch":
        cfg = write_config(tmp_path / "batch.yaml", tmp / "rbundle", stages, admission="batch")
    meta = json.loads((tmp / "rbundle" / "bundle.json").read_text())
    assert meta["version"] == 2 and meta["router"]["embedding"]["slug"] == "small"
    assert meta["calibration"]["entries_per_stage"][1] > 0  # some prompts skip stage 0
    prompts = SHORT[:6] + LONG[:6]
    entry, cells, R, flops = offline_routes(tmp / "rbundle", prompts)
    assert set(entry) == {0, 1}, entry  # the router tells short from long prompts
    srv = Server(cfg)
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: post(srv, "/v1/completions", {
                "prompt": p, "max_tokens": 4}).json()["cascade"], prompts))
        gen = post(srv, "/generate", {"prompt": LONG[7], "max_tokens": 4}).json()
        stats = get(srv.url + "/stats", headers=AUTH).json()
        metrics = get(srv.url + "/metrics", headers=AUTH).text
    finally:
        srv.stop()
    _, live = live_run(tmp / "rbundle", stages, prompts)
    for c, e, cell, r, f, lv in zip(got, entry, cells, R, flops, live):
        route = c["route"]
        assert (route["entry_stage"], route["cell"]) == (e, cell)
        assert np.allclose(route["router_probabilities"], r, atol=1e-6)
        assert route["embedding_flops"] == pytest.approx(f)
        # The same stages ran as in the offline live cascade, at the same cost (the
        # embedding forward included: LiveCascade's cost is its traces' + the embedding's).
        assert c["stopped_at_stage"] == lv.stopped_at_stage >= e
        assert c["stage_probabilities"] == pytest.approx(lv.stage_probabilities)
        assert c["cost_flops"] == pytest.approx(lv.cost_flops)
    assert gen["route"]["entry_stage"] == offline_routes(tmp / "rbundle", [LONG[7]])[0][0]
    by_entry = stats["routing"]["entry_stage"]
    answered = [c["route"]["entry_stage"] for c in got] + [gen["route"]["entry_stage"]]
    costs = [c["cost_flops"] for c in got] + [gen["cost_flops"]]
    for k in ("0", "1"):
        mine = [i for i, e in enumerate(answered) if str(e) == k]
        assert by_entry[k]["answers"] == len(mine)
        assert by_entry[k]["cost_flops"] == pytest.approx(sum(costs[i] for i in mine))
        assert sum(by_entry[k]["stops_per_stage"]) == len(mine)
    assert stats["routing"]["embedding_flops"] == pytest.approx(
        sum(flops) + gen["route"]["embedding_flops"])
    assert stats["bundle"]["router"]["embedding_model"]["slug"] == "small"
    assert 'toolkit_cascade_entries_total{stage="1",model="large"}' in metrics


def test_another_embedding_model_is_refused_at_start_in_one_line(routed, tmp_path, capsys):
    from toolkit import cli

    tmp, cfg, stages, _ = routed
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another model (slug) where the bundle's should be
        cli.main(["serve", "--config", str(cfg), "--embedding_model", stages[1]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "router reads embeddings of small" in err
    assert len(err.splitlines()) == 1, err
    copy = tmp_path / "other-weights"  # the bundle's model, but other weights (sha256)
    shutil.copytree(tmp / "rbundle", copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["router"]["embedding"]["sha256"] = "f" * 64
    (copy / "bundle.json").write_text(json.dumps(meta))
    other = write_config(tmp_path / "other.yaml", copy, stages, build={"routing": ROUTING})
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--config", str(other)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "sha256 ffffffffffff" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method", ["cascade-routing", "route-only", "predictor-heads",
                                    "route-cells"])
def test_live_cascade_enters_where_the_router_says(routed, method, tmp_path):
    """The offline live cascade routes with the same code: each prompt's first stage run is
    its offline entry stage, its cost includes the embedding forward, and a route-only bundle
    answers with the entry stage. ``predictor-heads``: cascade routing whose router is the
    router heads of the bundle's own predictor (one ONNX file, no router.npz), whose
    post-draft heads read the routed prompt's embedding. ``route-cells``: cells are the
    route-only rule's pick (``cells: route``, ``final_entry: true``), recomputed here by a
    naive argmin from the λ and stage costs the bundle stores."""
    from toolkit import cli

    tmp, cfg, stages, _ = routed
    folder = tmp / "rbundle"
    if method != "cascade-routing":
        folder = tmp_path / method
        routing = {"route-only": {**ROUTING, "method": method},
                   "predictor-heads": {**ROUTING, "router": "predictor"},
                   "route-cells": {**ROUTING, "cells": "route", "final_entry": True}}[method]
        cfg = write_config(tmp_path / "ro.yaml", folder, stages, build={
            "records": str(tmp / "rec"), "train_steps": 100, "lam": 2.5, "routing": routing})
        cli.main(["serve", "--config", str(cfg), "--build_bundle", "true"])
    if method == "predictor-heads":
        meta = json.loads((folder / "bundle.json").read_text())
        assert meta["router"]["kind"] == "predictor" and not (folder / "router.npz").exists()
        assert meta["router"]["file"] == "predictor.onnx"
    if method == "route-cells":
        meta = json.loads((folder / "bundle.json").read_text())
        assert meta["router"]["cells"]["rule"] == "route" and meta["router"]["final_entry"]
    if method in ("predictor-heads", "route-cells"):
        method = "cascade-routing"
    prompts = SHORT[:3] + LONG[:3]
    b, out = live_run(folder, stages, prompts)
    assert b.meta["router"]["method"] == method
    entry, cells, _, flops = offline_routes(folder, prompts)
    assert set(entry) == {0, 1}
    for r, e, c, f in zip(out, entry, cells, flops):
        assert (r.route.entry_stage, r.route.cell, r.trace[0].stage) == (e, c, e)
        assert r.cost_flops == pytest.approx(sum(t.cost_flops for t in r.trace) + f)
        if method == "route-only":
            assert r.stopped_at_stage == e and len(r.trace) == 1
    if b.meta["router"]["cells"].get("rule") == "route":  # LAMBDA_VALUE moves route cells too
        from toolkit.cascade.stopping import fit_policy

        cal = b.calibration
        refit = b.refit_lambda(10.0)
        assert b.meta["router"]["cells"]["lambda"] == 10.0
        cost = b.meta["router"]["cells"]["stage_cost"]
        naive = [f"route:{min(range(len(r)), key=lambda k: cost[k] + 10.0 * (1 - r[k]))}"
                 for r in cal["R"]]
        again = fit_policy(np.asarray(cal["P"]), np.asarray(cal["Y"]), np.asarray(cal["C"]),
                           10.0, n_bins=b.meta["policy_fit"]["n_bins"], groups=np.array(naive),
                           shared_decisions=True, final_entry=True)
        assert refit.entry == again.entry and refit.final_groups == again.final_groups


def test_served_predictor_heads_bundle_equals_the_live_cascade(routed, tmp_path):
    """A bundle whose router is its predictor's router heads: the server routes with them and
    its post-draft scores read each prompt's embedding, exactly as the offline live cascade."""
    from toolkit import cli

    tmp, _, stages, _ = routed
    folder = tmp_path / "heads"
    cfg = write_config(tmp_path / "heads.yaml", folder, stages, build={
        "records": str(tmp / "rec"), "train_steps": 100, "lam": 2.5,
        "routing": {**ROUTING, "router": "predictor"}})
    cli.main(["serve", "--config", str(cfg), "--build_bundle", "true"])
    prompts = SHORT[:3] + LONG[:3]
    srv = Server(cfg)
    try:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: post(srv, "/v1/completions", {
                "prompt": p, "max_tokens": 4}).json()["cascade"], prompts))
        stats = get(srv.url + "/stats", headers=AUTH).json()
    finally:
        srv.stop()
    _, live = live_run(folder, stages, prompts)
    entry, cells, R, _ = offline_routes(folder, prompts)
    for c, e, cell, r, lv in zip(got, entry, cells, R, live):
        assert (c["route"]["entry_stage"], c["route"]["cell"]) == (e, cell)
        assert np.allclose(c["route"]["router_probabilities"], r, atol=1e-6)
        assert c["stopped_at_stage"] == lv.stopped_at_stage
        assert c["stage_probabilities"] == pytest.approx(lv.stage_probabilities)
    assert stats["bundle"]["router"]["kind"] == "predictor"
