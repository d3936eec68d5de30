"""The interface every policy implements, and the one way a policy asks a model for text.

A policy is built with one side's view (`negotiation.prompts.SideView`: its own private number
only) and its configuration; `propose(game, refused, on_text)` returns that side's next move.
A policy never checks the rules itself: the runner does, and asks once more with the reason.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llm import ChatRequest, Generation, ResponseFormat
from llm.generation import Done, Failed, Token
from llm.types import Message

from ..prompts import SideView
from ..rules import Action, Game

__all__ = ["Policy", "Proposal", "Reply", "SideConfig", "TextSink"]

# Called with each piece of the move's message as it is written (token frames).
TextSink = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SideConfig:
    """How one side plays, as the client asked (`negotiation.schemas.SideIn`)."""

    policy: str = "narrated"
    provider: str | None = None
    model: str | None = None
    temperature: float | None = None
    persona: str | None = None
    beta: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SideConfig:
        return cls(
            policy=data.get("policy") or "narrated",
            provider=data.get("provider"),
            model=data.get("model"),
            temperature=data.get("temperature"),
            persona=data.get("persona"),
            beta=data.get("beta"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__slots__}


@dataclass(slots=True)
class Proposal:
    """A move a side proposes. `ack`, for a person's move, is told how the runner took it."""

    action: Action
    price: float | None
    message: str
    session_id: str | None = None
    tokens: int = 0
    ack: asyncio.Future[Any] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """What one generation gave: its text, its parsed output (structured), session and tokens."""

    text: str
    output: Any
    session_id: str | None
    tokens: int


class Policy(ABC):
    name: ClassVar[str]
    # Whether a person plays: the runner then waits for moves instead of asking a model.
    human: ClassVar[bool] = False

    def __init__(
        self, view: SideView, config: SideConfig, *, max_tokens: int, private: bool = False
    ) -> None:
        self.view = view
        self.config = config
        self.max_tokens = max_tokens
        # Its generations' sessions kept out of the sessions API while the negotiation runs (a
        # person plays the other side: the prompts hold this side's private number).
        self.private = private

    @abstractmethod
    async def propose(self, game: Game, *, refused: str | None, on_text: TextSink) -> Proposal:
        """This side's next move in `game`; `refused` is why its last proposal was refused."""

    async def generate(
        self,
        messages: list[Message],
        on_text: Callable[[str], Awaitable[None]],
        *,
        response_format: ResponseFormat | None = None,
        max_tokens: int | None = None,
    ) -> Reply:
        """One generation of the pipeline (stored as an `llm` session, fallback providers and all);
        its tokens go to `on_text` as they arrive. Raises the pipeline's error when it fails."""
        generation = Generation(
            ChatRequest(
                messages=messages,
                model=self.config.model,
                max_tokens=max_tokens or self.max_tokens,
                temperature=self.config.temperature,
                response_format=response_format,
            ),
            provider_alias=self.config.provider,
            private=self.private,
        )
        async with aclosing(generation.events()) as events:
            async for event in events:
                if isinstance(event, Token):
                    await on_text(event.text)
                elif isinstance(event, Done):
                    return Reply(
                        generation.text, event.output, event.session_id, event.usage.total_tokens
                    )
                elif isinstance(event, Failed):
                    raise event.error
        raise AssertionError("the pipeline ended without a done or error event")
