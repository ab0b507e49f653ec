"""Request and response bodies (they also make the OpenAPI schema at ``/openapi.json``).

The schema tells the truth: every limit the server enforces on a field is in it (ranges,
lengths, item counts, required fields), built from the serve config's limits by
``request_models``, so a client or fuzzer that sends a schema-valid body gets an answer. The
only refusals a schema cannot express are documented as responses: a prompt over the token
limit or the models' context (400 ``prompt_too_long`` / ``context_length_exceeded``; tokens
depend on the tokenizer), a body over the byte limit (413), a full queue (503) and a timeout
(504).

Request fields are strict: a string where a number belongs is refused rather than coerced, so
client bugs surface. Nothing is ignored silently: unknown fields are refused, and OpenAI
options this server cannot honour are accepted only at their neutral value (``n: 1``,
``presence_penalty: 0``, no ``tools``, …); anything else is a 400 ``unsupported`` naming the
field. Text must be valid Unicode: a lone UTF-16 surrogate (``"\\ud800"``) is a 400
``invalid_unicode`` naming the field, where it used to crash the tokenizer.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

BAD_REQUEST_ERRORS = ("invalid_unicode", "unsupported", "extra_forbidden")
"""Validation error types answered with 400 instead of 422 (see ``guard.py``)."""


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PydanticCustomError(
            "invalid_unicode", "text is not valid Unicode: lone UTF-16 surrogate "
            "{char} at position {pos}", {"char": repr(value[err.start])[1:-1], "pos": err.start}
        ) from None
    return value


def _only(neutral: Callable[[Any], bool], what: str) -> AfterValidator:
    """Accept only a field's neutral value; anything else is a 400 saying so."""

    def check(value: Any) -> Any:
        if value is not None and not neutral(value):
            raise PydanticCustomError("unsupported", what)
        return value

    return AfterValidator(check)


def _integral(value: Any) -> Any:
    """JSON Schema counts 7.0 as an integer; so does this server (strings stay refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Number = StrictFloat  # strict floats accept JSON integers, not strings or booleans
def integer(**limits: int) -> Any:
    """A strict integer within ``limits`` (ge, le) that also takes 7.0 (see ``_integral``).
    The limits sit on the integer itself so that they reach the JSON schema."""
    return Annotated[StrictInt, Field(**limits), BeforeValidator(_integral)]


Integer = integer()
# ±(2^53 - 1): every integer a JSON parser holds exactly, so a client comparing as floats and
# this server comparing as integers agree on which seeds are in range.
Seed = integer(ge=-(2**53 - 1), le=2**53 - 1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    """One part of a message's content given as a list (OpenAI); only text parts."""

    type: Literal["text"]
    text: Annotated[Text, Field(max_length=100_000)]


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ResponseFormat(_Body):
    type: Annotated[StrictStr, Field(json_schema_extra={"enum": ["text"]}), _only(
        lambda v: v == "text", "only plain text responses are supported")]


def _neutral(base: Any, schema: dict[str, Any], neutral: Callable[[Any], bool], what: str
             ) -> Any:
    """A field type accepted only at its neutral value (``schema`` states which)."""
    return Annotated[base, Field(json_schema_extra=schema), _only(neutral, what)]


@dataclass
class RequestModels:
    generate: type[BaseModel]
    chat: type[BaseModel]
    completion: type[BaseModel]


def request_models(max_tokens_limit: int, max_prompt_chars: int, max_messages: int,
                   max_top_logprobs: int, min_prompt_chars: int = 0) -> RequestModels:
    """The request bodies with this server's limits in their schema.

    Args:
        max_tokens_limit: most new tokens a request may ask for.
        max_prompt_chars: most characters of one prompt or message (an upper bound; the
            token limit is checked after tokenising). Keep it well under the body limit, so
            that a client over this limit hears about the field, not about the body size.
        max_messages: most messages in a chat request.
        max_top_logprobs: how many top log-probs per token the backend records.
        min_prompt_chars: 1 when prompts are not wrapped in a chat template (an empty prompt
            would be no tokens at all), else 0.
    """
    Budget = Annotated[integer(ge=1, le=max_tokens_limit) | None,
                       Field(description="New-token budget.")]
    Prompt = Annotated[Text, Field(min_length=min_prompt_chars, max_length=max_prompt_chars)]
    Temperature = Annotated[Annotated[Number, Field(ge=0, le=2)] | None, Field(
        description="0 = greedy (the calibrated default). Temperatures below "
        "2.2e-308 decode greedily, which is their exact limit.")]
    TopP = Annotated[Annotated[Number, Field(gt=0, le=1)] | None,
                     Field(description="Nucleus mass.")]
    StopText = Annotated[Text, Field(min_length=1, max_length=256)]
    Stop = Annotated[StopText | Annotated[list[StopText], Field(max_length=4)] | None, Field(
        description="Up to 4 strings; the answer ends before the first one it contains, with "
        "finish_reason 'stop'. The cascade decides on the full answer, as calibrated.")]
    SeedField = Annotated[Seed | None, Field(description="Sampling seed: the same seed, prompt "
                                             "and settings give the same answer.")]
    TopLogprobs = _neutral(
        Integer | None, {"minimum": 0, "maximum": max_top_logprobs},
        lambda v: 0 <= v <= max_top_logprobs,
        f"this server records the top {max_top_logprobs} log-probs per token: ask for 0 to "
        f"{max_top_logprobs}")
    Zero = _neutral(Number | None, {"minimum": 0, "maximum": 0}, lambda v: v == 0,
                    "not supported by this server (only 0)")
    Nothing = _neutral(list[Any] | None, {"maxItems": 0}, lambda v: not v,
                       "not supported by this server (only null or empty)")
    OnlyOne = _neutral(Integer, {"minimum": 1, "maximum": 1}, lambda v: v == 1,
                       "only n = 1 is supported: this server returns one answer per request")
    NoBias = _neutral(dict[str, Number] | None, {"maxProperties": 0}, lambda v: not v,
                      "logit_bias is not supported by this server")
    NoEcho = _neutral(StrictBool, {"enum": [False]}, lambda v: not v, "echo is not supported")
    BestOfOne = _neutral(Integer | None, {"minimum": 1, "maximum": 1}, lambda v: v == 1,
                         "only best_of = 1 is supported")
    NoSuffix = _neutral(StrictStr | None, {"maxLength": 0}, lambda v: not v,
                        "suffix is not supported")

    class GenerateRequest(_Body):
        """The seed's ``POST /generate`` body."""

        prompt: Prompt = Field(description="User text (the chat template is applied).")
        max_tokens: Budget = None
        temperature: Temperature = None
        top_p: TopP = None
        stop: Stop = None
        seed: SeedField = None

    class ChatMessage(_Body):
        role: Literal["system", "developer", "user", "assistant"] = Field(
            description="'developer' is the newer name of 'system' (sent as a system turn).")
        content: Prompt | Annotated[list[TextPart], Field(min_length=1, max_length=64)] = Field(
            description="A string, or a list of text parts that are joined.")
        name: Annotated[Text, Field(max_length=64)] | None = Field(
            None, description="Accepted for compatibility; chat templates do not use it.")

    class _OpenAIRequest(_Body):
        model: Annotated[Text, Field(max_length=256)] | None = Field(
            None, description="Ignored: the server serves one cascade.")
        max_tokens: Budget = None
        temperature: Temperature = None
        top_p: TopP = None
        stream: StrictBool = False
        stream_options: StreamOptions | None = None
        n: OnlyOne = 1
        stop: Stop = None
        seed: SeedField = None
        presence_penalty: Zero = None
        frequency_penalty: Zero = None
        logit_bias: NoBias = None
        user: Annotated[Text, Field(max_length=256)] | None = Field(
            None, description="End-user id: accepted for compatibility, not used.")

    class ChatCompletionRequest(_OpenAIRequest):
        messages: list[ChatMessage] = Field(min_length=1, max_length=max_messages)
        max_completion_tokens: Budget = Field(None, description="Alias of max_tokens.")
        logprobs: StrictBool = Field(False, description="Return the log-probs of the answer's "
                                     "tokens (the model's untempered distribution).")
        top_logprobs: TopLogprobs = Field(None, description="This many most likely tokens "
                                          "at each position (turns logprobs on).")
        tools: Nothing = None
        functions: Nothing = None
        tool_choice: Annotated[Literal["none"] | None, Field(
            description="Tools are not supported: only 'none'.")] = None
        function_call: Annotated[Literal["none"] | None, Field(
            description="Functions are not supported: only 'none'.")] = None
        parallel_tool_calls: StrictBool | None = Field(
            None, description="Accepted: without tools there is nothing to run in parallel.")
        response_format: ResponseFormat | None = None

    class CompletionRequest(_OpenAIRequest):
        prompt: Prompt = Field(description="One prompt string, used as the user turn.")
        logprobs: TopLogprobs = Field(None, description="Return the log-probs of the answer's "
                                      "tokens and this many top alternatives per position.")
        echo: NoEcho = False
        best_of: BestOfOne = None
        suffix: NoSuffix = None

    return RequestModels(GenerateRequest, ChatCompletionRequest, CompletionRequest)


def message_text(content: str | list[TextPart]) -> str:
    """A message's text: the string itself, or its text parts joined (OpenAI semantics)."""
    return content if isinstance(content, str) else "".join(p.text for p in content)


class RouteInfo(BaseModel):
    """Where a routing bundle's router sent the prompt before any stage ran."""

    entry_stage: int = Field(description="0-based stage the prompt entered the cascade at.")
    cell: str = Field(description="Router cell: the bin of each cell stage's predicted "
                      "correctness (e.g. '0:1|1:0'); the policy's entry is chosen per cell.")
    router_probabilities: list[float] = Field(description="The router's predicted probability "
                                              "that each stage answers correctly.")
    embedding_flops: float = Field(description="Cost of the prompt-embedding forward "
                                   "(included in cost_flops).")


class CascadeInfo(BaseModel):
    """The extra ``cascade`` field of OpenAI-style responses: which stage answered and why."""

    stopped_at_stage: int = Field(description="0-based stage whose answer was returned.")
    stage_model: str = Field(description="Slug of that stage's model.")
    stage_probabilities: list[float] = Field(description="Predicted acceptance of each stage "
                                             "run, in order.")
    latency_ms: float
    cost_flops: float = Field(description="2 · non-embedding params · tokens, summed over the "
                              "stages run (and the router's embedding forward, if any).")
    route: RouteInfo | None = Field(None, exclude_if=lambda v: v is None,
                                    description="Only from a routing bundle: the router's "
                                    "decision before any stage ran.")


class GenerateResponse(BaseModel):
    output: str
    stopped_at_stage: int
    latency_ms: float
    stage_probabilities: list[float]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_flops: float
    route: RouteInfo | None = Field(None, exclude_if=lambda v: v is None,
                                    description="Only from a routing bundle: the router's "
                                    "decision before any stage ran.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, str]
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    cascade: CascadeInfo


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


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
