"""The server's front door: API key, body size, status counting, and JSON errors.

Auth and the body limit run in an ASGI middleware, before FastAPI parses anything, so a
request without a valid key gets 401 whatever its body, and an oversized body is refused from
its ``Content-Length`` (or while it streams in) without being read into memory. Every error,
ours or the framework's, leaves as ``{"error": {"message", "type", "param", "code"}}`` (the
OpenAI shape, which the ``openai`` client turns into its exceptions), and no stack trace ever
reaches a client: unexpected exceptions are logged and answered with a generic 500.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.serving.schemas import BAD_REQUEST_ERRORS
from toolkit.serving.stats import ServerStats

log = logging.getLogger("toolkit.serving")
GENERATION_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions")
OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error",
               503: "overloaded_error", 504: "timeout_error", 500: "server_error"}


class ApiError(Exception):
    """An error answered as JSON with a status code (and optional headers)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: API key, body-size limit, response counting for generation paths."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 stats: ServerStats) -> None:
        self.app, self.api_key, self.max_body, self.stats = app, api_key, max_body_bytes, stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start" and path in GENERATION_PATHS:
                self.stats.response(path, message["status"])
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.api_key and path not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            if not auth:
                await _reply(counted_send, 401, "missing API key: send the header "
                             "'Authorization: Bearer <key>'", code="missing_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
                return
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                await _reply(counted_send, 401, "invalid API key", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _reply(counted_send, 413, f"request body of {length} bytes exceeds the "
                         f"limit of {self.max_body} bytes", code="body_too_large")
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, counted_send)
        except _BodyTooLarge:
            await _reply(counted_send, 413, f"request body exceeds the limit of "
                         f"{self.max_body} bytes", code="body_too_large")


async def _reply(send: Any, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _loc(loc: tuple) -> str:
    """``messages.0.content`` from pydantic's location, without the union members' tags
    (``str``, ``list[TextPart]``, ``function-after[...]``)."""
    parts = [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "none")))]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param, err.code),
                            status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            reason = (bad_json.get("ctx") or {}).get("error", bad_json.get("msg", ""))
            return JSONResponse(error_body(400, f"malformed JSON body: {reason}",
                                           code="invalid_json"), status_code=400)
        if any(e.get("loc") == ("body",) and e.get("type") == "missing" for e in errors):
            return JSONResponse(error_body(422, "request body is missing: send a JSON object",
                                           param="body", code="missing_body"), status_code=422)
        # Invalid Unicode, unsupported options and unknown fields are 400s (the request is
        # well-formed but asks for something this server will not do); the rest, 422.
        refused = [e for e in errors if e.get("type") in BAD_REQUEST_ERRORS]
        status, shown = (400, refused) if refused else (422, errors)
        msgs = [f"{_loc(e['loc'])}: " + ("unknown field: not supported by this server"
                                         if e.get("type") == "extra_forbidden" else e["msg"])
                for e in shown]
        first = shown[0]
        return JSONResponse(error_body(status, "; ".join(msgs), param=_loc(first["loc"]),
                                       code=str(first.get("type"))), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if isinstance(err.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            return _invalid_utf8(err.__cause__)
        return JSONResponse(error_body(err.status_code, str(err.detail)),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error (see the server log)"),
                            status_code=500)


def _invalid_utf8(err: UnicodeDecodeError) -> JSONResponse:
    """A 400 naming the field whose text is not valid UTF-8 (raw bytes such as a UTF-8-encoded
    surrogate ``\\xed\\xa0\\x80``): the body is decoded again with the bad bytes escaped to
    lone surrogates, and the first string holding one is named."""
    where = f"byte {err.start} of the body"
    try:
        body = json.loads(bytes(err.object).decode("utf-8", "surrogateescape"))
    except ValueError:
        return JSONResponse(error_body(400, f"body is not valid UTF-8 ({where})",
                                       "body", "invalid_unicode"), status_code=400)
    path = _surrogate_path(body) or ["body"]
    param = ".".join(str(p) for p in path)
    return JSONResponse(error_body(400, f"{param}: text is not valid UTF-8 ({where})", param,
                                   "invalid_unicode"), status_code=400)


def _surrogate_path(value: Any, path: list[Any] | None = None) -> list[Any] | None:
    """The path (keys and indices) of the first string with a lone surrogate, or None."""
    path = path or []
    if isinstance(value, str):
        return path if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else None
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        if isinstance(key, str) and _surrogate_path(key) is not None:
            return [*path, key]
        found = _surrogate_path(item, [*path, key])
        if found is not None:
            return found
    return None
