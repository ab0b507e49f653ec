"""The seed's self-correcting scheduler as a decoding policy (``adaptive``), with its presets.

See :class:`AdaptivePolicy`; the protocol it implements is in :mod:`toolkit.dllm.policies`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from toolkit.dllm.policies import (
    DecodeInputError,
    Plan,
    RowState,
    _CachedBlockPolicy,
    _check_cache,
    _merge,
    select_threshold,
)

PRESETS: dict[str, dict[str, Any]] = {
    "math": {"base_block_size": 8, "base_threshold": 0.9, "adaptation_rate": 0.1},
    "code": {"base_block_size": 16, "base_threshold": 0.8, "adaptation_rate": 0.2},
    "creative": {"base_block_size": 32, "base_threshold": 0.7, "adaptation_rate": 0.3},
}


@dataclass
class AdaptivePolicy(_CachedBlockPolicy):
    """The seed's self-correcting scheduler, with every component switchable for ablation.

    * ``dynamic_block``: when a block ends, the mean of the last ``confidence_window`` steps'
      mean committed confidence moves the next block size: above ``confidence_high`` it grows
      to ``round(B·(1+rate))`` (at least B+1), below ``confidence_low`` it shrinks to
      ``round(B·(1-rate))`` (at least B-1), clamped to [min_block_size, max_block_size].
    * ``adaptive_threshold``: after each step, the candidates' mean entropy (nats) above
      ``entropy_threshold_high`` multiplies τ by ``1 + rate/2`` (safer), below
      ``entropy_threshold_low`` by ``1 - rate/2`` (more parallel), clamped to
      [min_threshold, max_threshold]. Commits use the threshold rule with the row's τ.
    * ``tiered_cache``: one full forward at the start (tier 1: the prompt's K/V are never
      recomputed again). A finished block whose mean commit confidence is ≥
      ``tier2_stability_threshold`` joins tier 2 (stable), else it stays in tier 3 for the next
      block, then joins tier 2. Each step recomputes tier 3 (the current block and the recent
      uncertain one); every ``tier2_update_interval`` steps it also recomputes tier 2 and the
      still-masked suffix. Without it, ``cache`` selects Fast-dLLM's per-block refresh.

    ``memory_efficiency_mode`` is accepted for the seed's API and recorded; it changes
    nothing here, as all K/V live in one preallocated buffer either way.
    ``exclude_mask_token`` is on by default (the seed's scheduler never predicts the mask
    token, so every step unmasks at least one position); it has no fixed step schedule, so
    there are no empty steps to skip.
    """

    name: ClassVar[str] = "adaptive"
    needs_entropy: ClassVar[bool] = True
    base_block_size: int = 16
    min_block_size: int = 8
    max_block_size: int = 64
    base_threshold: float = 0.8
    min_threshold: float = 0.7
    max_threshold: float = 0.95
    adaptation_rate: float = 0.2
    entropy_threshold_high: float = 2.0
    entropy_threshold_low: float = 0.5
    confidence_high: float = 0.9
    confidence_low: float = 0.7
    confidence_window: int = 5
    dynamic_block: bool = True
    adaptive_threshold: bool = True
    tiered_cache: bool = True
    tier2_stability_threshold: float = 0.85
    tier2_update_interval: int = 3
    memory_efficiency_mode: bool = False
    cache: str = "prefix"
    exclude_mask_token: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_block_size <= self.base_block_size <= self.max_block_size:
            raise DecodeInputError(f"need 1 ≤ min_block_size {self.min_block_size} ≤ "
                                   f"base_block_size {self.base_block_size} ≤ max_block_size "
                                   f"{self.max_block_size}")
        if not 0.0 < self.min_threshold <= self.base_threshold <= self.max_threshold:
            raise DecodeInputError(f"need 0 < min_threshold {self.min_threshold} ≤ base_threshold "
                             f"{self.base_threshold} ≤ max_threshold {self.max_threshold}")
        if self.confidence_window < 1 or self.tier2_update_interval < 1:
            raise DecodeInputError("confidence_window and tier2_update_interval must be ≥ 1")
        _check_cache(self.cache)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> AdaptivePolicy:
        """Build from one of :data:`PRESETS` (math / code / creative), then ``overrides``."""
        if preset not in PRESETS:
            raise DecodeInputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    @property
    def uses_cache(self) -> bool:
        return self.tiered_cache or self.cache != "none"

    def new_state(self, gen_length: int) -> RowState:
        return RowState(gen_length=gen_length, block_size=self.base_block_size,
                        tau=self.base_threshold,
                        conf_window=deque(maxlen=self.confidence_window))

    def next_block_size(self, st: RowState) -> int:
        return st.block_size

    def plan(self, st: RowState) -> Plan:
        if not self.tiered_cache:
            return self._block_cache_plan(st)
        if not st.has_cache:
            st.has_cache = True
            st.steps_since_refresh = 0
            return Plan(full=True, store_cache=True)
        spans = [(st.block_start, st.block_end)]
        if st.recent is not None:
            spans.append(st.recent)
        st.steps_since_refresh += 1
        if st.steps_since_refresh >= self.tier2_update_interval:
            st.steps_since_refresh = 0
            spans += st.stable + [(st.block_end, st.gen_length)]
        return Plan(full=False, spans=_merge(spans))

    def select(self, states: list[RowState], conf: Tensor, cand: Tensor,
               entropy: Tensor | None = None) -> Tensor:
        tau = torch.tensor([s.tau for s in states], dtype=conf.dtype, device=conf.device)
        return select_threshold(conf, cand, tau)

    def observe(self, st: RowState, committed: int, conf_sum: float, entropy: float) -> None:
        super().observe(st, committed, conf_sum, entropy)
        if committed:
            st.conf_window.append(conf_sum / committed)
        if self.adaptive_threshold and not math.isnan(entropy):
            step = self.adaptation_rate / 2
            if entropy > self.entropy_threshold_high:
                tau = min(self.max_threshold, st.tau * (1 + step))
            elif entropy < self.entropy_threshold_low:
                tau = max(self.min_threshold, st.tau * (1 - step))
            else:
                tau = st.tau
            st.adaptations += tau != st.tau
            st.tau = tau
        st.thresholds.append(st.tau)

    def end_block(self, st: RowState) -> None:
        span = (st.block_start, st.block_end)
        if self.tiered_cache:
            if st.recent is not None:
                st.stable.append(st.recent)
                st.recent = None
            mean_conf = st.block_conf_sum / max(st.block_committed, 1)
            if mean_conf >= self.tier2_stability_threshold:
                st.stable.append(span)
            else:
                st.recent = span
            st.stable = list(_merge(st.stable))
        if self.dynamic_block and st.conf_window:
            avg = sum(st.conf_window) / len(st.conf_window)
            b = st.block_size
            if avg > self.confidence_high:
                b = min(self.max_block_size, max(b + 1, round(b * (1 + self.adaptation_rate))))
            elif avg < self.confidence_low:
                b = max(self.min_block_size, min(b - 1, round(b * (1 - self.adaptation_rate))))
            st.adaptations += b != st.block_size
            st.block_size = b
