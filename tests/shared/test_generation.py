"""The transformers backend on tiny random models: batching, stats, EOS, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.generation.base import DecodingConfig, GenerationRequest, call_cost
from toolkit.generation.hf_backend import ContextLengthError, TransformersBackend
from toolkit.generation.sampling import filter_top_k_top_p

PROMPTS = ["hello there", "def add(a, b):", "The answer is", "Name three colors: red, green"]


@pytest.fixture(scope="module")
def backend(tiny_lm):
    return TransformersBackend(str(tiny_lm))


def test_batched_equals_single_and_plain_generate(backend):
    cfg = DecodingConfig(max_new_tokens=12)
    batched = backend.generate([GenerationRequest(p) for p in PROMPTS], cfg, batch_size=4)
    for p, out in zip(PROMPTS, batched):
        single = backend.generate([GenerationRequest(p)], cfg, batch_size=1)[0]
        assert out.token_ids.tolist() == single.token_ids.tolist()
        np.testing.assert_allclose(out.token_logprobs, single.token_logprobs, atol=1e-4)
        ids = torch.tensor([backend.encode(p, cfg)])
        ref = backend.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=12, pad_token_id=backend.tokenizer.pad_token_id)
        assert out.token_ids.tolist() == ref[0, ids.shape[1]:].tolist()[: out.generated_tokens]


def test_continuous_batching_refill_matches_single_runs(backend):
    """6 prompts through 2 slots with uneven budgets: rows leave and queued prompts join."""
    prompts = PROMPTS + ["Write a haiku about the sea.", "0 1 2 3"]
    reqs = [GenerationRequest(p, max_new_tokens=3 + 4 * (i % 3)) for i, p in enumerate(prompts)]
    cfg = DecodingConfig(max_new_tokens=16)
    together = backend.generate(reqs, cfg, batch_size=2)
    for r, out in zip(reqs, together):
        single = backend.generate([r], cfg, batch_size=1)[0]
        assert out.generated_tokens == r.max_new_tokens or out.stop_reason == "eos"
        assert out.token_ids.tolist() == single.token_ids.tolist()
        np.testing.assert_allclose(out.entropies, single.entropies, atol=1e-4)


def test_on_step_abandons_rows_others_unchanged(backend):
    """A row the hook abandons (its client went away) leaves at once; the others decode on
    exactly as if it had never been there."""
    cfg = DecodingConfig(max_new_tokens=10)
    reqs = [GenerationRequest(p) for p in PROMPTS[:3]]
    seen: list[list[int]] = []

    def hook(rows: list[int], tokens: list[int]) -> list[int]:
        seen.append(rows)
        return [1] if len(seen) == 3 else []

    outs = backend.generate(reqs, cfg, batch_size=3, on_step=hook)
    assert outs[1].stop_reason == "cancelled" and outs[1].generated_tokens == 3
    assert all(1 not in rows for rows in seen[3:])
    for i in (0, 2):
        alone = backend.generate([reqs[i]], cfg, batch_size=1)[0]
        assert outs[i].token_ids.tolist() == alone.token_ids.tolist()
        assert outs[i].stop_reason == alone.stop_reason


def test_token_stats_match_full_distribution(backend):
    cfg = DecodingConfig(max_new_tokens=5)
    out = backend.generate([GenerationRequest(PROMPTS[1])], cfg)[0]
    ids = backend.encode(PROMPTS[1], cfg) + out.token_ids.tolist()
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0].float()
    n = len(ids) - out.generated_tokens
    logp = torch.log_softmax(logits[n - 1:-1], -1)
    ent = -(logp.exp() * logp).sum(-1)
    chosen = logp.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    np.testing.assert_allclose(out.entropies, ent.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.token_logprobs, chosen.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.top1_logprobs, logp.max(-1).values.numpy(), atol=1e-4)
    assert out.top_logprobs.shape == (5, 5) and out.top_ids.shape == (5, 5)
    assert (np.diff(out.top_logprobs, axis=1) <= 1e-6).all()  # sorted, best first


def test_stop_at_eos_per_sequence(backend):
    cfg = DecodingConfig(max_new_tokens=10)
    free = backend.generate([GenerationRequest(p) for p in PROMPTS], cfg, batch_size=4)
    # Declare the token row 0 emits at step 3 an end-of-sequence token, then decode again:
    # row 0 must stop there, and rows that leave the batch must not change the others.
    stop_tok = int(free[0].token_ids[2])
    saved = backend.eos_ids
    backend.eos_ids = [stop_tok]
    try:
        outs = backend.generate([GenerationRequest(p) for p in PROMPTS], cfg, batch_size=4)
    finally:
        backend.eos_ids = saved
    assert outs[0].stop_reason == "eos"
    for f, o in zip(free, outs):
        ids = f.token_ids.tolist()
        cut = ids.index(stop_tok) + 1 if stop_tok in ids else len(ids)
        assert o.token_ids.tolist() == ids[:cut]
        assert o.stop_reason == ("eos" if stop_tok in ids else "length")


def test_sampling_reproducible_and_batch_independent(backend):
    cfg = DecodingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    reqs = [GenerationRequest(p, seed=i) for i, p in enumerate(PROMPTS)]
    a = backend.generate(reqs, cfg, batch_size=4)
    b = backend.generate(reqs, cfg, batch_size=1)
    assert [x.token_ids.tolist() for x in a] == [x.token_ids.tolist() for x in b]
    c = backend.generate(reqs, DecodingConfig(max_new_tokens=10, temperature=1.0, seed=8))
    assert [x.token_ids.tolist() for x in a] != [x.token_ids.tolist() for x in c]


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, top_k=2)).tolist() == [[False, False, True, True]]
    kept = ~torch.isinf(filter_top_k_top_p(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(filter_top_k_top_p(logits, top_p=0.01))).sum() == 1


def test_context_and_config_errors(backend):
    with pytest.raises(ContextLengthError, match="exceeds the model's context"):
        backend.generate([GenerationRequest("x " * 600)], DecodingConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(top_p=0.0)


def test_cost_formula():
    assert call_cost(100, 3, 7) == 2 * 100 * 10


@pytest.mark.slow
def test_nf4_real_model_answers():
    pytest.importorskip("bitsandbytes")
    b = TransformersBackend("zoo:smollm2-135m-instruct", quantisation="nf4")
    assert b.info.quantisation == "nf4" and b.info.non_embedding_params == 106_203_456
    out = b.generate([GenerationRequest("What is the capital of France?")],
                     DecodingConfig(max_new_tokens=12))[0]
    assert "Paris" in out.text
