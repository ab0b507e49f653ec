"""Training-free peers of the adaptive scheduler, as policies of the same decoding loop.

Both are written from the papers' descriptions (not from their code) and run in
:func:`toolkit.dllm.decoding.decode` with the same NFE accounting as every other policy:

* ``eb``: entropy-bounded unmasking (Ben-Hamu et al., 2025, "Accelerated Sampling from Masked
  Diffusion Models via Entropy Bounded Unmasking"). Each step sorts the block's masked
  positions by confidence and unmasks them in that order while the summed entropy of the
  unmasked set stays within the bound γ (``gamma``, nats); at least one position per step.
  Blocks and caches as Fast-dLLM (``block_length``, ``cache``).
* ``wino``: wide-in, narrow-out revocable decoding (Hong et al., 2025, WINO). Each step drafts
  every masked position of the block whose confidence reaches the low ``draft_threshold``
  (at least the most confident one), and in the same forward verifies the tokens drafted
  earlier: a masked copy of the block (the shadow block) predicts each position from its
  context without the token drafted there, and a drafted token whose probability under that
  prediction is below the higher ``verify_threshold`` is masked again. Full forwards (no KV
  cache); each step is one forward of the sequence plus the block's copy, counted as one.
  ``progress_guard`` (on by default) adds what WINO's released code does and the paper does
  not describe: at most min(max(⌊0.7 · masked⌋, 5), 20) drafts a step (the most confident);
  no re-masking in a step that drafted only one token; and when as many tokens would be
  re-masked as the previous step drafted (30 at a block's first step, as there), only the
  previous count − 1 least confident ones are. Without it (``progress_guard=False``, the
  description alone) a token the model predicts at a confidence between the two thresholds
  is drafted and revoked forever; on the shipped model that stalled 21-57% of rows.

Like ``fastdllm``, both allow the mask token as the prediction by default
(``exclude_mask_token``) and give a block up after a cap of forwards (``eb``: the block's
length; ``wino``: twice that, since revoked tokens are decoded again), marking the row
``stalled``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from toolkit.dllm.policies import (
    DecodeInputError,
    Plan,
    Policy,
    RowState,
    _CachedBlockPolicy,
    _check_cache,
    _ranks,
    select_threshold,
    select_top_k,
)


def select_entropy_bounded(conf: Tensor, cand: Tensor, entropy: Tensor, gamma: float) -> Tensor:
    """Commit each row's most confident candidates while their summed entropy stays ≤ γ.

    With candidates in decreasing confidence, n is the largest count whose first n entropies
    sum to at most ``gamma``, and at least 1.
    """
    ranks = _ranks(conf, cand)
    order = ranks.argsort(dim=-1)  # column of rank 0, 1, ...
    ent = torch.where(cand, entropy, torch.zeros_like(entropy)).gather(-1, order)
    ok = ent.cumsum(-1) <= gamma
    ok[:, 0] = True
    count = ok.long().cumprod(-1).sum(-1).minimum(cand.sum(-1))
    return select_top_k(conf, cand, count)


class _FixedBlocks(Policy):
    block_length: int

    def validate(self, gen_length: int) -> None:
        super().validate(gen_length)
        if self.block_length < 1 or gen_length % self.block_length:
            raise DecodeInputError(f"{self.name}: gen_length {gen_length} must be a multiple "
                                   f"of block_length {self.block_length}")

    def next_block_size(self, st: RowState) -> int:
        return self.block_length


@dataclass
class EntropyBoundedPolicy(_FixedBlocks, _CachedBlockPolicy):
    """Entropy-bounded unmasking (EB-sampler); see the module docstring."""

    name: ClassVar[str] = "eb"
    needs_entropy: ClassVar[bool] = True
    block_length: int = 32
    gamma: float = 0.1
    cache: str = "prefix"
    exclude_mask_token: bool = False

    def __post_init__(self) -> None:
        _check_cache(self.cache)
        if self.gamma < 0:
            raise DecodeInputError(f"eb: gamma must be ≥ 0, got {self.gamma}")

    def plan(self, st: RowState) -> Plan:
        return self._block_cache_plan(st)

    def select(self, states: list[RowState], conf: Tensor, cand: Tensor,
               entropy: Tensor | None = None) -> Tensor:
        assert entropy is not None, "the loop passes entropies to policies that need them"
        return select_entropy_bounded(conf, cand, entropy, self.gamma)


@dataclass
class WinoPolicy(_FixedBlocks):
    """Wide-in, narrow-out revocable decoding (WINO-style); see the module docstring."""

    name: ClassVar[str] = "wino"
    uses_shadow: ClassVar[bool] = True
    block_length: int = 32
    draft_threshold: float = 0.6
    verify_threshold: float = 0.9
    exclude_mask_token: bool = False
    progress_guard: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.draft_threshold <= self.verify_threshold:
            raise DecodeInputError("wino: need 0 ≤ draft_threshold ≤ verify_threshold, got "
                                   f"{self.draft_threshold} and {self.verify_threshold}")

    def plan(self, st: RowState) -> Plan:
        return Plan(full=True, shadow=(st.block_start, st.block_end))

    def select(self, states: list[RowState], conf: Tensor, cand: Tensor,
               entropy: Tensor | None = None) -> Tensor:
        tau = torch.full((conf.shape[0],), self.draft_threshold, dtype=conf.dtype,
                         device=conf.device)
        chosen = select_threshold(conf, cand, tau)
        if not self.progress_guard:
            return chosen
        cap = (cand.sum(-1) * 0.7).long().clamp(min=5).clamp(max=20)
        return select_top_k(conf, cand, chosen.sum(-1).minimum(cap))

    def verify(self, states: list[RowState], conf: Tensor, drafted: Tensor,
               accepted: Tensor) -> Tensor:
        remask = drafted & (conf < self.verify_threshold)
        if not self.progress_guard:
            return remask
        last = torch.tensor([s.last_accepted if s.step_in_block else 30 for s in states],
                            device=conf.device)
        for s, n in zip(states, accepted.tolist()):
            s.last_accepted = int(n)
        remask &= (accepted > 1)[:, None]
        # As many as the previous step drafted: keep only the (previous - 1) least confident.
        over = remask.sum(-1) >= last
        if over.any():
            low = select_top_k(-conf, remask, (last - 1).clamp(min=0))
            remask = torch.where(over[:, None], low, remask)
        return remask

    def max_block_forwards(self, st: RowState) -> int:
        return 2 * (st.block_end - st.block_start)

    def step_budget(self, gen_length: int) -> int:
        return 2 * gen_length
