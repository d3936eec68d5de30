"""The orchestrator: one negotiation played move by move, as a plain asyncio state machine.

    turn -> policy.propose (a generation, or a person's move) -> rules.check -> store -> frames
      '-- refused: asked once more with the reason; refused again: stored `invalid`, turn passes

No agent framework (the note in ../shared/notes/negotiation.md says why): the state is
`rules.Game` plus stored rows, so a negotiation resumes from its last stored move. It runs in a
task on the server that received it; closing a socket does not stop it, `cancel()` does (its
generation's upstream request is closed with it). Frames go to local listeners (the CLI, the
benchmark), to the sockets of this process that follow it (`follow`), and, once someone on
another worker watches, to the channel layer through `llm.Broadcaster`, with an offset per frame
so a watcher anywhere gets nothing missing or doubled after its snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from django.conf import settings

from llm import Broadcaster, InvalidOutput, NegotiatorError, reveal
from llm.exceptions import InternalError, InvalidRequest

from . import store
from .policies import Policy, Proposal, policy_class
from .policies.human import HumanPolicy, HumanTimeout
from .prompts import view_of
from .rules import (
    ACTIONS,
    SIDES,
    Game,
    GameOver,
    Move,
    NotYourTurn,
    RuleViolation,
    Side,
    check,
    metrics,
    play,
)
from .scenarios import Scenario

__all__ = ["KIND", "Run", "running", "stop_all", "visible_scenario"]

logger = logging.getLogger("negotiation.runner")

# The channel-layer names of negotiations (`negotiation.session.<id>`, `negotiation.frame`...).
KIND = "negotiation"
Listener = Callable[[dict[str, Any]], None]
# Called with each frame and its offset as it is sent (a `move` once stored).
Follower = Callable[[dict[str, Any], int], None]

# The runs under way in this process, by id.
_runs: dict[str, Run] = {}
# Answers to other workers' commands under way (a reference, so no task is collected early).
_answering: set[asyncio.Task[None]] = set()


def running(negotiation_id: str) -> Run | None:
    """The run of `negotiation_id` in this process, if it is under way here."""
    return _runs.get(negotiation_id)


def visible_scenario(
    scenario: Scenario, buyer_policy: str, seller_policy: str, *, over: bool
) -> dict[str, Any]:
    """The scenario as anyone may see it: while a person plays a side, the other side's private
    number is hidden (`null`) until the negotiation ends; otherwise spectators see both."""
    data = scenario.as_dict(private=True)
    if not over:
        if buyer_policy == "human":
            data["seller_cost"] = None
        if seller_policy == "human":
            data["buyer_budget"] = None
    return data


class Run:
    """One negotiation under way: its game, its two policies, and its frames."""

    def __init__(self, record: store.Record) -> None:
        self.record = record
        self.id = record.id
        self.game = Game(record.max_turns, record.opening, record.moves)
        max_tokens = settings.NEGOTIATION_MESSAGE_MAX_TOKENS
        # Against a person, a model's prompts (its private number in them) stay out of the
        # sessions API until the negotiation ends.
        self.private = any(record.config(side).policy == "human" for side in SIDES)
        self.policies: dict[Side, Policy] = {
            side: policy_class(record.config(side).policy)(
                view_of(record.scenario, side, record.config(side).persona),
                record.config(side),
                max_tokens=max_tokens,
                private=self.private,
            )
            for side in SIDES
        }
        self._sessions: list[str] = []  # of the generations this run made
        self.status = "running"
        self.ended_by = ""
        self.error: NegotiatorError | None = None
        self.metrics: dict[str, Any] | None = None
        self.tokens = record.tokens
        self.live: dict[str, Any] | None = None  # the move being written: turn, side, text
        self.finished_at: float | None = None
        self._offset = 0
        self._listeners: list[Listener] = []
        self._followers: list[Follower] = []
        self._stop_as = "cancel"  # or "restart" when the server stops
        self._task: asyncio.Task[None] | None = None
        self._begun = False  # whether the task has taken its first step
        self._stopping = False
        self.done = asyncio.Event()
        self.broadcaster = Broadcaster(
            self.id,
            self.snapshot,
            kind=KIND,
            handlers={f"{KIND}.move": self._on_move, f"{KIND}.cancel": self._on_cancel},
        )

    # The state as frames -----------------------------------------------------------------------

    @property
    def over(self) -> bool:
        return self.status != "running"

    def public(self) -> dict[str, Any]:
        """The negotiation as the API and the snapshot show it (without its moves)."""
        record = self.record
        return {
            "id": self.id,
            "status": self.status,
            "ended_by": self.ended_by or None,
            "scenario": visible_scenario(
                record.scenario, record.buyer.policy, record.seller.policy, over=self.over
            ),
            "buyer": record.buyer.as_dict(),
            "seller": record.seller.as_dict(),
            "max_turns": record.max_turns,
            "opening": record.opening,
            "metrics": self.metrics,
            "error": self.error.as_dict() if self.error else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """What a new watcher is sent first (`negotiation` frame), and where live frames resume."""
        frame = {
            "type": "negotiation",
            "negotiation_id": self.id,
            **self.public(),
            "moves": [move.as_dict() for move in self.game.moves],
            "live": dict(self.live) if self.live else None,
        }
        return {"session_id": self.id, "frame": frame, "offset": self._offset}

    def listen(self, listener: Listener) -> None:
        """Call `listener` with every later frame (in this process: the CLI, the benchmark)."""
        self._listeners.append(listener)

    def follow(self, follower: Follower) -> dict[str, Any]:
        """Call `follower(frame, offset)` with every frame sent from now on, in order, and return
        the snapshot they resume from (as `snapshot()`): a socket on this process follows the run
        so, with no channel layer between (with Redis: round trips for every frame, and a capacity
        that all of the process's sockets share)."""
        self._followers.append(follower)
        return self.snapshot()

    def unfollow(self, follower: Follower) -> None:
        with contextlib.suppress(ValueError):
            self._followers.remove(follower)

    async def _emit(self, frame: dict[str, Any]) -> None:
        """Send a frame; its offset is taken before any await, with the state it reports."""
        await self._send(*self._stamp(frame))

    async def _send(self, frame: dict[str, Any], offset: int) -> None:
        """To the followers on this process, then to watchers elsewhere (if any watch)."""
        for follower in list(self._followers):
            follower(frame, offset)
        await self.broadcaster.publish(frame, offset)

    def _stamp(self, frame: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The frame as sent, and its offset (taken now), given to the local listeners."""
        frame = {"type": frame.pop("type"), "negotiation_id": self.id, **frame}
        offset = self._offset
        self._offset += 1
        for listener in self._listeners:
            listener(frame)
        return frame, offset

    # Running -------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        _runs[self.id] = self
        # A context of its own (as llm's autosave): one copied from the request that started it
        # would send every later database write through that request's thread, past its end.
        self._task = asyncio.create_task(
            self._run(), name=f"negotiation {self.id}", context=contextvars.Context()
        )
        return self._task

    def on_this_loop(self) -> bool:
        """Whether it runs on the running event loop: only then can it be awaited or stopped here
        (a server has one loop; tests have one per test)."""
        try:
            return self._task is not None and self._task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:  # no loop running
            return False

    def cancel(self, *, as_restart: bool = False) -> None:
        """Stop the negotiation: its generation's upstream request closes at once; it ends
        `cancelled` (or `interrupted`, resumable, when the server is stopping)."""
        if as_restart:
            self._stop_as = "restart"
        self._stopping = True
        # A task cancelled before its first step never runs its coroutine, so never its `finally`:
        # the end would be neither stored nor sent. Until then, `_run` sees the flag instead.
        if self._begun and self._task is not None and not self._task.done():
            self._task.cancel()

    async def _run(self) -> None:
        self._begun = True
        started = time.monotonic()
        beat = store.heartbeat()
        beat.track(self.id)
        try:
            if self._stopping:
                raise asyncio.CancelledError
            # Inside the `try`: with Redis this is a round trip, and a cancel that lands in it
            # once left the negotiation `running` for good (seen in CI).
            await self.broadcaster.start()
            await self._play()
            outcome = self.game.outcome
            assert outcome is not None
            self.status, self.ended_by = outcome.status, outcome.ended_by
        except asyncio.CancelledError:
            if self._stop_as == "restart":
                self.status, self.ended_by = "interrupted", "restart"
            else:
                self.status, self.ended_by = "cancelled", "cancel"
        except HumanTimeout as exc:
            logger.info("negotiation %s: %s", self.id, exc)
            self.status, self.ended_by = "no_deal", "timeout"
        except NegotiatorError as exc:
            logger.info("negotiation %s failed: %s", self.id, exc.code)
            self.status, self.ended_by, self.error = "failed", "error", exc
        except Exception:
            logger.exception("negotiation %s crashed", self.id)
            self.status, self.ended_by = "failed", "error"
            self.error = InternalError("The negotiation failed on the server; the error is logged")
        finally:
            beat.untrack(self.id)
            self.live = None
            await asyncio.shield(self._finish(started))

    async def _finish(self, started: float) -> None:
        self.finished_at = time.time()
        scenario = self.record.scenario
        self.metrics = dict(
            metrics(
                budget=scenario.buyer_budget,
                cost=scenario.seller_cost,
                game=self.game,
                tokens=self.tokens,
                duration_ms=round((self.finished_at - self.record.created_at) * 1000),
            )
        )
        if self.status in ("cancelled", "failed", "interrupted"):
            self.metrics.update(deal=False, price=None, buyer_profit=None, seller_profit=None)
        try:
            await store.finish(
                self.id,
                status=self.status,
                ended_by=self.ended_by,
                metrics=self.metrics,
                error_code=self.error.code if self.error else "",
                error_message=self.error.message if self.error else "",
                finished_at=self.finished_at,
            )
        except Exception:
            logger.exception("could not store the end of negotiation %s", self.id)
        if self.private and self.status != "interrupted":  # over: nothing left to keep back
            sessions = {*self._sessions, *(m.session_id for m in self.game.moves if m.session_id)}
            try:
                await reveal(sorted(sessions))
            except Exception:
                logger.exception("could not reveal the sessions of negotiation %s", self.id)
        end: dict[str, Any] = {
            "type": "end",
            "status": self.status,
            "ended_by": self.ended_by,
            "metrics": self.metrics,
        }
        if self.error is not None:
            end["error"] = self.error.as_dict()
        try:
            await self._emit(end)
        finally:
            _runs.pop(self.id, None)
            self.done.set()
            await self.broadcaster.stop()

    async def _play(self) -> None:
        while not self.game.over:
            side = self.game.next_side
            move, reason, tokens = await self._turn(side)
            self.game = play(self.game, move)
            self.tokens += tokens
            self.live = None
            frame = {"type": "move", **move.as_dict()}
            if reason:
                frame["reason"] = reason
            # Stamped with the state it reports, before the row is written: a snapshot taken
            # meanwhile holds the move and resumes after this frame (stamped after the write, the
            # frame came again after such a snapshot: the move twice). Sent once it is stored.
            stamped, offset = self._stamp(frame)
            try:
                await store.store_move(self.id, move, reason=reason, tokens=tokens)
            finally:
                await self._send(stamped, offset)

    async def _turn(self, side: Side) -> tuple[Move, str, int]:
        """Ask `side` for its move; once more with the reason if the rules refuse it."""
        policy = self.policies[side]
        turn = self.game.turn
        refused: str | None = None
        tokens = 0
        proposal: Proposal | None = None
        for attempt in (1, 2):
            self.live = {"turn": turn, "side": side, "text": ""}
            frame: dict[str, Any] = {"type": "turn", "turn": turn, "side": side}
            if refused:
                frame.update(attempt=attempt, reason=refused)
            await self._emit(frame)

            async def on_text(text: str, live: dict[str, Any] = self.live) -> None:
                live["text"] += text
                await self._emit({"type": "token", "turn": turn, "side": side, "text": text})

            try:
                proposal = await policy.propose(self.game, refused=refused, on_text=on_text)
            except InvalidOutput as exc:  # the model's answer was no move at all
                refused = f"your answer was not a move in the required JSON ({exc.message})"
                proposal = None
                continue
            tokens += proposal.tokens
            if proposal.session_id:
                self._sessions.append(proposal.session_id)
            try:
                price = check(self.game, side, proposal.action, proposal.price)
            except RuleViolation as exc:
                refused = exc.reason
                if proposal.ack is not None and not proposal.ack.done():
                    note = "" if attempt == 1 else "; it is stored as invalid and the turn passes"
                    proposal.ack.set_exception(type(exc)(exc.reason + note))
                continue
            move = Move(
                turn, side, proposal.action, price, proposal.message, False, proposal.session_id
            )
            if proposal.ack is not None and not proposal.ack.done():
                proposal.ack.set_result(move.as_dict())
            return move, "", tokens
        # Refused twice: stored as proposed, marked invalid; the turn passes.
        assert refused is not None
        action = proposal.action if proposal is not None else "offer"
        price = proposal.price if proposal is not None else None
        message = proposal.message if proposal is not None else ""
        session_id = proposal.session_id if proposal is not None else None
        move = Move(turn, side, action, price, message, True, session_id)
        return move, refused, tokens

    # Commands from any worker ------------------------------------------------------------------

    async def submit(
        self, side: Side | None, action: str, price: float | None, message: str
    ) -> dict[str, Any]:
        """A person's move; returns it as stored, or raises the rule that refused it."""
        if self.over:
            raise GameOver(f"the negotiation is over ({self.status})")
        humans = [s for s in SIDES if self.policies[s].human]
        if not humans:
            raise RuleViolation("no side of this negotiation is played by a person")
        if side is None:
            if len(humans) > 1:
                raise InvalidRequest("side: required when both sides are played by people")
            side = humans[0]
        if side not in humans:
            raise NotYourTurn(f"the {side} is played by a model; you play the {humans[0]}")
        if self.game.next_side != side:
            raise NotYourTurn(
                f"it is the {self.game.next_side}'s turn (turn {self.game.turn}), not the "
                f"{side}'s; wait for the {self.game.next_side}'s move"
            )
        policy = self.policies[side]
        assert isinstance(policy, HumanPolicy)
        if action not in ACTIONS:
            raise RuleViolation(f"action must be one of {', '.join(ACTIONS)}")
        ack: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        policy.submit(Proposal(action, price, message, ack=ack))
        return await ack

    # A command from another worker is answered from a task of its own, not by the handler's
    # return: the broadcaster's listener that calls the handler is stopped as the run ends, and
    # would take an answer still under way with it (a cancel always, a deal-making move at
    # times), leaving that worker's client to wait ANSWER_TIMEOUT for a wrong NEGOTIATION_OVER.

    async def _on_move(self, message: dict[str, Any]) -> None:
        self._answer(message, self._move_answer(message))

    async def _on_cancel(self, message: dict[str, Any]) -> None:
        self._answer(message, self._cancel_answer())

    async def _move_answer(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            move = await self.submit(
                message.get("side"), message["action"], message.get("price"), message["message"]
            )
        except NegotiatorError as exc:
            return {"type": f"{KIND}.answer", "error": exc.as_dict(), "status": exc.status}
        return {"type": f"{KIND}.answer", "move": move}

    async def _cancel_answer(self) -> dict[str, Any]:
        await self.stop()
        return {"type": f"{KIND}.answer", "status": self.status}

    def _answer(self, message: dict[str, Any], answer: Coroutine[Any, Any, dict[str, Any]]) -> None:
        async def send() -> None:
            try:
                reply = await answer
            except Exception:
                logger.exception("%s of negotiation %s failed", message.get("type"), self.id)
                return
            reply_to, layer = message.get("reply_to"), self.broadcaster.layer
            if reply_to and layer is not None:
                with contextlib.suppress(Exception):
                    await layer.send(reply_to, reply)

        task = asyncio.create_task(send(), context=contextvars.Context())
        _answering.add(task)
        task.add_done_callback(_answering.discard)

    async def stop(self, *, as_restart: bool = False, timeout: float = 5.0) -> None:
        """Cancel, and wait (at most `timeout` s) until the end is stored and sent."""
        self.cancel(as_restart=as_restart)
        try:
            async with asyncio.timeout(timeout):
                await self.done.wait()
        except TimeoutError:
            logger.warning("negotiation %s did not stop within %g s", self.id, timeout)


async def stop_all(timeout: float = 5.0) -> int:
    """End every negotiation under way here as `interrupted` (resumable): a server stopping.
    Only those of this event loop (a server has one): another loop's run cannot be awaited here."""
    stopping = [run for run in _runs.values() if run.on_this_loop()]
    if stopping:
        await asyncio.gather(*(run.stop(as_restart=True, timeout=timeout) for run in stopping))
    return len(stopping)
