"""Decoding policies for masked-diffusion LMs: what the one decoding loop asks at every step.

A policy keeps one :class:`RowState` per batch row and answers the loop
(:func:`toolkit.dllm.decoding.decode`): where the current block is (``begin_block`` /
``end_block``, which may adapt), which forward a row needs (``plan``: full, optionally keeping
K/V, or cached, recomputing only some answer spans), which masked positions of the block to
commit (``select``, batched over rows with tensor ops), and the step's statistics
(``observe``: tokens committed, their confidence, the candidates' mean entropy), and when the
block is over (``block_done``). Spans are relative to the answer's start.

Two options depart from the published samplers and are therefore off in ``llada`` and
``fastdllm``, whose defaults follow the published ``generate`` (ML-GSAI/LLaDA, NVlabs/Fast-dLLM):

* ``exclude_mask_token``: set the mask token's logit to −∞ before the argmax and the softmax.
  The published loops allow the mask token as the prediction: "committing" it leaves the
  position masked, and the confidence is the plain softmax probability. Excluding it
  guarantees that every commit unmasks a position, so a threshold policy always progresses
  (the published ``while`` loop of Fast-dLLM never ends when, greedily, the only committed
  prediction is the mask token).
* ``skip_empty_steps`` (``llada``): end a block as soon as it has no mask left, skipping the
  scheduled steps that would commit nothing; the published loop runs (and counts) them.

Where the published loops are undefined the policies do this: ``llada`` ends a block after its
scheduled steps, and masks left in it stay in the answer; a threshold policy (``fastdllm``,
``adaptive``, the peers) stops a block after as many forwards as the block has positions and
marks the row ``stalled`` (greedy decoding that has not finished a block by then repeats the
same forward forever in the published loop).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from toolkit.common.errors import UserError

Span = tuple[int, int]


class DecodeInputError(UserError, ValueError):
    """Bad decoding input (lengths, steps, settings, model, prompt): a ``ValueError`` for
    library callers, and one ``error: ...`` line from ``cli.py`` (a ``UserError``)."""


@dataclass(frozen=True)
class Plan:
    """The forward a row needs for this step. Rows with equal plans share one forward.

    Attributes:
        full: Run the whole sequence (prompt and answer).
        spans: For a cached forward, the answer spans whose tokens are recomputed (queries and
            fresh K/V); every other slot is read from the cache.
        store_cache: For a full forward, keep its K/V as the row's cache.
        shadow: For a full forward, also run a masked copy of this answer span whose
            predictions verify the tokens drafted there (see :meth:`Policy.verify`).
    """

    full: bool
    spans: tuple[Span, ...] = ()
    store_cache: bool = False
    shadow: Span | None = None


@dataclass
class RowState:
    """Everything a policy remembers about one batch row (never shared between rows)."""

    gen_length: int
    block_start: int = 0
    block_end: int = 0
    step_in_block: int = 0
    schedule: list[int] = field(default_factory=list)
    block_size: int = 0
    tau: float = 0.0
    has_cache: bool = False
    steps_since_refresh: int = 0
    stable: list[Span] = field(default_factory=list)
    recent: Span | None = None
    block_conf_sum: float = 0.0
    block_committed: int = 0
    conf_window: deque[float] = field(default_factory=deque)
    block_sizes: list[int] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    adaptations: int = 0
    stalled: bool = False
    last_accepted: int = 0  # tokens drafted by the previous step of this block (wino)


def _ranks(conf: Tensor, cand: Tensor) -> Tensor:
    """Rank (0 = most confident) of every candidate within its row; non-candidates rank last."""
    score = conf.masked_fill(~cand, -math.inf)
    order = score.argsort(dim=-1, descending=True, stable=True)
    cols = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, cols)


def select_top_k(conf: Tensor, cand: Tensor, k: Tensor) -> Tensor:
    """Commit the ``k[r]`` most confident candidates of each row ``r``."""
    return cand & (_ranks(conf, cand) < k[:, None])


def select_threshold(conf: Tensor, cand: Tensor, tau: Tensor) -> Tensor:
    """Commit every candidate with confidence ≥ ``tau[r]``, and always the most confident one."""
    return cand & ((conf >= tau[:, None]) | (_ranks(conf, cand) == 0))


def select_factor(conf: Tensor, cand: Tensor, factor: float) -> Tensor:
    """Fast-dLLM's factor rule: commit the n most confident candidates while (n+1)(1-c_n) < f.

    With c_1 ≥ c_2 ≥ … the candidates' sorted confidences, n grows while the n-th one still
    satisfies c_n ≥ 1 - f/(n+1) (the first is always committed), so more tokens go together
    only when all of them are near-certain.
    """
    score = conf.masked_fill(~cand, -math.inf)
    ordered = score.sort(dim=-1, descending=True).values
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=conf.dtype)
    ok = ordered >= 1.0 - factor / (n + 1.0)
    ok[:, 0] = True
    count = ok.long().cumprod(-1).sum(-1).minimum(cand.sum(-1))
    return select_top_k(conf, cand, count)


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    out: list[list[int]] = []
    for s, e in sorted(sp for sp in spans if sp[1] > sp[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def _check_cache(cache: str) -> None:
    if cache not in ("none", "prefix", "dual"):
        raise DecodeInputError(f"cache must be 'none', 'prefix' or 'dual', got {cache!r}")


class Policy(ABC):
    """Base class; see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    needs_entropy: ClassVar[bool] = False
    uses_shadow: ClassVar[bool] = False
    #: See the module docstring; every concrete policy declares it as a field.
    exclude_mask_token: bool = False

    @property
    def random_confidence(self) -> bool:
        """Whether commits are ranked by uniform noise instead of the predicted probability."""
        return False

    @property
    def uses_cache(self) -> bool:
        """Whether any forward of this policy reads a KV cache."""
        return False

    def validate(self, gen_length: int) -> None:
        """Raise ``ValueError`` if this policy cannot decode ``gen_length`` tokens."""
        if gen_length < 1:
            raise DecodeInputError(f"gen_length must be ≥ 1, got {gen_length}")

    def new_state(self, gen_length: int) -> RowState:
        return RowState(gen_length=gen_length)

    def begin_block(self, st: RowState) -> None:
        """Open the block that starts where the previous one ended."""
        st.block_start = st.block_end
        st.block_end = min(st.gen_length, st.block_start + self.next_block_size(st))
        st.step_in_block = 0
        st.block_conf_sum, st.block_committed = 0.0, 0
        st.block_sizes.append(st.block_end - st.block_start)

    @abstractmethod
    def next_block_size(self, st: RowState) -> int: ...

    @abstractmethod
    def plan(self, st: RowState) -> Plan:
        """The forward this row needs now. Called exactly once per step and row."""

    @abstractmethod
    def select(self, states: list[RowState], conf: Tensor, cand: Tensor,
               entropy: Tensor | None = None) -> Tensor:
        """Which candidates (``cand``, ``(R, C)`` bool) to commit, given ``conf`` ``(R, C)``
        and, for policies with ``needs_entropy``, each position's entropy (nats)."""

    def verify(self, states: list[RowState], conf: Tensor, drafted: Tensor,
               accepted: Tensor) -> Tensor:
        """Which drafted tokens to re-mask, given their shadow copies' probabilities
        (``accepted``: tokens each row drafted in this same step).

        Called only for plans with a ``shadow`` span; the default keeps every token.
        """
        return torch.zeros_like(drafted)

    def observe(self, st: RowState, committed: int, conf_sum: float, entropy: float) -> None:
        """Record one step: tokens committed, their summed confidence, candidates' entropy."""
        st.step_in_block += 1
        st.block_committed += committed
        st.block_conf_sum += conf_sum

    def candidate_start(self, st: RowState) -> int:
        """Where (answer-relative) the masked positions this step may commit begin."""
        return st.block_start

    def block_done(self, st: RowState, masks_left: int) -> bool:
        """Whether the current block is over, after a step that left ``masks_left`` masks in it.

        Default (threshold policies): when no mask is left, or after as many forwards as the
        block has positions, which stalls the row (see the module docstring).
        """
        if masks_left == 0:
            return True
        if st.step_in_block >= self.max_block_forwards(st):
            st.stalled = True
            return True
        return False

    def max_block_forwards(self, st: RowState) -> int:
        """The stall cap: forwards a block may take before it is given up."""
        return st.block_end - st.block_start

    def step_budget(self, gen_length: int) -> int:
        """An upper bound on the steps of one row (the loop treats more as a bug)."""
        return gen_length

    def end_block(self, st: RowState) -> None:  # noqa: B027 (optional hook, default no-op)
        """Called when the current block is over."""

    def config(self) -> dict[str, Any]:
        """Settings for results files."""
        return {"policy": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class LLaDAPolicy(Policy):
    """The published LLaDA sampler: fixed blocks, fixed steps per block, linear schedule.

    Every step is one full forward (no cache). Within a block of ``block_length`` positions
    and ``steps / num_blocks`` steps, step i commits ``base + (i < rem)`` tokens where ``base``
    and ``rem`` are the quotient and remainder of the block's masked count by the steps; the
    committed tokens are the most confident masked ones (``low_confidence``) or uniformly
    random ones (``random``). As in the published ``generate``, the candidates are every
    masked answer position up to the block's end (a mask left in an earlier block competes
    again), a prediction may be the mask token (the position stays masked), and every
    scheduled step runs its forward, also when it commits nothing (``steps`` > block length);
    the block ends after its scheduled steps. ``skip_empty_steps`` and ``exclude_mask_token``
    are the departures described in the module docstring.
    """

    name: ClassVar[str] = "llada"
    steps: int | None = None
    block_length: int = 32
    remasking: str = "low_confidence"
    exclude_mask_token: bool = False
    skip_empty_steps: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise DecodeInputError(f"llada: steps must be ≥ 1, got {self.steps}")
        if self.remasking not in ("low_confidence", "random"):
            raise DecodeInputError("remasking must be 'low_confidence' or 'random', "
                             f"got {self.remasking!r}")

    @property
    def random_confidence(self) -> bool:
        return self.remasking == "random"

    def validate(self, gen_length: int) -> None:
        super().validate(gen_length)
        if self.block_length < 1 or gen_length % self.block_length:
            raise DecodeInputError(f"llada: gen_length {gen_length} must be a multiple of "
                             f"block_length {self.block_length}")
        num_blocks = gen_length // self.block_length
        steps = self.steps or gen_length
        if steps < num_blocks or steps % num_blocks:
            raise DecodeInputError(f"llada: steps {steps} must be a positive multiple of the "
                                   f"number of blocks {num_blocks} (gen_length / block_length)")

    def next_block_size(self, st: RowState) -> int:
        return self.block_length

    def begin_block(self, st: RowState) -> None:
        super().begin_block(st)
        # At a block's start all of it is masked: nothing outside the current block is ever
        # committed, so the masked count is the block's length.
        steps = (self.steps or st.gen_length) // (st.gen_length // self.block_length)
        base, rem = divmod(st.block_end - st.block_start, steps)
        st.schedule = [base + (i < rem) for i in range(steps)]

    def candidate_start(self, st: RowState) -> int:
        return 0

    def block_done(self, st: RowState, masks_left: int) -> bool:
        return (st.step_in_block >= len(st.schedule)
                or (self.skip_empty_steps and masks_left == 0))

    def step_budget(self, gen_length: int) -> int:
        return self.steps or gen_length

    def plan(self, st: RowState) -> Plan:
        return Plan(full=True)

    def select(self, states: list[RowState], conf: Tensor, cand: Tensor,
               entropy: Tensor | None = None) -> Tensor:
        k = [s.schedule[s.step_in_block] for s in states]
        return select_top_k(conf, cand, torch.tensor(k, device=conf.device))


class _CachedBlockPolicy(Policy):
    """Shared Fast-dLLM cache plan: one full refreshing forward per block, then cached steps."""

    cache: str

    @property
    def uses_cache(self) -> bool:
        return self.cache != "none"

    def _block_cache_plan(self, st: RowState) -> Plan:
        if self.cache == "none":
            return Plan(full=True)
        if st.step_in_block == 0:
            return Plan(full=True, store_cache=True)
        end = st.gen_length if self.cache == "prefix" else st.block_end
        return Plan(full=False, spans=((st.block_start, end),))


@dataclass
class FastDLLMPolicy(_CachedBlockPolicy):
    """Fast-dLLM: static blocks, threshold (or factor) parallel decoding, prefix/dual cache.

    Each block starts with a full forward that refreshes the cache and also decodes; later
    steps of the block recompute only the block and everything after it (``prefix``) or only
    the block (``dual``), reading the rest from the cache. ``threshold`` commits every masked
    position of the block with confidence ≥ τ (at least the most confident one); ``factor``
    (when given) uses :func:`select_factor` instead. As in the published ``generate``, the
    prediction may be the mask token and confidence is the plain softmax probability; a block
    that has not finished after ``block_length`` forwards is given up and the row marked
    ``stalled`` (the published loop would not end).
    """

    name: ClassVar[str] = "fastdllm"
    block_length: int = 32
    threshold: float = 0.9
    factor: float | None = None
    cache: str = "prefix"
    exclude_mask_token: bool = False

    def __post_init__(self) -> None:
        _check_cache(self.cache)

    def validate(self, gen_length: int) -> None:
        super().validate(gen_length)
        if self.block_length < 1 or gen_length % self.block_length:
            raise DecodeInputError(f"fastdllm: gen_length {gen_length} must be a multiple of "
                             f"block_length {self.block_length}")

    def next_block_size(self, st: RowState) -> int:
        return self.block_length

    def plan(self, st: RowState) -> Plan:
        return self._block_cache_plan(st)

    def select(self, states: list[RowState], conf: Tensor, cand: Tensor,
               entropy: Tensor | None = None) -> Tensor:
        if self.factor is not None:
            return select_factor(conf, cand, self.factor)
        tau = torch.full((conf.shape[0],), self.threshold, dtype=conf.dtype, device=conf.device)
        return select_threshold(conf, cand, tau)
