"""The FastAPI app: the seed's ``/generate``, OpenAI-compatible completions, stats and health.

Every generation request is checked completely before it is queued (the schema's types,
ranges and lengths, then the prompt's length in tokens under every stage's tokenizer and the
models' context windows), because a queued request shares a micro-batch with others: nothing a
client sends may fail a batch. Then the request waits for its answer with a per-request timeout
(504). A full queue answers 503 with ``Retry-After``. The request bodies are built from the
limits (``schemas.request_models``), so ``/openapi.json`` states every limit.

Options are honoured or refused, never dropped: ``stop``, ``seed``, ``logprobs`` /
``top_logprobs`` work as in the OpenAI API (see ``outputs.py``; ``top_logprobs`` alone turns
log-probs on; when streaming they come whole with the last chunk); what the server cannot do
(``n > 1``, tools, penalties, …) is a 400 that says so.

OpenAI compatibility: ``/v1/chat/completions`` and ``/v1/completions`` return the OpenAI
shapes, plus one extra field ``cascade`` (``CascadeInfo``: the stage that answered, its model,
the stage probabilities, latency, cost; from a routing bundle also ``route``: the entry
stage, router cell and router probabilities). With ``stream: true`` they send server-sent events;
text reaches the client only once it is certain to be returned (see ``engine.py``), and the
last chunk before ``[DONE]`` carries ``finish_reason`` and ``cascade``.
"""

# No ``from __future__ import annotations``: FastAPI reads the route bodies' annotations at
# runtime, and the request models are local to ``create_app`` (built from the limits).
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
from toolkit.serving.guard import (
    OPEN_PATHS,
    ApiError,
    Guard,
    error_body,
    install_error_handlers,
)
from toolkit.serving.outputs import chat_logprobs, completion_logprobs
from toolkit.serving.schemas import (
    CascadeInfo,
    ChatCompletion,
    Completion,
    ErrorResponse,
    GenerateResponse,
    message_text,
    request_models,
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
    max_messages: int = 256


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid or unsupported request: invalid "
          "Unicode, an unsupported option (code 'unsupported'), or a prompt over the token "
          "limit or the models' context (codes 'prompt_too_long', 'context_length_exceeded'), "
          "which the schema cannot state because tokens depend on the tokenizer."},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    413: {"model": ErrorResponse, "description": "Body over the server's byte limit."},
    422: {"model": ErrorResponse, "description": "The body does not match the schema."},
    503: {"model": ErrorResponse, "description": "Queue full; see Retry-After."},
    504: {"model": ErrorResponse, "description": "No answer within the request timeout."},
}

STREAMED: dict[int | str, dict[str, Any]] = {**ERRORS, 200: {
    "description": "The completion; with stream: true, server-sent events of chunks.",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "description": "One JSON chunk, then [DONE]."}}}}}}}


def _document_auth(app: FastAPI, required: bool) -> None:
    """State the Bearer key in /openapi.json (every path but the open ones needs it)."""
    if not required:
        return
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    op["security"] = [] if path in OPEN_PATHS else [{"bearer": []}]
                    if path not in OPEN_PATHS:
                        op.setdefault("responses", {}).setdefault("401", {
                            "description": "Missing or invalid API key.",
                            "content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/ErrorResponse"}}}})
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(engine: CascadeEngine, limits: Limits, api_key: str | None,
               model_name: str = "cascade", info: dict[str, Any] | None = None) -> FastAPI:
    """Build the app around a (not yet started) engine; the app's lifespan runs the engine."""
    stats = engine.stats
    backends = engine.cascade.backends
    # A routing bundle's embedding model reads every prompt too: its tokenizer and context
    # bound what a request may send, like the stages'.
    readers = backends + ([engine.cascade.router.embedder.backend]
                          if engine.cascade.router is not None else [])
    context = min(getattr(b, "context_length", 1 << 30) for b in readers)
    decoding = engine.cascade.decoding
    max_top = decoding.top_logprobs if decoding.token_stats else 0
    # A character takes at most 6 bytes in a JSON body (\uXXXX): a prompt one character over
    # max_prompt_chars still fits the body, so it is refused for its length (422), not 413.
    bodies = request_models(limits.max_tokens_limit, limits.max_body_bytes // 8,
                            limits.max_messages, max_top,
                            min_prompt_chars=0 if decoding.chat_template else 1)
    GenerateRequest, ChatCompletionRequest, CompletionRequest = (  # noqa: N806
        bodies.generate, bodies.chat, bodies.completion)
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
    _document_auth(app, api_key is not None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       stats=stats)

    # ------------------------------------------------------------ admission
    def make_job(prompt: str | Messages, body: Any, max_tokens: int | None,
                 top_logprobs: int | None = None) -> Job:
        """A checked job (the schema already checked types and ranges)."""
        param = "prompt" if isinstance(prompt, str) else "messages"
        budget = min(limits.default_max_tokens, limits.max_tokens_limit) if (
            max_tokens is None) else max_tokens
        temp = limits.default_temperature if body.temperature is None else body.temperature
        nucleus = limits.default_top_p if body.top_p is None else body.top_p
        if isinstance(prompt, list) and not decoding.chat_template:
            raise ApiError(400, "this bundle decodes without a chat template: send a plain "
                           "prompt to /v1/completions or /generate", param, "unsupported")
        try:
            n_tokens = max(b.count_tokens(prompt, decoding) for b in readers)
        except Exception as err:  # the chat template or tokenizer refused this input
            raise ApiError(400, f"{param} could not be tokenised: {err}", param,
                           "invalid_prompt") from None
        if n_tokens == 0:
            raise ApiError(400, f"{param} is no tokens at all", param, "empty_prompt")
        if n_tokens > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {n_tokens} tokens long, over this server's limit "
                           f"of {limits.max_prompt_tokens}", param, "prompt_too_long")
        if n_tokens + budget > context:
            raise ApiError(400, f"prompt of {n_tokens} tokens + max_tokens {budget} exceeds "
                           f"the models' context of {context}", "max_tokens",
                           "context_length_exceeded")
        stream = bool(getattr(body, "stream", False))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        loop = asyncio.get_running_loop()
        seq["n"] += 1
        return Job(prompt, budget, float(temp), float(nucleus), loop, loop.create_future(),
                   asyncio.Queue() if stream else None,
                   seed=seq["n"] if body.seed is None else body.seed, stop=tuple(stop),
                   top_logprobs=top_logprobs)

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
                           latency_ms=r.latency_ms, cost_flops=r.cost_flops, route=r.route)

    def usage(r: JobResult) -> dict[str, int]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    # ----------------------------------------------------------------- routes
    @app.post("/generate", response_model=GenerateResponse, responses=ERRORS,
              summary="The seed's endpoint: run the cascade on one prompt")
    async def generate(body: GenerateRequest) -> GenerateResponse:
        r = await answer(make_job(body.prompt, body, body.max_tokens))
        return GenerateResponse(output=r.text, stopped_at_stage=r.stopped_at_stage,
                                latency_ms=r.latency_ms,
                                stage_probabilities=r.stage_probabilities,
                                finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                                completion_tokens=r.completion_tokens, cost_flops=r.cost_flops,
                                route=r.route)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMED,
              summary="OpenAI-compatible chat completion (plain or stream: true)")
    async def chat(body: ChatCompletionRequest) -> Any:
        # 'developer' is OpenAI's newer name for 'system'; chat templates know 'system'.
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": message_text(m.content)} for m in body.messages]
        budget = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        job = make_job(messages, body, budget,
                       (body.top_logprobs or 0) if body.logprobs or body.top_logprobs
                       is not None else None)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return stream(job, cid, created, "chat.completion.chunk", body)
        r = await answer(job)
        return ChatCompletion(id=cid, created=created, model=model_name, usage=usage(r),
                              cascade=cascade_info(r), choices=[{
                                  "index": 0, "finish_reason": r.finish_reason,
                                  "message": {"role": "assistant", "content": r.text},
                                  "logprobs": None if r.logprobs is None
                                  else chat_logprobs(r.logprobs)}])

    @app.post("/v1/completions", response_model=Completion, responses=STREAMED,
              summary="OpenAI-compatible text completion (the prompt is the user turn)")
    async def complete(body: CompletionRequest) -> Any:
        job = make_job(body.prompt, body, body.max_tokens, body.logprobs)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return stream(job, cid, created, "text_completion", body)
        r = await answer(job)
        return Completion(id=cid, created=created, model=model_name, usage=usage(r),
                          cascade=cascade_info(r), choices=[{
                              "index": 0, "text": r.text, "finish_reason": r.finish_reason,
                              "logprobs": None if r.logprobs is None else completion_logprobs(
                                  r.logprobs, bool(body.logprobs))}])

    def stream(job: Job, cid: str, created: int, kind: str, body: Any) -> StreamingResponse:
        submit(job)  # before the 200 goes out, so a full queue is still a 503
        chat_kind = kind == "chat.completion.chunk"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None = None, role: bool = False,
                  logprobs: dict[str, Any] | None = None, **extra: Any) -> str:
            if chat_kind:
                d: dict[str, str] = {"role": "assistant"} if role else {}
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish,
                                          "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish,
                          "logprobs": logprobs}
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
                        # Log-probs, when asked for, come whole with the last chunk.
                        lp = None if payload.logprobs is None else (
                            chat_logprobs(payload.logprobs) if chat_kind else
                            completion_logprobs(payload.logprobs, bool(job.top_logprobs)))
                        yield chunk(None if chat_kind else "", payload.finish_reason,
                                    logprobs=lp, **extra)
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
