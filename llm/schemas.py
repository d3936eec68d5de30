"""Request and response shapes of the LLM endpoints (pydantic, shared by HTTP and WebSocket)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal
from uuid import UUID

from ninja import Schema
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    field_validator,
)

from .structured import MAX_SCHEMA_BYTES, ResponseFormat, schema_problem
from .types import ChatRequest


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


# Text that can be stored: PostgreSQL refuses NUL characters in text columns.
Text = Annotated[
    StrictStr, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})
]


def whole(value: Any) -> Any:
    """JSON has one number type: 64.0 is the whole number 64 (as JSON Schema's `integer` says), but
    neither 64.5, nor "64", nor true is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, Strict(), BeforeValidator(whole)]

# The largest `max_tokens` a client may ask for (no model's context comes near it). Bounds of a
# whole number go before its validator: after it, pydantic publishes them as `ge`/`le`, which
# JSON Schema does not know (the schema then allowed any integer).
MAX_TOKENS_LIMIT = 1_000_000
MaxTokens = Annotated[int, Strict(), Field(ge=1, le=MAX_TOKENS_LIMIT), BeforeValidator(whole)]


def _one_line(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must be one line, without control characters")
    return value


# A model name: one line (it is logged) that fits the stored session's column.
ModelName = Annotated[
    StrictStr,
    AfterValidator(_one_line),
    Field(
        min_length=1, max_length=255, json_schema_extra={"pattern": "^[^\\u0000-\\u001f\\u007f]+$"}
    ),
]


class ChatMessageIn(Schema):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


# A schema small enough to try from the docs page: what a negotiating agent answers with.
MOVE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string"},
        "action": {"enum": ["offer", "accept", "reject", "walk_away"]},
        "price": {"type": "number"},
    },
    "required": ["message", "action", "price"],
}


class JSONSchemaIn(BaseModel):  # not ninja's Schema, whose `json_schema()` a field would hide
    """OpenAI's `json_schema` object: a name and the JSON Schema the reply must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern="^[A-Za-z0-9_-]+$",
        strict=True,
        description="A name for the schema (letters, digits, _ and -).",
    )
    # `schema` is a name pydantic models already use; the field keeps it on the wire.
    json_schema: dict[str, Any] = Field(
        alias="schema",
        strict=True,
        description=f"A JSON Schema (any draft jsonschema knows), at most {MAX_SCHEMA_BYTES} bytes",
    )
    strict: StrictBool | None = Field(
        default=None, description="Passed on where the server knows it (OpenAI, OpenRouter)."
    )
    description: Text | None = None

    @field_validator("json_schema")
    @classmethod
    def _usable(cls, schema: dict[str, Any]) -> dict[str, Any]:
        problem = schema_problem(schema)
        if problem:
            raise ValueError(problem)
        return schema


class ResponseFormatIn(BaseModel):
    """`response_format`: the reply must be JSON following the schema (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JSONSchemaIn

    def to_format(self) -> ResponseFormat:
        inner = self.json_schema
        return ResponseFormat(inner.name, inner.json_schema, inner.strict, inner.description)


class GenerationParams(Schema):
    """What to generate: a conversation, and optional overrides of the provider's defaults."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessageIn] = Field(
        min_length=1, description="The conversation (or, with session_id, the new turn)."
    )
    model: ModelName | None = Field(
        default=None, description="Empty: the provider's default model."
    )
    max_tokens: MaxTokens | None = Field(default=None, description="Empty: LLM_MAX_TOKENS.")
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    session_id: UUID | None = Field(
        default=None, description="Continue this stored session: its history is sent first."
    )
    response_format: ResponseFormatIn | None = Field(
        default=None,
        description=(
            "The reply must be JSON following this schema; the end frame and the JSON reply then "
            "carry it parsed as `output` (`LLM_INVALID_OUTPUT` when it does not follow it)."
        ),
    )

    @property
    def session_key(self) -> str | None:
        return str(self.session_id) if self.session_id else None

    def to_request(self) -> ChatRequest:
        return ChatRequest(
            messages=[{"role": m.role, "content": m.content} for m in self.messages],
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            response_format=self.response_format.to_format() if self.response_format else None,
        )


class GenerateIn(GenerationParams):
    """The body of `POST /api/v1/llm/generate`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {"role": "system", "content": "You are a seller of used bicycles."},
                        {"role": "user", "content": "Would you take 120 for the blue one?"},
                    ],
                    "max_tokens": 128,
                    "temperature": 0.7,
                    "stream": False,
                },
                {
                    "messages": [
                        {"role": "system", "content": "You buy a used bicycle. Answer in JSON."},
                        {"role": "user", "content": "I am asking 150 for the blue one."},
                    ],
                    "max_tokens": 128,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "move", "schema": MOVE_SCHEMA},
                    },
                },
            ]
        },
    )

    stream: StrictBool = Field(
        default=False, description="true: answer with text/event-stream frames instead of JSON."
    )


class GenerateFrame(GenerationParams):
    """WebSocket `{"type": "generate", ...}`."""

    type: Literal["generate"]


class CancelFrame(Schema):
    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]


class WatchFrame(Schema):
    model_config = ConfigDict(extra="forbid")

    type: Literal["watch"]
    session_id: UUID


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """`messages.0.role: Input should be 'system', 'user' or 'assistant'; ...`: fields named."""
    parts = []
    for error in errors[:5]:
        loc = list(error.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[2:] if len(loc) > 1 and loc[1] == "payload" else loc[1:]
        name = ".".join(str(p) for p in loc) or "body"
        message = (
            "unknown field"
            if error.get("type") == "extra_forbidden"
            else error.get("msg", "is invalid")
        )
        parts.append(f"{name}: {message}")
    more = len(errors) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class ErrorDetail(Schema):
    code: str = Field(examples=["LLM_UNAVAILABLE"])
    message: str = Field(
        examples=["lm_studio is unreachable at http://localhost:1234/v1: ConnectError"]
    )


class ErrorOut(Schema):
    """The body of every error response."""

    error: ErrorDetail


class UsageOut(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = Field(description="true: counted here, because the upstream sent no usage.")


class GenerateOut(Schema):
    session_id: str
    model: str = Field(description="The model as the upstream reported it.")
    provider: str
    content: str
    finish_reason: Literal["stop", "length", "cancelled"] | str
    usage: UsageOut
    output: Any = Field(
        default=None,
        description="Only with a `response_format`: the reply parsed, as its schema says.",
    )
