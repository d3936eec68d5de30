"""Plain data passed between providers, the streaming core and the faces (no Django, no HTTP)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from .frames import TriedProvider, UsageFrame
    from .structured import ResponseFormat

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
    response_format: ResponseFormat | None = None  # the reply must follow this JSON Schema


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    def as_frame(self) -> UsageFrame:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
        }

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


@dataclass(frozen=True, slots=True)
class FinishedReply:
    """A reply as it ended: what the pipeline hands to storage (`close_session` reads only this)."""

    session_id: str
    status: str  # completed, cancelled or failed
    provider: str
    model: str
    text: str
    finish_reason: str
    usage: Usage | None
    error_code: str
    error_message: str
    created_at: float
    first_token_at: float | None
    finished_at: float
    tried: tuple[TriedProvider, ...] = ()
    response_format: dict[str, Any] | None = None  # as asked, in OpenAI's shape
    output: Any = None  # the reply parsed, when it followed the schema

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return round((self.first_token_at - self.created_at) * 1000, 1)

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens over the time from the first token to the end."""
        if self.first_token_at is None or self.usage is None:
            return None
        if self.finished_at <= self.first_token_at:
            return None
        return round(self.usage.completion_tokens / (self.finished_at - self.first_token_at), 1)


@dataclass(slots=True)
class PingResult:
    """What a provider's `/models` said, and how fast."""

    provider: str
    base_url: str
    reachable: bool
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
