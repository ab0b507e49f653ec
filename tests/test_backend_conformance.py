"""One conformance suite for every generation backend installed here.

transformers always runs (tiny random model); vLLM runs wherever `vllm` imports (GPU servers)
and is skipped here, where it cannot be installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from toolkit.generation.base import DecodingConfig, GenerationBackend, GenerationRequest

BACKENDS = ["transformers", pytest.param("vllm", marks=[pytest.mark.gpu, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")])]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_lm):
    if request.param == "transformers":
        from toolkit.generation.hf_backend import TransformersBackend

        return TransformersBackend(str(tiny_lm))
    from toolkit.generation.vllm_backend import VLLMBackend

    return VLLMBackend(str(tiny_lm), gpu_memory_utilization=0.3)


def test_protocol_and_identity(backend):
    assert isinstance(backend, GenerationBackend)
    assert backend.info.non_embedding_params > 0 and backend.info.vocab_size > 0


def test_outputs_in_order_with_consistent_fields(backend):
    prompts = ["hello", "def add(a, b):", "The answer is 42. Answer:"]
    cfg = DecodingConfig(max_new_tokens=6, top_logprobs=3)
    outs = backend.generate([GenerationRequest(p) for p in prompts], cfg, batch_size=2)
    assert len(outs) == 3
    for p, o in zip(prompts, outs):
        assert o.prompt_tokens == backend.count_tokens(p, cfg)
        assert 1 <= o.generated_tokens <= 6 and o.stop_reason in ("eos", "length")
        assert o.top_logprobs.shape == (o.generated_tokens, 3)
        assert np.all(o.token_logprobs <= o.top1_logprobs + 1e-4)
        assert np.all(o.top1_logprobs <= 1e-6)
        # Greedy: the chosen token is the top-1 token.
        np.testing.assert_array_equal(o.token_ids, o.top_ids[:, 0])
    again = backend.generate([GenerationRequest(p) for p in prompts], cfg, batch_size=3)
    assert [o.token_ids.tolist() for o in outs] == [o.token_ids.tolist() for o in again]
