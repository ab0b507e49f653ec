"""What every generation backend takes and returns (one protocol, several engines).

The cascade, the q* sampler and the server all talk to a backend through these types, so a
record written by the transformers backend and one written by vLLM on a GPU server carry the
same fields. Per-token arrays are numpy arrays; ``to_record`` turns them into JSON lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from toolkit.common.errors import UserError

Messages = list[dict[str, str]]


@dataclass
class DecodingConfig:
    """How to decode. Greedy when ``temperature`` is 0 (the labelling and serving default)."""

    max_new_tokens: int = 320
    """Upper bound on generated tokens per request."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off); applied after temperature."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0 = off)."""
    seed: int = 0
    """Base seed; request i samples from a generator seeded by (seed, request seed or i)."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template (user turn + generation prompt)."""
    system_prompt: str | None = None
    """Optional system message placed before the user turn."""
    top_logprobs: int = 5
    """How many top log-probs to record per generated token (0 = none)."""
    token_stats: bool = True
    """Record per-token log-prob, top-1 log-prob, full-distribution entropy and top-k."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One prompt: plain user text, or chat messages."""

    prompt: str | Messages
    seed: int | None = None
    """Per-request seed (e.g. a sample index); the position in the call when None."""
    max_new_tokens: int | None = None
    """Overrides DecodingConfig.max_new_tokens for this request."""


@dataclass
class GenerationOutput:
    """A finished request. Log-probs come from the model's untempered, untruncated distribution."""

    text: str
    token_ids: np.ndarray
    prompt_tokens: int
    stop_reason: str
    """'eos' (the model ended its answer), 'length' (max_new_tokens reached) or 'cancelled'
    (abandoned by the caller's ``on_step`` hook: the client went away)."""
    wall_s: float
    """Seconds from the start of the batch until this request finished."""
    token_logprobs: np.ndarray | None = None
    top1_logprobs: np.ndarray | None = None
    entropies: np.ndarray | None = None
    """Entropy (nats) of the full next-token distribution at each generated position."""
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return int(len(self.token_ids))

    def token_arrays(self) -> dict[str, list]:
        """Per-token arrays as JSON-ready lists (floats rounded to 5 decimals)."""
        out: dict[str, list] = {"token_ids": self.token_ids.tolist()}
        for name in ("token_logprobs", "top1_logprobs", "entropies", "top_logprobs"):
            arr = getattr(self, name)
            if arr is not None:
                out[name] = np.round(arr.astype(np.float64), 5).tolist()
        if self.top_ids is not None:
            out["top_ids"] = self.top_ids.tolist()
        return out


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, copied into every record and results.json."""

    name: str
    """The spec the user gave: zoo:<slug>, a path or a hub id."""
    slug: str
    sha256: str | None
    path: str
    non_embedding_params: int
    quantisation: str
    vocab_size: int
    backend: str


@runtime_checkable
class GenerationBackend(Protocol):
    """The one interface the cascade, q* and the server generate through."""

    info: ModelInfo
    feature_schemas: tuple[str, ...]
    """The predictor feature schemas (``FeatureSchema.id``) this backend's outputs can feed."""

    def generate(self, requests: Sequence[GenerationRequest], config: DecodingConfig,
                 batch_size: int = 8) -> list[GenerationOutput]:
        """Generate for every request, in order, batching ``batch_size`` at a time."""
        ...

    def count_tokens(self, prompt: str | Messages, config: DecodingConfig) -> int:
        """Prompt length in tokens after the chat template."""
        ...


def call_cost(non_embedding_params: int, prompt_tokens: int, generated_tokens: int) -> float:
    """FLOPs of one model call: 2 · N_non-embedding · (prompt + generated tokens) (SPEC §D2)."""
    return 2.0 * non_embedding_params * (prompt_tokens + generated_tokens)


class UnservableSchemaError(UserError, ValueError):
    """A predictor needs features that a backend cannot give."""


def check_feature_schema(backend: Any, schema_id: str) -> None:
    """Refuse a backend (instance or class) that does not declare ``schema_id`` among its
    ``feature_schemas``: its outputs lack what the predictor reads (e.g. vLLM: no hidden
    states, no full-distribution entropy)."""
    served = tuple(getattr(backend, "feature_schemas", ()))
    if schema_id not in served:
        name = getattr(backend, "name", type(backend).__name__)
        raise UnservableSchemaError(
            f"the {name} backend cannot serve feature schema {schema_id} (it serves "
            f"{', '.join(served) or 'none'}); fall back to topk-v1 (a predictor trained with "
            "--data.schema topk)")
