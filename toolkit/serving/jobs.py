"""What travels through the engine: a request (``Job``), its result, and the helpers around
them (kept apart from ``engine.py`` so the engine module holds only the scheduling)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from toolkit.cascade.live import StageTrace
from toolkit.cascade.live_routing import Route
from toolkit.cascade.stopping import History, StoppingPolicy
from toolkit.generation.base import GenerationOutput, GenerationRequest, Messages


@dataclass
class JobResult:
    text: str
    stopped_at_stage: int
    stage_probabilities: list[float]
    latency_ms: float
    cost_flops: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the model ended, or a stop string) | "length"
    trace: list[dict[str, Any]]
    logprobs: list[dict[str, Any]] | None = None
    """Per-token entries (``outputs.token_logprobs``) when the request asked for them."""
    route: dict[str, Any] | None = None
    """``Route.to_dict()`` of a routed request (routing bundles), else None."""


@dataclass
class Job:
    """One request travelling through the stages."""

    prompt: str | Messages
    max_tokens: int
    temperature: float
    top_p: float
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    events: asyncio.Queue | None = None
    """Stream events ("delta", text) / ("end", JobResult) / ("error", message), or None."""
    seed: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    enqueued: float = 0.0
    stage: int = 0
    history: History = ()
    traces: list[StageTrace] = field(default_factory=list)
    cancelled: bool = False
    sent_text: str = ""
    first_token_s: float | None = None
    policy: StoppingPolicy | None = None
    """This request's side of the bundle's policy (``policy.for_key``), fixed at submit."""
    stop: tuple[str, ...] = ()
    """Stop strings: the returned text ends before the first one (``outputs.py``)."""
    top_logprobs: int | None = None
    """None: no log-probs; else return them with this many top alternatives per token."""
    route: Route | None = None
    """Where the router sent it (routing bundles); its cell is the policy group."""
    group: str = ""


@dataclass
class Session:
    """One stage's running batch under join admission."""

    stage: int
    key: tuple[float, float]
    """(temperature, top_p): one decode loop samples with one setting."""
    jobs: list[Job]
    """Jobs in the order the decode loop numbers them (the first batch, then joiners)."""
    settled: set[int]
    steps: Iterator[list[tuple[int, GenerationOutput]]]


def sampling_key(job: Job) -> tuple[float, float]:
    return job.temperature, job.top_p


def generation_requests(jobs: list[Job]) -> list[GenerationRequest]:
    return [GenerationRequest(j.prompt, seed=j.seed, max_new_tokens=j.max_tokens) for j in jobs]


def resolve_future(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
