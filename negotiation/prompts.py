"""What each side's model is told: its own view of the negotiation, and nothing of the other's.

Pure. A `SideView` holds one side's role, the item, the list price and that side's own private
number (the buyer's budget or the seller's cost), never the other's: a policy is built from a
view, so it cannot put the other side's number in a prompt (tests read the exact bodies sent
upstream to prove it). The moves so far are public: actions, prices, messages.

Two prompt shapes: `narration` (the `narrated` policy: the move is decided, the model only words
it, and is not even told its private number, so it cannot reveal it) and `decision` (the `llm`
policy: the model decides, through a JSON Schema with `message` first so its text streams).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llm.types import Message

from .rules import Game, Move, Side, format_price, other
from .scenarios import Item, Scenario

__all__ = [
    "DECISION_SCHEMA",
    "SideView",
    "decision",
    "narrated_message",
    "narration",
    "statement",
    "tidy_message",
    "view_of",
    "without_private",
]

# The `llm` policy's reply: message first, so it streams while the model writes it.
DECISION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "maxLength": 240},
        "action": {"enum": ["offer", "accept", "reject", "walk_away"]},
        "price": {"type": "number"},
    },
    "required": ["message", "action", "price"],
}
# A message shown to the other side is cut to this many characters.
MESSAGE_MAX = 400


@dataclass(frozen=True, slots=True)
class SideView:
    """One side's view: what it knows, and nothing the other side keeps to itself."""

    side: Side
    item: Item
    list_price: float
    reservation: float  # its own private number: the buyer's budget, the seller's cost
    persona: str = ""

    @property
    def counterpart(self) -> Side:
        return other(self.side)


def view_of(scenario: Scenario, side: Side, persona: str | None = None) -> SideView:
    """`side`'s view of `scenario`: its own private number only."""
    own = scenario.buyer_budget if side == "buyer" else scenario.seller_cost
    return SideView(side, scenario.item, scenario.list_price, own, (persona or "").strip())


def _history(view: SideView, game: Game) -> str:
    if not game.moves:
        return "Nothing has been said yet: you open."
    lines = []
    for move in game.moves[-8:]:  # a small model follows a short history better
        who = "You" if move.side == view.side else f"The {move.side}"
        lines.append(f"- {who}: {_describe(move)}" + (f' "{move.message}"' if move.message else ""))
    return "So far:\n" + "\n".join(lines)


def _describe(move: Move) -> str:
    if move.invalid:
        return "made a move the rules refused."
    if move.action == "offer":
        assert move.price is not None
        return f"offered {format_price(move.price)}."
    if move.action == "accept":
        assert move.price is not None
        return f"accepted {format_price(move.price)}."
    if move.action == "reject":
        return "rejected the offer."
    return "walked away."


def _persona(view: SideView) -> str:
    return f" You are {view.persona}." if view.persona else ""


def statement(view: SideView, action: str, price: float | None) -> str:
    """The decided move in plain words: what a `narrated` message must say, and says at least."""
    if action == "accept" and price is not None:
        return f"I accept your price of {format_price(price)}."
    if action == "offer" and price is not None:
        if view.side == "seller":
            return f"I can sell it to you for {format_price(price)}."
        return f"I can pay {format_price(price)}."
    if action == "walk_away":
        return "I'll pass, thank you."
    return "No, thank you."


def narration(view: SideView, game: Game, action: str, price: float) -> list[Message]:
    """The `narrated` policy: word a decided move in one short sentence. The model is not given
    the private number (the decision is made; it cannot leak what it does not know), and only
    the other side's last message: a 135M model follows a short prompt, not a transcript
    (measured on SmolLM2-135M: about half its sentences then say the move well)."""
    them = view.counterpart
    theirs = next((m for m in reversed(game.moves) if m.side == them and m.message), None)
    heard = f'The {them} said: "{theirs.message}"\n' if theirs is not None else ""
    return [
        {
            "role": "system",
            "content": (
                f"You are a {view.side} haggling over {view.item.title!r}.{_persona(view)} "
                f"Reply to the {them} with one short, friendly sentence."
            ),
        },
        {
            "role": "user",
            "content": f"{heard}In one sentence, tell the {them}: {statement(view, action, price)}",
        },
    ]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A sentence a small model writes about itself or its task rather than to the other side.
_META = re.compile(
    r"\b(AI|assistant|sentences?|language model|sorry|apologi[sz]e|error|misunderstanding|"
    r"revised|rewrite|re-writ\w*|respond|response)\b",
    re.IGNORECASE,
)
# What reads as a price: "$20", "$1,234.50", "561.75" (not "12V" or "100Ah" of a product's name).
_MONEY = re.compile(r"\$\s?\d[\d,]*(?:\.\d+)?|\b\d[\d,]*\.\d{2}\b")


def narrated_message(text: str, view: SideView, action: str, price: float | None) -> str:
    """A model's wording of a decided move, kept honest. Of its whole sentences (one cut off by
    `max_tokens` is not), those that give no price but the move's and do not talk about
    themselves ("as an AI", "this sentence") are candidates: the first that gives the price is
    the message, else the first, followed by the move said plainly; none: the move said plainly.
    Measured on SmolLM2-135M: most of its replies offer one such sentence."""
    said = statement(view, action, price)
    candidates: list[tuple[str, bool]] = []
    for sentence in _SENTENCE_END.split(tidy_message(text)):
        sentence = sentence.strip().strip("\"'").strip()
        if not 2 <= len(sentence) <= 240 or sentence[-1] not in ".!?" or _META.search(sentence):
            continue
        figures = [_figure(match) for match in _MONEY.findall(sentence)]
        if all(f is not None and price is not None and abs(f - price) < 0.005 for f in figures):
            candidates.append((sentence, bool(figures)))
    for sentence, gives_price in candidates:
        if gives_price:
            return sentence
    return f"{candidates[0][0]} {said}" if candidates else said


def _figure(text: str) -> float | None:
    try:
        return float(text.lstrip("$ ").replace(",", ""))
    except ValueError:
        return None


def decision(view: SideView, game: Game, refused: str | None = None) -> list[Message]:
    """The `llm` policy: decide the move, answering JSON of `DECISION_SCHEMA`."""
    them = view.counterpart
    if view.side == "buyer":
        goal = (
            f"Your budget is {format_price(view.reservation)}: never pay more, and pay as little "
            "as you can. The seller does not know your budget: keep it to yourself."
        )
    else:
        goal = (
            f"Your cost is {format_price(view.reservation)}: never sell for less, and sell for as "
            "much as you can. The buyer does not know your cost: keep it to yourself."
        )
    theirs = game.latest_offer(them)
    offer_line = (
        f"The {them}'s latest offer is {format_price(theirs.price)}."
        if theirs is not None and theirs.price is not None
        else f"The {them} has made no offer yet."
    )
    turn = f"This is turn {game.turn} of {game.max_turns}; after the last one there is no deal."
    retry = (
        f"\n\nYour last answer was refused: {refused}. Answer again with a valid move."
        if refused
        else ""
    )
    return [
        {
            "role": "system",
            "content": (
                f"You are the {view.side} in a negotiation over {view.item.title!r}, list price "
                f"{format_price(view.list_price)}.{_persona(view)} {goal} Answer in JSON with: "
                f'"message" (what you say to the {them}), "action" (offer, accept, reject or '
                f'walk_away) and "price" (your offer; when accepting, the {them}\'s offer; '
                "otherwise 0). You may accept only the other side's latest offer."
            ),
        },
        {"role": "user", "content": f"{_history(view, game)}\n\n{offer_line} {turn}{retry}"},
    ]


_NUMBER = re.compile(r"\$?\d[\d,]*(?:\.\d+)?")


def without_private(message: str, private: float, price: float | None) -> str:
    """`message` with every figure equal to the side's private number blanked out, unless it is
    also the price the side is offering (a model may blurt out its budget or cost: it must never
    reach the other side)."""
    if price is not None and abs(price - private) < 0.005:
        return message

    def blank(match: re.Match[str]) -> str:
        try:
            value = float(match.group().lstrip("$").replace(",", ""))
        except ValueError:
            return match.group()
        return "[private]" if abs(value - private) < 0.005 else match.group()

    return _NUMBER.sub(blank, message)


def tidy_message(text: str) -> str:
    """A model's message as shown: one paragraph, no wrapping quotes, bounded in length."""
    text = " ".join(text.strip().split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text[:MESSAGE_MAX]
