"""Requests that join a running batch (``DecodeLoop.steps`` with ``admit``) decode exactly as
they would alone: same tokens under greedy decoding, same seeded samples, same log-probs.

The reference is each prompt decoded solo (batch of one, no padding, no joins), so the test
checks the cache merging, padding and buffer growth of mid-batch admission against the
plainest possible run.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.generation.base import DecodingConfig, GenerationRequest

PROMPTS = ["Q1?", "Write a haiku about the sea.", "red green blue red green", "0 1 2",
           "The answer is", "def add(a, b):", "twice that number playing volleyball"]


@pytest.fixture(scope="module")
def backend(tiny_lm):
    from toolkit.generation.hf_backend import TransformersBackend

    return TransformersBackend(str(tiny_lm), dtype="float64")


def _joined(backend, config, budgets, schedule, max_active):
    """Start with PROMPTS[0]; from step s on, offer the prompts schedule[s] names (first come,
    first served, as many as the loop has free slots for)."""
    waiting = sorted((s, i) for s, ix in schedule.items() for i in ix)
    order, outs, state = [0], {}, {"step": 0, "running_at_join": []}

    def admit(free):
        take = [(s, i) for s, i in waiting if s <= state["step"]][:free]
        for item in take:
            waiting.remove(item)
        if take:
            state["running_at_join"].append(len(order) - len(outs))
        order.extend(i for _, i in take)
        return [GenerationRequest(PROMPTS[i], seed=i, max_new_tokens=budgets[i])
                for _, i in take]

    first = [GenerationRequest(PROMPTS[0], seed=0, max_new_tokens=budgets[0])]
    for finished in backend.generate_steps(first, config, batch_size=max_active, admit=admit):
        state["step"] += 1
        for r, out in finished:
            outs[order[r]] = out
    assert not waiting
    return outs, state["running_at_join"]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_joined_requests_match_solo_runs(backend, temperature):
    config = DecodingConfig(max_new_tokens=12, temperature=temperature, top_p=0.95)
    budgets = [12, 9, 12, 5, 12, 7, 10]
    solo = {i: backend.generate([GenerationRequest(p, seed=i, max_new_tokens=budgets[i])],
                                config, batch_size=1)[0] for i, p in enumerate(PROMPTS)}
    # Joins at steps 2, 3 and 6, more than the free slots at once (they wait for a slot).
    outs, running = _joined(backend, config, budgets, {2: [1, 2], 3: [3, 4, 5], 6: [6]},
                            max_active=3)
    assert sorted(outs) == list(range(len(PROMPTS)))
    assert max(running) >= 1  # requests really joined a batch that was decoding
    for i, out in outs.items():
        ref = solo[i]
        assert out.token_ids.tolist() == ref.token_ids.tolist(), i
        assert out.text == ref.text and out.stop_reason == ref.stop_reason
        np.testing.assert_allclose(out.token_logprobs, ref.token_logprobs, atol=1e-6)
        np.testing.assert_array_equal(out.top_ids, ref.top_ids)


def test_steps_without_admit_equal_run(backend):
    config = DecodingConfig(max_new_tokens=8)
    reqs = [GenerationRequest(p, seed=i) for i, p in enumerate(PROMPTS)]
    plain = backend.generate(reqs, config, batch_size=3)
    seen = {}
    for finished in backend.generate_steps(reqs, config, batch_size=3):
        for r, out in finished:
            assert r not in seen
            seen[r] = out
    assert [seen[i].token_ids.tolist() for i in range(len(reqs))] == [
        o.token_ids.tolist() for o in plain]
