"""`llm`: the model decides the move itself, through structured output.

It is told its side's private number and answers JSON of `prompts.DECISION_SCHEMA` (`message`
first, so its text streams live through `llm.FieldReader`). The runner applies the rules to what
it decides: a refused move is asked for again once with the reason. Small models decide badly
(the research: LLM buyers reach a deal in 26.67 % of negotiations); that is what it measures.
"""

from __future__ import annotations

import re
from typing import Any

from llm import FieldReader, ResponseFormat

from ..prompts import DECISION_SCHEMA, decision, statement, tidy_message, without_private
from ..rules import ACTIONS, Action, Game, finite_float
from .base import Policy, Proposal, TextSink

MOVE_FORMAT = ResponseFormat("negotiation_move", DECISION_SCHEMA)
# The end of a streamed message that may be a figure still being written ("$243", "243.1").
_FIGURE_SO_FAR = re.compile(r"[$\d.,]+$")


class LLMPolicy(Policy):
    name = "llm"

    async def propose(self, game: Game, *, refused: str | None, on_text: TextSink) -> Proposal:
        reader = FieldReader("message")
        pending = ""  # a figure still being written: it may be this side's private number

        async def message_text(piece: str) -> None:
            # The model knows its private number and may write it: every watcher (a person
            # playing the other side too) sees the message as it streams, so a figure is shown
            # once it is whole, blanked as the stored message is.
            nonlocal pending
            pending += reader.feed(piece)
            held = _FIGURE_SO_FAR.search(pending)
            cut = held.start() if held is not None else len(pending)
            if cut:
                shown, pending = pending[:cut], pending[cut:]
                await on_text(without_private(shown, self.view.reservation, None))

        reply = await self.generate(
            decision(self.view, game, refused),
            message_text,
            response_format=MOVE_FORMAT,
            # The JSON around the message takes tokens too: room for all of it.
            max_tokens=self.max_tokens + 64,
        )
        if pending:
            await on_text(without_private(pending, self.view.reservation, None))
        output: dict[str, Any] = reply.output if isinstance(reply.output, dict) else {}
        given = output.get("action")
        # The schema allows nothing else; a server may not enforce it.
        action: Action = given if given in ACTIONS else "offer"
        price = finite_float(output.get("price"))
        if action in ("reject", "walk_away"):
            price = None  # "otherwise 0", as the prompt says: no price for these
        message = tidy_message(str(output.get("message") or "")) or statement(
            self.view, action, price
        )
        message = without_private(message, self.view.reservation, price)
        return Proposal(action, price, message, reply.session_id, reply.tokens)
