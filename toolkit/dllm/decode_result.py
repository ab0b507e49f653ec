"""What one :func:`toolkit.dllm.decoding.decode` call returns, and how two calls compare."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor


@dataclass
class DecodeResult:
    """Outputs and honest accounting of one :func:`decode` call (lists are per row).

    ``sequences`` is the left-padded ``(B, P + G)`` batch, ``answers`` its last G columns.
    ``commit_nfe[r, i]`` is the forward (1-based, per row) that committed answer position i,
    0 where the EOS stop filled it. ``positions_computed`` / ``positions_cached`` count, over
    all forwards, real positions recomputed versus read from the KV cache.
    """

    sequences: Tensor
    answers: Tensor
    prompt_lengths: list[int]
    gen_length: int
    policy: dict[str, Any]
    nfe_full: list[int]
    nfe_cached: list[int]
    batch_forwards_full: int
    batch_forwards_cached: int
    tokens_per_step: list[list[int]]
    block_sizes: list[list[int]]
    thresholds: list[list[float]]
    adaptations: list[int]
    positions_computed: list[int]
    positions_cached: list[int]
    answer_tokens: list[int]
    stopped_at_eos: list[bool]
    stalled: list[bool]
    masks_left: list[int]
    remasked: list[int]
    commit_nfe: Tensor
    wall_time_s: float

    @property
    def nfe(self) -> list[int]:
        """Sequence forwards per row, full plus cached."""
        return [f + c for f, c in zip(self.nfe_full, self.nfe_cached)]

    @property
    def batch_nfe(self) -> int:
        """Model calls made for the whole batch."""
        return self.batch_forwards_full + self.batch_forwards_cached

    @property
    def cache_hit_rate(self) -> float:
        """Fraction of (row, position) evaluations read from a cache instead of recomputed."""
        total = sum(self.positions_computed) + sum(self.positions_cached)
        return sum(self.positions_cached) / total if total else 0.0

    @property
    def mean_block_size(self) -> float:
        sizes = [b for row in self.block_sizes for b in row]
        return sum(sizes) / len(sizes) if sizes else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        steps = [n for row in self.tokens_per_step for n in row]
        return sum(steps) / len(steps) if steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Answer tokens (prompt excluded, EOS fill excluded) per wall second."""
        return sum(self.answer_tokens) / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def metrics(self) -> dict[str, Any]:
        """A JSON-friendly summary: every per-row list and scalar, plus the derived rates."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if not isinstance(getattr(self, f.name), Tensor)}
        derived = ("nfe", "batch_nfe", "cache_hit_rate", "mean_block_size",
                   "mean_tokens_per_step", "tokens_per_second")
        out.update({name: getattr(self, name) for name in derived})
        out["total_adaptations"] = sum(self.adaptations)
        out["total_stalled"] = sum(self.stalled)
        return out


def compare(baseline: DecodeResult, candidate: DecodeResult) -> dict[str, float]:
    """Speed-up of ``candidate`` over ``baseline``: wall time ratio and NFE reduction."""
    base_nfe = sum(baseline.nfe) / len(baseline.nfe)
    cand_nfe = sum(candidate.nfe) / len(candidate.nfe)
    return {
        "speedup": baseline.wall_time_s / candidate.wall_time_s
        if candidate.wall_time_s > 0 else math.inf,
        "nfe_reduction_percent": 100.0 * (1.0 - cand_nfe / base_nfe) if base_nfe else 0.0,
        "nfe_ratio": base_nfe / cand_nfe if cand_nfe else math.inf,
        "baseline_nfe": base_nfe, "candidate_nfe": cand_nfe,
        "baseline_tokens_per_second": baseline.tokens_per_second,
        "candidate_tokens_per_second": candidate.tokens_per_second,
    }
