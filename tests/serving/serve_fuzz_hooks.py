"""Schemathesis hooks for the server fuzz test.

Loaded with ``SCHEMATHESIS_HOOKS=tests.serving.serve_fuzz_hooks``.

One check replaces schemathesis' ``positive_data_acceptance``: a schema-valid request must be
answered with 2xx, with the documented exceptions the schema cannot state: a 400 whose code is
``prompt_too_long`` or ``context_length_exceeded`` (tokens depend on the tokenizer) and a 413
for a body over the byte limit (a schema bounds each field, not their sum). Any other refusal
of schema-valid data is a failure.
"""

from __future__ import annotations

import schemathesis

TOKEN_LIMIT_CODES = ("prompt_too_long", "context_length_exceeded")


@schemathesis.check
def valid_data_answered(ctx, response, case) -> bool | None:  # noqa: ANN001
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if 200 <= response.status_code < 300:
        return None
    code = None
    if response.status_code == 400:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
    if code in TOKEN_LIMIT_CODES or response.status_code == 413:
        return None
    raise AssertionError(f"schema-valid request refused: {response.status_code} "
                         f"{response.text[:300]}")
