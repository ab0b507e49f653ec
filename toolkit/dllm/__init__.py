"""Diffusion-LLM decoding: a LLaDA-compatible model, one decoding loop, pluggable policies.

* :mod:`.llada_model`: :class:`LLaDAModelLM` (loads GSAI-ML LLaDA checkpoints strictly), with
  prefix and dual KV caches.
* :mod:`.decoding`: :func:`decode` (batching, early stop at EOS, accounting) and
  :func:`compare`.
* :mod:`.policies`: the policy protocol, ``llada`` (the published sampler) and ``fastdllm``
  (threshold/factor, prefix/dual cache); :mod:`.adaptive_policy`: ``adaptive`` (the seed's
  self-correcting scheduler, with :data:`PRESETS`); :mod:`.peer_policies`: ``eb``
  (entropy-bounded) and ``wino`` (revocable); :mod:`.registry`: every policy by name
  (:func:`make_policy`).
* :mod:`.curve`: accuracy under parallelism and the Pareto front (benchmarks).
* :mod:`.seed_api`: the seed's function and class names over the same loop.
"""

from toolkit.dllm.adaptive_policy import PRESETS, AdaptivePolicy
from toolkit.dllm.decoding import DecodeResult, compare, decode
from toolkit.dllm.llada_model import KVCache, LLaDAConfig, LLaDAModelLM, LLaDAOutput
from toolkit.dllm.peer_policies import EntropyBoundedPolicy, WinoPolicy
from toolkit.dllm.policies import FastDLLMPolicy, LLaDAPolicy, Plan, Policy, RowState
from toolkit.dllm.registry import POLICIES, make_policy
from toolkit.dllm.seed_api import (
    AdaptiveInferenceScheduler,
    TieredCacheManager,
    compare_generation_methods,
    generate_adaptive,
    generate_with_adaptive_scheduling,
    generate_with_custom_scheduler,
)

__all__ = [
    "POLICIES", "PRESETS", "AdaptiveInferenceScheduler", "AdaptivePolicy", "DecodeResult",
    "EntropyBoundedPolicy", "WinoPolicy",
    "FastDLLMPolicy", "KVCache", "LLaDAConfig", "LLaDAModelLM", "LLaDAOutput", "LLaDAPolicy",
    "Plan", "Policy", "RowState", "TieredCacheManager", "compare", "compare_generation_methods",
    "decode", "generate_adaptive", "generate_with_adaptive_scheduling",
    "generate_with_custom_scheduler", "make_policy",
]
