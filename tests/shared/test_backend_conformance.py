"""One conformance suite for every generation backend installed here.

transformers always runs (tiny random model); vLLM runs wherever `vllm` imports (GPU servers)
and is skipped here, where it cannot be installed. The checks themselves live in
``toolkit/generation/conformance.py`` (plain functions, so ``benchmarks/gpu_check.py`` runs them
on CUDA without pytest).
"""

from __future__ import annotations

import importlib.util

import pytest

from toolkit.generation.conformance import CHECKS

BACKENDS = ["transformers", pytest.param("vllm", marks=[pytest.mark.gpu, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")])]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_lm):
    if request.param == "transformers":
        from toolkit.generation.hf_backend import TransformersBackend

        return TransformersBackend(str(tiny_lm))
    from toolkit.generation.vllm_backend import VLLMBackend

    return VLLMBackend(str(tiny_lm), gpu_memory_utilization=0.3)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(backend, check):
    CHECKS[check](backend)
