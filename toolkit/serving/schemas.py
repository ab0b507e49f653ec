"""Request and response bodies (they also make the OpenAPI schema at ``/openapi.json``).

Request fields are strict: a string where a number belongs is refused (422) rather than
coerced, so client bugs surface. Unknown fields are ignored, because OpenAI clients send many
options this server does not act on (``presence_penalty``, ``user``, …).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateRequest(_Body):
    """The seed's ``POST /generate`` body."""

    prompt: StrictStr = Field(description="User text (the chat template is applied).")
    max_tokens: StrictInt | None = Field(None, description="New-token budget (server default "
                                         "and limit apply).")
    temperature: Number | None = Field(None, description="0 = greedy (the calibrated default).")
    top_p: Number | None = Field(None, description="Nucleus mass in (0, 1].")


class CascadeInfo(BaseModel):
    """The extra ``cascade`` field of OpenAI-style responses: which stage answered and why."""

    stopped_at_stage: int = Field(description="0-based stage whose answer was returned.")
    stage_model: str = Field(description="Slug of that stage's model.")
    stage_probabilities: list[float] = Field(description="Predicted acceptance of each stage "
                                             "run, in order.")
    latency_ms: float
    cost_flops: float = Field(description="2 · non-embedding params · tokens, summed over the "
                              "stages run.")


class GenerateResponse(BaseModel):
    output: str
    stopped_at_stage: int
    latency_ms: float
    stage_probabilities: list[float]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_flops: float


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _OpenAIRequest(_Body):
    model: StrictStr | None = Field(None, description="Ignored: the server serves one cascade.")
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, description="Only 1 is supported.")


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = Field(None, description="Alias of max_tokens.")


class CompletionRequest(_OpenAIRequest):
    prompt: StrictStr = Field(description="One prompt string, used as the user turn.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: dict[str, str]
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    cascade: CascadeInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: Any = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    cascade: CascadeInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
