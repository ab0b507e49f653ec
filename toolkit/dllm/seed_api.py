"""The seed's Python API (SPEC §C) as thin wrappers over :func:`toolkit.dllm.decoding.decode`.

Names, arguments, defaults and return values follow the seed; all the work happens in the one
decoding loop with :class:`~toolkit.dllm.adaptive_policy.AdaptivePolicy` (or the static Fast-dLLM
policy for the comparison baseline). ``output`` is the prompt followed by the answer, shape
``(B, prompt_len + gen_length)`` (prompts of different lengths are left-padded). ``nfe`` is the
row's count of forwards for one prompt, and the number of batched model calls for several.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from toolkit.dllm.adaptive_policy import AdaptivePolicy
from toolkit.dllm.decoding import DecodeResult, compare, decode
from toolkit.dllm.policies import FastDLLMPolicy


class AdaptiveInferenceScheduler:
    """The seed's scheduler settings: dynamic block size and entropy-adapted threshold.

    Args:
        min_block_size: Smallest block.
        max_block_size: Largest block.
        base_confidence_threshold: Starting τ.
        adaptation_sensitivity: How far each adaptation moves (the policy's adaptation rate).
        entropy_threshold_high: Mean entropy above which τ rises (safer).
        entropy_threshold_low: Mean entropy below which τ falls (more parallel).
        confidence_window: Steps averaged to judge a block's confidence.
        base_block_size: Starting block size (not in the seed's signature; default 16).
    """

    def __init__(self, min_block_size: int = 8, max_block_size: int = 64,
                 base_confidence_threshold: float = 0.8, adaptation_sensitivity: float = 0.2,
                 entropy_threshold_high: float = 2.0, entropy_threshold_low: float = 0.5,
                 confidence_window: int = 5, base_block_size: int = 16):
        self.min_block_size = min_block_size
        self.max_block_size = max_block_size
        self.base_confidence_threshold = base_confidence_threshold
        self.adaptation_sensitivity = adaptation_sensitivity
        self.entropy_threshold_high = entropy_threshold_high
        self.entropy_threshold_low = entropy_threshold_low
        self.confidence_window = confidence_window
        self.base_block_size = base_block_size

    def to_policy(self, cache_manager: TieredCacheManager | None = None) -> AdaptivePolicy:
        """The equivalent policy; without a cache manager the tiered cache is off."""
        base_b = min(max(self.base_block_size, self.min_block_size), self.max_block_size)
        tau = self.base_confidence_threshold
        cm = cache_manager
        return AdaptivePolicy(
            base_block_size=base_b, min_block_size=self.min_block_size,
            max_block_size=self.max_block_size, base_threshold=tau,
            min_threshold=min(0.7, tau), max_threshold=max(0.95, tau),
            adaptation_rate=self.adaptation_sensitivity,
            entropy_threshold_high=self.entropy_threshold_high,
            entropy_threshold_low=self.entropy_threshold_low,
            confidence_window=self.confidence_window, tiered_cache=cm is not None,
            tier2_stability_threshold=cm.tier2_stability_threshold if cm else 0.85,
            tier2_update_interval=cm.tier2_update_interval if cm else 3,
            memory_efficiency_mode=cm.memory_efficiency_mode if cm else False)


class TieredCacheManager:
    """The seed's tiered-cache settings (tier 1 frozen prompt, tier 2 stable, tier 3 active).

    Args:
        tier2_stability_threshold: Mean commit confidence at which a block becomes stable.
        tier2_update_interval: Steps between refreshes of the stable tier.
        memory_efficiency_mode: Recorded only (see :class:`AdaptivePolicy`).
    """

    def __init__(self, tier2_stability_threshold: float = 0.85, tier2_update_interval: int = 3,
                 memory_efficiency_mode: bool = False):
        self.tier2_stability_threshold = tier2_stability_threshold
        self.tier2_update_interval = tier2_update_interval
        self.memory_efficiency_mode = memory_efficiency_mode


def _seed_metrics(result: DecodeResult) -> dict[str, Any]:
    """The seed's metrics dictionary, plus the loop's full accounting under ``decode``."""
    single = len(result.nfe) == 1
    return {
        "nfe": result.nfe[0] if single else result.batch_nfe,
        "total_adaptations": sum(result.adaptations),
        "avg_block_size": result.mean_block_size,
        "cache_efficiency": {
            "cache_hit_rate": result.cache_hit_rate,
            "positions_cached": sum(result.positions_cached),
            "positions_computed": sum(result.positions_computed),
        },
        "tokens_per_second": result.tokens_per_second,
        "wall_time_s": result.wall_time_s,
        "decode": result.metrics(),
    }


def _run(model: Any, prompt: Tensor | list, gen_length: int, policy: Any, verbose: bool,
         decode_kwargs: dict[str, Any]) -> tuple[Tensor, DecodeResult]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    result = decode(model, prompt, gen_length, policy, **decode_kwargs)
    if verbose:
        print(f"[{policy.name}] nfe={result.nfe} adaptations={sum(result.adaptations)} "
              f"avg_block={result.mean_block_size:.1f} cache_hit={result.cache_hit_rate:.1%} "
              f"wall={result.wall_time_s:.3f}s")
    return result.sequences, result


def generate_with_adaptive_scheduling(
        model: Any, prompt: Tensor | list, gen_length: int = 128, base_block_size: int = 16,
        base_confidence_threshold: float = 0.8, adaptation_rate: float = 0.2,
        enable_tiered_cache: bool = True, verbose: bool = False,
        **decode_kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
    """Adaptive decoding with the seed's knobs.

    Returns:
        ``(output, metrics)`` with metrics ``nfe``, ``total_adaptations``, ``avg_block_size``,
        ``cache_efficiency.cache_hit_rate`` (and more).
    """
    scheduler = AdaptiveInferenceScheduler(
        min_block_size=min(8, base_block_size), max_block_size=max(64, base_block_size),
        base_confidence_threshold=base_confidence_threshold,
        adaptation_sensitivity=adaptation_rate, base_block_size=base_block_size)
    cache_manager = TieredCacheManager() if enable_tiered_cache else None
    output, result = _run(model, prompt, gen_length, scheduler.to_policy(cache_manager),
                          verbose, decode_kwargs)
    return output, _seed_metrics(result)


def generate_adaptive(model: Any, prompt: Tensor | list, gen_length: int = 128,
                      verbose: bool = False, **kwargs: Any) -> tuple[Tensor, int]:
    """Adaptive decoding with default (or given seed-style) settings; returns ``(output, nfe)``."""
    output, metrics = generate_with_adaptive_scheduling(model, prompt, gen_length,
                                                        verbose=verbose, **kwargs)
    return output, metrics["nfe"]


def generate_with_custom_scheduler(
        model: Any, prompt: Tensor | list, scheduler: AdaptiveInferenceScheduler,
        cache_manager: TieredCacheManager | None = None, gen_length: int = 128,
        verbose: bool = False, **decode_kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
    """Adaptive decoding with explicit scheduler and cache settings.

    Returns ``(output, metrics)``."""
    output, result = _run(model, prompt, gen_length, scheduler.to_policy(cache_manager),
                          verbose, decode_kwargs)
    return output, _seed_metrics(result)


def compare_generation_methods(model: Any, prompt: Tensor | list, gen_length: int = 128,
                               verbose: bool = False, **decode_kwargs: Any) -> dict[str, Any]:
    """Static Fast-dLLM (B 32, τ 0.9, prefix cache) against the adaptive defaults.

    Returns:
        ``speedup`` (baseline wall / adaptive wall), ``nfe_reduction_percent``, and both
        methods' metrics and outputs.
    """
    base_out, base = _run(model, prompt, gen_length, FastDLLMPolicy(32, 0.9, cache="prefix"),
                          verbose, decode_kwargs)
    policy = AdaptiveInferenceScheduler().to_policy(TieredCacheManager())
    adapt_out, adapt = _run(model, prompt, gen_length, policy, verbose, decode_kwargs)
    return {**compare(base, adapt), "baseline": _seed_metrics(base),
            "adaptive": _seed_metrics(adapt), "baseline_output": base_out,
            "adaptive_output": adapt_out}
