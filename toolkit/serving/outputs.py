"""What a client sees of an answer: cut at its ``stop`` strings, with optional log-probs.

Stop strings end the returned text (OpenAI semantics: the text before the first occurrence of
any of them, the stop string itself excluded, ``finish_reason: "stop"``). While streaming, the
tail of the text that could still become a stop string is held back until it cannot.

Log-probs are those the decode loop recorded for every generated token: the chosen token's
and the top-k (k = the bundle's ``top_logprobs``) under the model's untempered distribution.
Only the tokens that make up the returned text are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred."""
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:first], True) if first >= 0 else (text, False)


def streamable(text: str, stops: Sequence[str]) -> str:
    """The prefix of a growing text that is certain to be returned: cut at a stop string, and
    short of any tail that is the beginning of one (the next tokens may complete it)."""
    cut, hit = cut_at_stop(text, stops)
    if hit:
        return cut
    hold = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold]


def token_logprobs(ids: np.ndarray, chosen: np.ndarray | None, top_ids: np.ndarray | None,
                   top_lp: np.ndarray | None, n_top: int, text_len: int,
                   decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
    """Per-token entries for the tokens that start within the first ``text_len`` characters
    (so neither the end-of-sequence token nor tokens after a stop string).

    Each entry: ``token`` (its text), ``logprob``, ``offset`` (where it starts in the text),
    ``top`` ([(token text, logprob)] of the ``n_top`` most likely tokens).
    """
    if chosen is None:
        return []
    out, offset = [], 0
    for i, tok in enumerate(ids.tolist()):
        if offset >= text_len:
            break
        piece = decode([tok])
        top = []
        if n_top and top_ids is not None and top_lp is not None:
            top = [(decode([int(t)]), float(lp))
                   for t, lp in zip(top_ids[i][:n_top], top_lp[i][:n_top])]
        out.append({"token": piece, "logprob": float(chosen[i]), "offset": offset, "top": top})
        offset = len(decode(ids[:i + 1].tolist()))
    return out


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion shape (``choices[0].logprobs``)."""

    def one(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]),
                         "top_logprobs": [one(t, lp) for t, lp in e["top"]]} for e in entries]}


def completion_logprobs(entries: list[dict[str, Any]], with_top: bool) -> dict[str, Any]:
    """The legacy completions shape (``choices[0].logprobs``)."""
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries] if with_top else None,
            "text_offset": [e["offset"] for e in entries]}
