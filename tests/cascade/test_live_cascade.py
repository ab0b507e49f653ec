"""Live and replay make the same decisions: one decision code path (tiny float64 models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolkit.cascade.features import record_features
from toolkit.cascade.labelling import StageSpec, TaskSpec, label, load_records
from toolkit.cascade.live import LiveCascade
from toolkit.cascade.onnx_export import export_onnx
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.predictor_module import QualityPredictor
from toolkit.cascade.stopping import (
    MixedPolicy,
    evaluate,
    fit_policy,
    policy_from_dict,
    policy_to_dict,
    prompt_key,
)
from toolkit.generation.base import DecodingConfig
from toolkit.generation.hf_backend import TransformersBackend


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_lm_b):
    tmp = tmp_path_factory.mktemp("live")
    prompts = [f"What is {i} + {2 * i}? Answer:" for i in range(12)]
    src = tmp / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "answer": "x"}) + "\n"
                           for i, p in enumerate(prompts)))
    decoding = DecodingConfig(max_new_tokens=10)
    stages = [StageSpec(str(tiny_lm), dtype="float64"), StageSpec(str(tiny_lm_b), dtype="float64")]
    label(stages, [TaskSpec(str(src))], decoding, out_dir=str(tmp / "rec"), batch_size=4,
          chunk_size=4)
    recs = {(r["id"], r["stage"]): r for r in load_records(tmp / "rec")}
    ids = [f"p/q{i}" for i in range(12)]
    torch.manual_seed(0)
    module = QualityPredictor(schema="topk", num_stages=2, hidden=[16])
    X = np.stack([[record_features(recs[(i, k)], module.schema) for k in range(2)] for i in ids])
    flat = torch.from_numpy(X.reshape(-1, X.shape[-1]))
    module.set_feature_stats(flat.mean(0), flat.std(0))
    onnx_path = export_onnx(module, tmp / "predictor.onnx")
    predictor = OnnxQualityPredictor(onnx_path)
    P = np.stack([predictor.predict(X[:, k])[:, 0] for k in range(2)], 1)
    flops = np.array([[recs[(i, k)]["cost_flops"] for k in range(2)] for i in ids])
    C = flops / flops[:, -1].mean()
    # Labels that make escalation pay for low-scoring first answers (any labels would do: the
    # test is that live and replay decide alike, not that the policy is good).
    Y = np.stack([(P[:, 0] > np.median(P[:, 0])).astype(float), np.ones(len(P))], 1)
    policy = policy_from_dict(json.loads(json.dumps(policy_to_dict(
        fit_policy(P, Y, C, lam=3.0, n_bins=2)))))
    backends = [TransformersBackend(s.model, dtype="float64") for s in stages]
    return prompts, P, Y, C, flops, policy, predictor, backends, decoding, tmp


def test_live_equals_replay(setup):
    prompts, P, Y, C, flops, policy, predictor, backends, decoding, _ = setup
    replay = evaluate(policy, P, Y, C)
    assert len(set(replay["stage"].tolist())) == 2, "policy should use both stages here"
    live = LiveCascade(backends, predictor, policy, decoding, batch_size=3).run(prompts)
    assert [r.stopped_at_stage for r in live] == replay["stage"].tolist()
    paid = np.array([r.cost_flops for r in live]) / flops[:, -1].mean()
    np.testing.assert_allclose(paid, replay["cost"], rtol=1e-9)
    for r, p in zip(live, P):
        np.testing.assert_allclose(r.stage_probabilities, p[: len(r.stage_probabilities)],
                                   atol=1e-6)
        assert r.trace[-1].decision == "stop" and r.trace[-1].why


def test_live_equals_replay_with_a_mixed_policy(setup):
    """Each prompt's side of a mixed policy is fixed by its text: live and replay agree."""
    prompts, P, Y, C, _, policy, predictor, backends, decoding, _ = setup
    cheap = fit_policy(P, Y, C, lam=1e-3, n_bins=2)  # never escalates
    mixed = MixedPolicy(cheap, policy, q=0.5)
    keys = np.array([prompt_key(p) for p in prompts])
    replay = evaluate(mixed, P, Y, C, keys=keys)
    sides = [mixed.for_key(k) is policy for k in keys]
    assert 0 < sum(sides) < len(sides), "both sides of the mixture should occur"
    live = LiveCascade(backends, predictor, mixed, decoding, batch_size=4).run(prompts)
    assert [r.stopped_at_stage for r in live] == replay["stage"].tolist()


def test_live_refuses_mismatched_stage_count(setup):
    _, _, _, _, _, policy, predictor, backends, _, _ = setup
    with pytest.raises(ValueError, match="3 stages, but the predictor expects 2"):
        LiveCascade([*backends, backends[0]], predictor, policy)


def test_seed_api_pipeline(setup, tiny_lm, tiny_lm_b):
    from toolkit.cascade.seed_api import AdaptiveSpeculativePipeline, Stage, optimal_stopping_rule

    prompts, tmp = setup[0], setup[-1]
    stages = [Stage(str(tiny_lm)), Stage(str(tiny_lm_b))]
    assert stages[1].cost_per_token > stages[0].cost_per_token > 0
    assert stages[0].kv_cache_bytes(100) > 0
    out = stages[0].generate(prompts[:2], max_tokens=4)
    assert len(out) == 2 and len(out[0]["top_logprobs"][0]) == 5
    pipe = AdaptiveSpeculativePipeline(stages, tmp / "predictor.onnx", lambda_value=3.0,
                                       calibration_dir=str(tmp / "rec"))
    res = pipe.process_request(prompts[0], max_tokens=6)
    assert set(res) >= {"output", "stopped_at_stage", "latency_ms", "stage_probabilities"}
    assert len(res["stage_probabilities"]) == res["stopped_at_stage"] + 1
    assert pipe.stats["total_requests"] == 1 and sum(pipe.stats["stops_per_stage"]) == 1
    assert optimal_stopping_rule([0.3, 0.5, 0.7, 0.9], [1, 1.6, 4.2, 8.8], 1.0) == 0
