"""Request and response shapes of the LLM endpoints (pydantic, shared by HTTP and WebSocket)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from ninja import Schema
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from .types import ChatRequest


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


# Text that can be stored: PostgreSQL refuses NUL characters in text columns.
Text = Annotated[
    StrictStr, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})
]


def _whole(value: Any) -> Any:
    """JSON has one number type: 64.0 is the whole number 64 (as JSON Schema's `integer` says), but
    neither 64.5, nor "64", nor true is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[StrictInt, BeforeValidator(_whole)]


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


class GenerationParams(Schema):
    """What to generate: a conversation, and optional overrides of the provider's defaults."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessageIn] = Field(
        min_length=1, description="The conversation (or, with session_id, the new turn)."
    )
    model: ModelName | None = Field(
        default=None, description="Empty: the provider's default model."
    )
    max_tokens: WholeNumber | None = Field(
        default=None, ge=1, le=1_000_000, description="Empty: LLM_MAX_TOKENS."
    )
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    session_id: UUID | None = Field(
        default=None, description="Continue this stored session: its history is sent first."
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
                }
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


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
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
