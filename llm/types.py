"""Plain data passed between providers, the streaming core and the faces (no Django, no HTTP)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion to ask for; `None` fields take the provider's defaults."""

    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    @classmethod
    def estimate(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Counts made here, for upstreams that send none (LM Studio, llama.cpp)."""
        return cls(
            prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, estimated=True
        )


@dataclass(slots=True)
class StreamChunk:
    """A piece of a streamed reply: text, and on the last chunk the finish reason and usage.

    A piece may hold several tokens that arrived together; `pieces` then lists their texts, so
    a budget (`bounded_stream`) can stop between any two of them.
    """

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    pieces: list[str] | None = None

    @property
    def tokens(self) -> int:
        if self.pieces is not None:
            return len(self.pieces)
        return 1 if self.text else 0


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole reply, as `generate()` returns it."""

    provider: str
    model: str
    content: str
    finish_reason: str
    usage: Usage


@dataclass(slots=True)
class PingResult:
    """What a provider's `/models` said, and how fast."""

    provider: str
    base_url: str
    reachable: bool
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
