"""`human`: a person plays the side, moving through `POST .../moves` or the socket's `move` frame.

The runner waits for the person's move (at most `NEGOTIATION_HUMAN_TIMEOUT` seconds, then the
negotiation ends `no_deal` with `ended_by: "timeout"`). Each submitted move carries a future the
runner resolves with how it was taken, so the person's request is answered with the stored move
or the rule that refused it.
"""

from __future__ import annotations

import asyncio

from django.conf import settings

from ..prompts import SideView
from ..rules import Game, NotYourTurn
from .base import Policy, Proposal, SideConfig, TextSink


class HumanTimeout(Exception):
    """The person did not move in time."""


class HumanPolicy(Policy):
    name = "human"
    human = True

    def __init__(
        self, view: SideView, config: SideConfig, *, max_tokens: int, private: bool = False
    ) -> None:
        super().__init__(view, config, max_tokens=max_tokens, private=private)
        self._moves: asyncio.Queue[Proposal] = asyncio.Queue()
        self._last: Proposal | None = None
        self.waiting = False

    def submit(self, proposal: Proposal) -> None:
        """A move from the person, on its turn (the runner checked that). It is taken even if the
        runner has not started waiting yet (the person may answer the other side's move frame
        before the next turn frame is out); one at a time, until the last one is answered."""
        last = self._last
        if not self._moves.empty() or (
            last is not None and last.ack is not None and not last.ack.done()
        ):
            raise NotYourTurn(
                f"the {self.view.side}'s last move is still being checked; wait for its answer"
            )
        self._last = proposal
        self._moves.put_nowait(proposal)

    async def propose(self, game: Game, *, refused: str | None, on_text: TextSink) -> Proposal:
        self.waiting = True
        try:
            async with asyncio.timeout(settings.NEGOTIATION_HUMAN_TIMEOUT):
                proposal = await self._moves.get()
        except TimeoutError:
            raise HumanTimeout(
                f"the {self.view.side} did not move within "
                f"{settings.NEGOTIATION_HUMAN_TIMEOUT:g} s (NEGOTIATION_HUMAN_TIMEOUT)"
            ) from None
        finally:
            self.waiting = False
        if proposal.message:
            await on_text(proposal.message)
        return proposal
