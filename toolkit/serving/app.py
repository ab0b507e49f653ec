"""The FastAPI app: the seed's ``/generate``, OpenAI-compatible completions, stats and health.

Every generation request is checked completely before it is queued (types, empty prompt, the
prompt's length in tokens under every stage's tokenizer, ``max_tokens`` range, the models'
context windows), because a queued request shares a micro-batch with others: nothing a client
sends may fail a batch. Then the request waits for its answer with a per-request timeout
(504). A full queue answers 503 with ``Retry-After``.

OpenAI compatibility: ``/v1/chat/completions`` and ``/v1/completions`` return the OpenAI
shapes, plus one extra field ``cascade`` (``CascadeInfo``: the stage that answered, its model,
the stage probabilities, latency, cost). With ``stream: true`` they send server-sent events;
text reaches the client only once it is certain to be returned (see ``engine.py``), and the
last chunk before ``[DONE]`` carries ``finish_reason`` and ``cascade``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from toolkit.generation.base import Messages
from toolkit.serving.engine import CascadeEngine, Job, JobResult
from toolkit.serving.guard import ApiError, Guard, error_body, install_error_handlers
from toolkit.serving.schemas import (
    CascadeInfo,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
)


@dataclass
class Limits:
    """What one request may ask for (the serve config's values)."""

    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1_000_000


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 503, 504)}


def create_app(engine: CascadeEngine, limits: Limits, api_key: str | None,
               model_name: str = "cascade", info: dict[str, Any] | None = None) -> FastAPI:
    """Build the app around a (not yet started) engine; the app's lifespan runs the engine."""
    stats = engine.stats
    backends = engine.cascade.backends
    context = min(getattr(b, "context_length", 1 << 30) for b in backends)
    seq = {"n": 0}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # uvicorn gets here after the in-flight requests finished (graceful)
            await asyncio.to_thread(engine.shutdown, 30.0)
            done = stats.snapshot()["requests"]
            print(f"shutdown: engine stopped; {done['ok']} requests answered, "
                  f"{done['in_flight']} left in flight", file=sys.stderr, flush=True)

    app = FastAPI(title="Adaptive cascade server", lifespan=lifespan, version="1",
                  description="Serves a cascade bundle: small models answer first, a learned "
                              "predictor and an optimal stopping policy decide when to "
                              "escalate. See the `cascade` field of completions.")
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       stats=stats)

    # ------------------------------------------------------------ admission
    def make_job(prompt: str | Messages, max_tokens: int | None, temperature: float | None,
                 top_p: float | None, stream: bool) -> Job:
        budget = limits.default_max_tokens if max_tokens is None else max_tokens
        if budget <= 0:
            raise ApiError(422, f"max_tokens must be a positive integer, got {budget}",
                           "max_tokens", "invalid_max_tokens")
        if budget > limits.max_tokens_limit:
            raise ApiError(422, f"max_tokens {budget} exceeds this server's limit of "
                           f"{limits.max_tokens_limit}", "max_tokens", "max_tokens_too_large")
        temp = limits.default_temperature if temperature is None else float(temperature)
        if not 0 <= temp <= 2:
            raise ApiError(422, f"temperature must be in [0, 2], got {temp}", "temperature")
        nucleus = limits.default_top_p if top_p is None else float(top_p)
        if not 0 < nucleus <= 1:
            raise ApiError(422, f"top_p must be in (0, 1], got {nucleus}", "top_p")
        n_tokens = max(b.count_tokens(prompt, engine.cascade.decoding) for b in backends)
        if n_tokens > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {n_tokens} tokens long, over this server's limit "
                           f"of {limits.max_prompt_tokens}", "prompt", "prompt_too_long")
        if n_tokens + budget > context:
            raise ApiError(400, f"prompt of {n_tokens} tokens + max_tokens {budget} exceeds "
                           f"the models' context of {context}", "max_tokens",
                           "context_length_exceeded")
        loop = asyncio.get_running_loop()
        seq["n"] += 1
        return Job(prompt, budget, temp, nucleus, loop, loop.create_future(),
                   asyncio.Queue() if stream else None, seed=seq["n"])

    def check_text(text: str, param: str) -> None:
        if not text.strip():
            raise ApiError(422, f"{param} must not be empty", param, "empty_prompt")

    def submit(job: Job) -> None:
        if not engine.submit(job):
            retry = max(1, round((stats.snapshot()["latency_ms"]["p50"] or 1000) / 1000))
            raise ApiError(503, f"server busy: {engine.max_queue} requests already queued or "
                           "running; retry later", code="queue_full",
                           headers={"Retry-After": str(retry)})

    async def answer(job: Job) -> JobResult:
        submit(job)
        try:
            return await asyncio.wait_for(job.done, limits.request_timeout_s)
        except TimeoutError:
            engine.cancel(job)
            raise ApiError(504, f"no answer within the request timeout of "
                           f"{limits.request_timeout_s:g} s", code="timeout") from None
        except RuntimeError as err:
            raise ApiError(500, str(err)) from None

    def cascade_info(r: JobResult) -> CascadeInfo:
        return CascadeInfo(stopped_at_stage=r.stopped_at_stage,
                           stage_model=backends[r.stopped_at_stage].info.slug,
                           stage_probabilities=r.stage_probabilities,
                           latency_ms=r.latency_ms, cost_flops=r.cost_flops)

    def usage(r: JobResult) -> dict[str, int]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    # ----------------------------------------------------------------- routes
    @app.post("/generate", response_model=GenerateResponse, responses=ERRORS,
              summary="The seed's endpoint: run the cascade on one prompt")
    async def generate(body: GenerateRequest) -> GenerateResponse:
        check_text(body.prompt, "prompt")
        r = await answer(make_job(body.prompt, body.max_tokens, body.temperature, body.top_p,
                                  False))
        return GenerateResponse(output=r.text, stopped_at_stage=r.stopped_at_stage,
                                latency_ms=r.latency_ms,
                                stage_probabilities=r.stage_probabilities,
                                finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                                completion_tokens=r.completion_tokens, cost_flops=r.cost_flops)

    def openai_common(body: Any) -> None:
        if body.n != 1:
            raise ApiError(422, f"n must be 1 (got {body.n}): one answer per request", "n")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
              summary="OpenAI-compatible chat completion (plain or stream: true)")
    async def chat(body: ChatCompletionRequest) -> Any:
        openai_common(body)
        if not body.messages:
            raise ApiError(422, "messages must hold at least one message", "messages",
                           "empty_prompt")
        if not any(m.role == "user" and m.content.strip() for m in body.messages):
            raise ApiError(422, "messages must include a non-empty user message", "messages",
                           "empty_prompt")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        budget = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        job = make_job(messages, budget, body.temperature, body.top_p, body.stream)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return stream(job, cid, created, "chat.completion.chunk", body)
        r = await answer(job)
        return ChatCompletion(id=cid, created=created, model=model_name, usage=usage(r),
                              cascade=cascade_info(r), choices=[{
                                  "index": 0, "finish_reason": r.finish_reason,
                                  "message": {"role": "assistant", "content": r.text}}])

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS,
              summary="OpenAI-compatible text completion (the prompt is the user turn)")
    async def complete(body: CompletionRequest) -> Any:
        openai_common(body)
        check_text(body.prompt, "prompt")
        job = make_job(body.prompt, body.max_tokens, body.temperature, body.top_p, body.stream)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return stream(job, cid, created, "text_completion", body)
        r = await answer(job)
        return Completion(id=cid, created=created, model=model_name, usage=usage(r),
                          cascade=cascade_info(r), choices=[{
                              "index": 0, "text": r.text, "finish_reason": r.finish_reason}])

    def stream(job: Job, cid: str, created: int, kind: str, body: Any) -> StreamingResponse:
        submit(job)  # before the 200 goes out, so a full queue is still a 503
        chat_kind = kind == "chat.completion.chunk"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None = None, role: bool = False,
                  **extra: Any) -> str:
            if chat_kind:
                d: dict[str, str] = {"role": "assistant"} if role else {}
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish,
                          "logprobs": None}
            obj = {"id": cid, "object": kind, "created": created, "model": model_name,
                   "choices": [choice], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        async def events() -> AsyncIterator[str]:
            deadline = time.monotonic() + limits.request_timeout_s
            finished = False
            try:
                if chat_kind:
                    yield chunk("", role=True)
                while True:
                    try:
                        kind_, payload = await asyncio.wait_for(
                            job.events.get(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        yield f"data: {json.dumps(error_body(504, 'request timed out'))}\n\n"
                        return
                    if kind_ == "delta":
                        yield chunk(payload)
                    elif kind_ == "end":
                        extra = {"cascade": cascade_info(payload).model_dump()}
                        if include_usage:
                            extra["usage"] = usage(payload)
                        yield chunk(None if chat_kind else "", payload.finish_reason, **extra)
                        yield "data: [DONE]\n\n"
                        finished = True
                        return
                    else:
                        yield f"data: {json.dumps(error_body(500, payload))}\n\n"
                        finished = True
                        return
            finally:
                if not finished:  # timeout or the client went away
                    engine.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models", summary="The one model this server answers as")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "owned_by": "toolkit", "created": 0}]}

    @app.get("/stats", summary="Requests, stops per stage, latency percentiles, cost saved")
    async def get_stats() -> dict[str, Any]:
        return {**stats.snapshot(), "bundle": info or {}}

    @app.get("/metrics", response_class=PlainTextResponse,
             summary="The same counters in Prometheus text format")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(stats.prometheus(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health", summary="Liveness: 200 while the engine thread runs")
    async def health() -> Any:
        alive = engine.thread is not None and engine.thread.is_alive() and not engine.stopping
        body = {"status": "ok" if alive else "unavailable",
                "stages": [b.info.slug for b in backends]}
        if not alive:
            from fastapi.responses import JSONResponse

            return JSONResponse(body, status_code=503)
        return body

    return app
