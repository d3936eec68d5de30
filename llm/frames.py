"""The frames a generation sends (WebSocket messages, SSE `data:` lines), defined once.

Typed dicts: building a frame costs no more than building the dict (the hot path sends one per
token), mypy checks every place that builds one, and `frame_schema()` derives the JSON Schema the
OpenAPI document publishes from the same definitions. `tests/llm/test_frames.py` holds every
frame the pipeline emits to that schema.
"""

from __future__ import annotations

from functools import cache
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,  # pydantic reads these on Python 3.11
)

from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

__all__ = [
    "DoneFrame",
    "ErrorFrame",
    "GenerationFrame",
    "ServerFrame",
    "StartFrame",
    "TokenFrame",
    "UsageFrame",
    "WatchingFrame",
    "frame_schema",
]

FinishReason = Literal["stop", "length", "cancelled"]


class UsageFrame(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool  # counted here: the upstream sent no usage


class TriedProvider(TypedDict):
    provider: str
    code: str


class StartFrame(TypedDict):
    type: Literal["start"]
    session_id: str
    provider: str
    model: str
    tried: NotRequired[list[TriedProvider]]  # only after a fallback: the providers that failed


class TokenFrame(TypedDict):
    type: Literal["token"]
    text: str


class DoneFrame(TypedDict):
    type: Literal["done"]
    session_id: str
    finish_reason: FinishReason
    usage: UsageFrame
    output: NotRequired[Any]  # with a response_format: the reply, parsed and validated


class ErrorFrame(TypedDict):
    type: Literal["error"]
    session_id: NotRequired[str]  # absent when the error came before a session existed
    code: str
    message: str


class WatchingFrame(TypedDict):
    """The first answer to a `watch`: the reply so far; live frames follow from there."""

    type: Literal["watching"]
    session_id: str
    status: str
    text: str


GenerationFrame = Annotated[
    StartFrame | TokenFrame | DoneFrame | ErrorFrame, Field(discriminator="type")
]
ServerFrame = Annotated[
    StartFrame | TokenFrame | DoneFrame | ErrorFrame | WatchingFrame, Field(discriminator="type")
]


@cache
def frame_schema(kind: Any = GenerationFrame) -> dict[str, Any]:
    """The JSON Schema of `kind` (a frame type or union), self-contained: definitions inlined, so
    it can sit anywhere in an OpenAPI document (its `$ref`s would resolve against the root)."""
    schema = TypeAdapter(kind).json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items() if key != "discriminator"}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined
