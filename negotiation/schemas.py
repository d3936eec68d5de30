"""What clients send to start a negotiation or to make a move (HTTP bodies, WebSocket frames, the
CLI's options): pydantic models, so every face refuses the same nonsense with the same 422."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from django.conf import settings
from ninja import Schema
from pydantic import BeforeValidator, ConfigDict, Field, Strict, model_validator

from llm.schemas import ModelName, Text, whole

from .rules import MAX_PRICE, MIN_PRICE
from .scenarios import DEFAULT_BUDGET_RATIO

__all__ = [
    "CancelFrame",
    "ItemIn",
    "MoveFrame",
    "MoveIn",
    "NegotiationIn",
    "SideIn",
    "StartFrame",
    "WatchFrame",
]

# A price: a JSON number (not a string, not a bool), finite, at least a cent.
Price = Annotated[
    float, Field(strict=True, ge=MIN_PRICE, le=MAX_PRICE, allow_inf_nan=False, examples=[120.0])
]
MAX_TURNS_RANGE = (2, 40)
# Whole numbers that also take 10.0 (JSON has one number type); bounds before the validator, so
# the OpenAPI schema publishes them (see llm.schemas.MaxTokens).
Turns = Annotated[
    int, Strict(), Field(ge=MAX_TURNS_RANGE[0], le=MAX_TURNS_RANGE[1]), BeforeValidator(whole)
]
LibraryIndex = Annotated[int, Strict(), Field(ge=0), BeforeValidator(whole)]


class SideIn(Schema):
    """How one side plays."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["narrated", "llm", "human"] = Field(
        default="narrated",
        description=(
            "narrated: a concession strategy decides, the model writes the message; llm: the "
            "model decides (structured output); human: a person moves through the API or socket."
        ),
    )
    provider: Text | None = Field(
        default=None, max_length=64, description="An LLM provider alias; empty: LLM_PROVIDER."
    )
    model: ModelName | None = Field(default=None, description="Empty: the provider's default.")
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    persona: Text | None = Field(
        default=None,
        max_length=500,
        description="A line of character for the model, e.g. 'a friendly student on a budget'.",
    )
    beta: float | None = Field(
        default=None,
        gt=0,
        le=10,
        strict=True,
        description=(
            "narrated only: how the strategy concedes over time; < 1 late (Boulware), 1 "
            "linearly, > 1 early (Conceder). Empty: NEGOTIATION_BETA."
        ),
    )

    @model_validator(mode="after")
    def _known_provider(self) -> SideIn:
        if self.provider is not None and self.provider not in settings.LLM["PROVIDERS"]:
            known = ", ".join(settings.LLM["PROVIDERS"])
            raise ValueError(f"provider {self.provider!r} is not one of: {known}")
        if self.beta is not None and self.policy != "narrated":
            raise ValueError("beta applies to the narrated policy only")
        return self


class ItemIn(Schema):
    model_config = ConfigDict(extra="forbid")

    title: Text = Field(min_length=1, max_length=500)
    category: Text = Field(default="", max_length=100)


class NegotiationIn(Schema):
    """Start a negotiation: a library scenario (`scenario`) or a custom one (`item` and prices)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"scenario": 0, "buyer": {"policy": "narrated"}, "seller": {"policy": "narrated"}},
                {
                    "item": {"title": "Used road bike", "category": "sports"},
                    "list_price": 400,
                    "buyer_budget": 320,
                    "seller_cost": 250,
                    "buyer": {"policy": "human"},
                    "seller": {"policy": "narrated", "persona": "a patient shop owner"},
                    "max_turns": 8,
                },
            ]
        },
    )

    scenario: LibraryIndex | None = Field(
        default=None, description="A product of the library (`GET /api/v1/scenarios`)."
    )
    budget_ratio: float | None = Field(
        default=None,
        gt=0,
        le=10,
        strict=True,
        description=f"Library scenarios: the buyer's budget as a share of the list price "
        f"(default {DEFAULT_BUDGET_RATIO}).",
    )
    item: ItemIn | None = None
    list_price: Price | None = None
    buyer_budget: Price | None = Field(default=None, description="Private to the buyer.")
    seller_cost: Price | None = Field(default=None, description="Private to the seller.")
    buyer: SideIn = Field(default_factory=SideIn)
    seller: SideIn = Field(default_factory=SideIn)
    max_turns: Turns = 10
    opening: Literal["seller", "buyer"] = "seller"

    @model_validator(mode="after")
    def _one_scenario(self) -> NegotiationIn:
        custom = {
            "item": self.item,
            "list_price": self.list_price,
            "buyer_budget": self.buyer_budget,
            "seller_cost": self.seller_cost,
        }
        given = [name for name, value in custom.items() if value is not None]
        if self.scenario is not None:
            if given:
                raise ValueError(
                    f"give either scenario or a custom item with prices, not both ({given[0]})"
                )
            return self
        if self.budget_ratio is not None:
            raise ValueError("budget_ratio applies to library scenarios only")
        missing = [name for name, value in custom.items() if value is None]
        if missing:
            raise ValueError(
                "give scenario (a library index), or item, list_price, buyer_budget and "
                f"seller_cost; missing: {', '.join(missing)}"
            )
        return self


class MoveIn(Schema):
    """A human side's move."""

    model_config = ConfigDict(extra="forbid")

    side: Literal["buyer", "seller"] | None = Field(
        default=None, description="Needed only when both sides are human."
    )
    action: Literal["offer", "accept", "reject", "walk_away"]
    price: float | None = Field(
        default=None,
        strict=True,
        allow_inf_nan=False,
        description="The offer's price (offer); with accept it must equal the offer accepted.",
    )
    message: Text = Field(default="", max_length=2000)


class StartFrame(NegotiationIn):
    """WebSocket `{"type": "start", ...the POST body}`."""

    type: Literal["start"]


class WatchFrame(Schema):
    model_config = ConfigDict(extra="forbid")

    type: Literal["watch"]
    negotiation_id: UUID


class MoveFrame(MoveIn):
    type: Literal["move"]
    negotiation_id: UUID


class CancelFrame(Schema):
    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]
    negotiation_id: UUID
