"""`narrated`: a time-dependent concession strategy decides the move, the model words it.

The move never depends on the model, so even the bundled 135M model bargains soundly with it
(the research's OG-Narrator: 88.88 % deals against 26.67 % for an LLM buyer deciding alone);
the model writes one short message for the decision, streamed as plain text. It is not told its
side's private number: the decision is made, and a model cannot reveal what it does not know.
"""

from __future__ import annotations

from django.conf import settings

from ..prompts import SideView, narrated_message, narration, without_private
from ..rules import Game
from ..strategies import Concession
from .base import Policy, Proposal, SideConfig, TextSink


class NarratedPolicy(Policy):
    name = "narrated"

    def __init__(
        self, view: SideView, config: SideConfig, *, max_tokens: int, private: bool = False
    ) -> None:
        super().__init__(view, config, max_tokens=max_tokens, private=private)
        beta = config.beta if config.beta is not None else settings.NEGOTIATION_BETA
        if view.side == "seller":
            self.strategy = Concession.for_seller(view.list_price, view.reservation, beta=beta)
        else:
            self.strategy = Concession.for_buyer(view.list_price, view.reservation, beta=beta)

    async def propose(self, game: Game, *, refused: str | None, on_text: TextSink) -> Proposal:
        decision = self.strategy.decide(game)
        reply = await self.generate(
            narration(self.view, game, decision.action, decision.price), on_text
        )
        message = narrated_message(reply.text, self.view, decision.action, decision.price)
        # It never knew the number; a figure that happens to equal it is blanked all the same.
        message = without_private(message, self.view.reservation, decision.price)
        return Proposal(decision.action, decision.price, message, reply.session_id, reply.tokens)
