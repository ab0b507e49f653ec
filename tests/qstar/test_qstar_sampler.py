"""The q* sampler on tiny models sharing a tokenizer: limits, exact sampling, resumable output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from toolkit.common.io import read_jsonl
from toolkit.generation.base import DecodingConfig, GenerationRequest
from toolkit.generation.hf_backend import TransformersBackend
from toolkit.generation.sampling import make_generator
from toolkit.qstar.sampler import QStarSampler, VocabularyMismatchError

PROMPTS = ["hello there", "def add(a, b):", "The answer is", "Name three colors"]


@pytest.mark.parametrize("alpha,which", [(1.0, "theta"), (0.0, "t")])
def test_greedy_alpha_limits_equal_each_model(tiny_lm, tiny_lm_b, alpha, which):
    q = QStarSampler(str(tiny_lm), str(tiny_lm_b), "fixed", fixed_alpha=alpha)
    cfg = DecodingConfig(max_new_tokens=8)
    got = q.generate([GenerationRequest(p) for p in PROMPTS], cfg, batch_size=2)
    ref_model = tiny_lm if which == "theta" else tiny_lm_b
    ref = TransformersBackend(str(ref_model)).generate(
        [GenerationRequest(p) for p in PROMPTS], cfg, batch_size=4)
    assert [o.token_ids.tolist() for o in got] == [o.token_ids.tolist() for o in ref]
    assert np.allclose(got[0].extra["alpha"], alpha)


def test_kl_symmetry_diagnostics_recorded(tiny_lm, tiny_lm_b):
    q = QStarSampler(str(tiny_lm), str(tiny_lm_b), "kl_symmetry")
    out = q.generate([GenerationRequest(PROMPTS[0], seed=3)],
                     DecodingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=1))[0]
    for key in ("alpha", "kl_theta", "kl_t", "ess_ratio", "kl_theta_sampled", "meets_kl"):
        assert len(out.extra[key]) == out.generated_tokens
    assert np.abs(out.extra["kl_theta"] - out.extra["kl_t"]).max() < 1e-5


def test_sampled_frequencies_match_exact_q(tiny_lm, tiny_lm_b):
    q = QStarSampler(str(tiny_lm), str(tiny_lm_b), "entropy")
    torch.manual_seed(0)
    V = q.theta.info.vocab_size
    la, lb = torch.randn(1, V) * 2, torch.randn(1, V) * 2
    n = 20000
    cfg = DecodingConfig(temperature=1.0, top_k=20, seed=5)
    rows = [make_generator(5, i) for i in range(n)]
    nxt, logq, _ = q.picker([la.expand(n, V), lb.expand(n, V)], cfg, rows)
    freq = torch.bincount(nxt, minlength=V).double() / n
    exact = logq[0].double().exp()
    assert (freq[exact == 0] == 0).all()  # never outside the top-k of q
    # 4 standard errors of a binomial proportion, per token.
    se = (exact * (1 - exact) / n).sqrt()
    assert ((freq - exact).abs() <= 4 * se + 1e-4).all()


def test_vocabulary_mismatch_is_refused(tiny_lm, tmp_path):
    from toolkit.models.tiny import make_tiny_causal_lm

    other = make_tiny_causal_lm(tmp_path / "other", seed=2, vocab_size=300)
    with pytest.raises(VocabularyMismatchError, match="do not share a tokenizer"):
        QStarSampler(str(tiny_lm), str(other))


def _gen_cmd(tiny_lm, tiny_lm_b, src, out):
    return [sys.executable, "cli.py", "generate", "--dataset", str(src), "--output", str(out),
            "--model_theta", str(tiny_lm), "--model_t", str(tiny_lm_b), "--batch_size", "3",
            "--decoding.max_new_tokens", "24", "--decoding.temperature", "1.0",
            "--decoding.top_p", "0.95", "--decoding.seed", "7"]


def test_generate_survives_sigkill_and_matches_uninterrupted(tiny_lm, tiny_lm_b, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"problem": f"Compute {i} * 3.", "answer": str(3 * i),
                                       "level": i % 3}) + "\n" for i in range(18)))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    subprocess.run(_gen_cmd(tiny_lm, tiny_lm_b, src, ref), cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(_gen_cmd(tiny_lm, tiny_lm_b, src, out), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and sum(1 for _ in open(out)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "generation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_gen_cmd(tiny_lm, tiny_lm_b, src, out), cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    rows = sorted(read_jsonl(out), key=lambda r: r["sample_idx"])
    assert [r["sample_idx"] for r in rows] == list(range(18))
    assert rows == sorted(read_jsonl(ref), key=lambda r: r["sample_idx"])
    r0 = rows[0]
    assert r0["messages"][0] == {"role": "user", "content": "Compute 0 * 3."}
    assert r0["messages"][1]["role"] == "assistant" and r0["original_reference"] == "0"
    assert r0["original_level"] == 0
    diags = list(read_jsonl(tmp_path / "out.diagnostics.jsonl"))
    assert sorted(d["sample_idx"] for d in diags) == list(range(18))
    assert {"alpha_mean", "ess_ratio_mean", "kl_theta_mean", "kl_t_mean"} <= set(diags[0])
    bad = subprocess.run([*_gen_cmd(tiny_lm, tiny_lm_b, src, out)[:-2], "--decoding.seed", "8"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "different configuration" in bad.stderr


@pytest.mark.parametrize("alpha, zero, other", [(1.0, "log_weight", "log_weight_t"),
                                                (0.0, "log_weight_t", "log_weight")])
def test_generate_writes_sequence_log_weights(tiny_lm, tiny_lm_b, tmp_path, alpha, zero, other):
    """q = π_θ at α = 1 makes log π_θ/q zero on every token (and π_t/q not); mirror at α = 0."""
    from toolkit.qstar.generate_data import diagnostics_path, generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "2 + 2 =")))
    out = tmp_path / "g.jsonl"
    generate(str(prompts), str(out), model_theta=str(tiny_lm), model_t=str(tiny_lm_b),
             alpha_method="fixed", fixed_alpha=alpha, batch_size=2,
             decoding=DecodingConfig(max_new_tokens=8, temperature=0.7, seed=1))
    rows = [json.loads(x) for x in diagnostics_path(out).read_text().splitlines()]
    assert len(rows) == 2
    assert all(abs(r[zero]) < 1e-4 for r in rows)
    assert all(np.isfinite(r[other]) and abs(r[other]) > 1e-3 for r in rows)
    greedy = tmp_path / "greedy.jsonl"
    generate(str(prompts), str(greedy), model_theta=str(tiny_lm), model_t=str(tiny_lm_b),
             alpha_method="fixed", fixed_alpha=alpha, batch_size=2,
             decoding=DecodingConfig(max_new_tokens=4, temperature=0.0))
    assert all("log_weight" not in json.loads(x)
               for x in diagnostics_path(greedy).read_text().splitlines())


def test_sharded_generation_gathers_into_the_same_output(tiny_lm, tiny_lm_b, tmp_path):
    """Shards skip what the output holds, make their own batches, and a plain run gathers them."""
    from toolkit.qstar.generate_data import diagnostics_path, generate, shard_path

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(10)))
    kw = dict(model_theta=str(tiny_lm), model_t=str(tiny_lm_b), batch_size=2,
              decoding=DecodingConfig(max_new_tokens=6, temperature=1.0, seed=3))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    generate(str(src), str(ref), **kw)
    generate(str(src), str(out), num_samples=4, **kw)  # batches 0 and 1 already in the output
    for k, want in ((0, [4, 5, 8, 9]), (1, [6, 7])):
        generate(str(src), str(out), shard=f"{k}/2", **kw)
        assert [r["sample_idx"] for r in read_jsonl(shard_path(out, k, 2))] == want
    assert len(list(read_jsonl(out))) == 4
    summary = generate(str(src), str(out), **kw)
    assert summary["written"] == 0 and summary["total"] == 10
    assert list(read_jsonl(out)) == list(read_jsonl(ref))
    assert list(read_jsonl(diagnostics_path(out))) == list(read_jsonl(diagnostics_path(ref)))
    assert not list(tmp_path.glob("out.shard-*"))
    with pytest.raises(ValueError, match="k/n"):
        generate(str(src), str(out), shard="half", **kw)
    with pytest.raises(ValueError, match="0 <= k < n"):
        generate(str(src), str(out), shard="2/2", **kw)
