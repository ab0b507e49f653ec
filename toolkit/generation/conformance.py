"""The generation-backend conformance checks, as plain functions (no pytest needed).

``tests/shared/test_backend_conformance.py`` runs them on every backend installed here, and
``benchmarks/gpu_check.py`` runs them on CUDA where pytest may be missing. Each check takes a
backend and raises ``AssertionError`` saying what broke; add new checks here, not in the test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.generation.base import DecodingConfig, GenerationBackend, GenerationRequest


def check_protocol_and_identity(backend: Any) -> None:
    assert isinstance(backend, GenerationBackend), f"{type(backend).__name__} breaks the protocol"
    assert backend.info.non_embedding_params > 0 and backend.info.vocab_size > 0, backend.info


def check_outputs_in_order_with_consistent_fields(backend: Any) -> None:
    prompts = ["hello", "def add(a, b):", "The answer is 42. Answer:"]
    cfg = DecodingConfig(max_new_tokens=6, top_logprobs=3)
    outs = backend.generate([GenerationRequest(p) for p in prompts], cfg, batch_size=2)
    assert len(outs) == 3, f"{len(outs)} outputs for 3 requests"
    for p, o in zip(prompts, outs):
        assert o.prompt_tokens == backend.count_tokens(p, cfg), (p, o.prompt_tokens)
        assert 1 <= o.generated_tokens <= 6 and o.stop_reason in ("eos", "length"), o
        assert o.top_logprobs.shape == (o.generated_tokens, 3), o.top_logprobs.shape
        assert np.all(o.token_logprobs <= o.top1_logprobs + 1e-4), "chosen above top-1"
        assert np.all(o.top1_logprobs <= 1e-6), "a log-probability above 0"
        # Greedy: the chosen token is the top-1 token.
        np.testing.assert_array_equal(o.token_ids, o.top_ids[:, 0])
    again = backend.generate([GenerationRequest(p) for p in prompts], cfg, batch_size=3)
    assert [o.token_ids.tolist() for o in outs] == [o.token_ids.tolist() for o in again], \
        "greedy answers depend on the batch size"


CHECKS: dict[str, Callable[[Any], None]] = {
    "protocol_and_identity": check_protocol_and_identity,
    "outputs_in_order_with_consistent_fields": check_outputs_in_order_with_consistent_fields,
}
