"""WebSocket face of negotiations at `/ws/negotiations/`: start, watch, move and cancel.

A socket follows any number of negotiations; every frame it gets names its `negotiation_id`.
Following one is the relay's watch mechanism (`llm.Broadcaster` on the running process, the
channel layer between workers): the process answers with a `negotiation` snapshot (the moves so
far and the move being written) and the offset live frames resume from, so nothing is missing
or doubled between the two, on any worker. A negotiation running on this very process (the
starter's, always) is followed the same way without the channel layer: the run hands over its
snapshot and then each frame as it sends it (`Run.follow`), which spares a channel-layer message
per frame (with Redis, round trips per token frame, and a capacity all of the worker's sockets
share). Closing the socket stops following; the negotiations go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from llm.auth import client_key
from llm.broadcast import control_group, frames_group
from llm.consumers import JSONFrameConsumer
from llm.exceptions import InternalError, WatchLagged
from llm.ratelimit import check_rate

from . import service
from .exceptions import NegotiationNotFound, NegotiationUnavailable
from .runner import KIND, Run
from .schemas import CancelFrame, MoveFrame, StartFrame, WatchFrame

__all__ = ["NegotiationConsumer"]

logger = logging.getLogger("negotiation.consumers")

# A watcher asks the running process for its snapshot this often, and after this long with no
# answer shows what the database holds (the process may have stopped, or just finished).
WATCH_RETRY = 0.5
SNAPSHOT_TIMEOUT = 5.0
# The most negotiations one socket follows at once (a page shows one; a dashboard a few).
MAX_WATCHES = 32


class _Watch:
    """One negotiation this socket follows: waiting for its snapshot, or forwarding frames."""

    def __init__(self, negotiation_id: str) -> None:
        self.negotiation_id = negotiation_id
        self.pending = True
        self.offset = 0
        self.buffer: list[dict[str, Any]] = []
        self.asker: asyncio.Task[None] | None = None
        # Following a run of this process: the task forwarding its frames, and how to stop.
        self.forwarder: asyncio.Task[None] | None = None
        self.unfollow: Callable[[], None] | None = None


class NegotiationConsumer(JSONFrameConsumer):
    FRAMES = {"start": StartFrame, "watch": WatchFrame, "move": MoveFrame, "cancel": CancelFrame}
    RELAYED = frozenset({f"{KIND}.frame", f"{KIND}.snapshot"})

    async def connect(self) -> None:
        self.watches: dict[str, _Watch] = {}
        await super().connect()

    async def disconnect(self, code: int) -> None:
        for negotiation_id in list(self.watches):
            await self._stop_watching(negotiation_id)

    def error_context(self, content: Any) -> dict[str, str]:
        value = content.get("negotiation_id") if isinstance(content, dict) else None
        return {"negotiation_id": value} if isinstance(value, str) and len(value) <= 64 else {}

    async def handle(self, frame: StartFrame | WatchFrame | MoveFrame | CancelFrame) -> None:
        if isinstance(frame, StartFrame):
            await check_rate(client_key(self.scope))
            run = await service.start(frame)
            await self._watch(run.id)
        elif isinstance(frame, WatchFrame):
            await self._watch(str(frame.negotiation_id))
        elif isinstance(frame, MoveFrame):
            negotiation_id = str(frame.negotiation_id)
            await self._watch(negotiation_id)  # its frames come here, the move's included
            await service.move(negotiation_id, frame.side, frame.action, frame.price, frame.message)
        else:
            negotiation_id = str(frame.negotiation_id)
            await self._watch(negotiation_id)
            await service.cancel(negotiation_id)

    # Watching ------------------------------------------------------------------------------------

    async def _watch(self, negotiation_id: str) -> None:
        if negotiation_id in self.watches:
            return  # already followed: its frames come here
        run = service.running_here(negotiation_id)
        if run is None:
            stored = await service.describe(negotiation_id)  # NEGOTIATION_NOT_FOUND
            if stored["status"] not in ("running",):
                await self.send_json(_snapshot_frame(stored))
                return
        if len(self.watches) >= MAX_WATCHES:
            oldest = next(iter(self.watches))
            await self._stop_watching(oldest)
        watch = self.watches[negotiation_id] = _Watch(negotiation_id)
        if run is not None:
            await self._follow_here(watch, run)
            return
        try:
            await self.channel_layer.group_add(
                frames_group(negotiation_id, KIND), self.channel_name
            )
        except Exception as exc:  # the layer is down (Redis): what the database holds, then why
            logger.warning("watch of %s: the channel layer failed (%s)", negotiation_id, exc)
            await self._unanswered(watch)
            return
        watch.asker = asyncio.create_task(self._ask_for_snapshot(watch))

    async def _follow_here(self, watch: _Watch, run: Run) -> None:
        """Follow a run of this process: its snapshot, then its frames in order, straight from it
        (a queue the run fills as it sends, drained by a task of this socket)."""
        queue: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue()

        def follower(frame: dict[str, Any], offset: int) -> None:
            queue.put_nowait((frame, offset))

        snapshot = run.follow(follower)  # no await between the snapshot and the first frame
        watch.unfollow = lambda: run.unfollow(follower)
        watch.pending = False
        watch.offset = snapshot["offset"]
        await self.send_json(snapshot["frame"])
        if snapshot["frame"]["status"] != "running":
            await self._stop_watching(watch.negotiation_id)
        elif self.watches.get(watch.negotiation_id) is watch:
            watch.forwarder = asyncio.create_task(self._forward_here(watch, queue))

    async def _forward_here(
        self, watch: _Watch, queue: asyncio.Queue[tuple[dict[str, Any], int]]
    ) -> None:
        try:
            while self.watches.get(watch.negotiation_id) is watch:
                frame, offset = await queue.get()
                await self._forward(watch, {"frame": frame, "offset": offset})
        except Exception:
            logger.exception("following %s failed", watch.negotiation_id)
            await self._stop_watching(watch.negotiation_id)

    async def _ask_for_snapshot(self, watch: _Watch) -> None:
        """Ask the running process until it answers (it may not listen yet); after
        SNAPSHOT_TIMEOUT, what the database holds (through this consumer's own queue, so it is
        handled in order with live frames)."""
        request = {"type": f"{KIND}.watch", "reply_to": self.channel_name}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SNAPSHOT_TIMEOUT
        while loop.time() < deadline:
            try:
                await self.channel_layer.group_send(
                    control_group(watch.negotiation_id, KIND), request
                )
            except Exception as exc:
                logger.warning(
                    "watch of %s: the channel layer failed (%s)", watch.negotiation_id, exc
                )
                break
            await asyncio.sleep(WATCH_RETRY)
        if self.watches.get(watch.negotiation_id) is watch and watch.pending:
            await self._unanswered(watch)

    async def _unanswered(self, watch: _Watch) -> None:
        """No process answered: the stored negotiation, and (if it is stored running) why no
        live frame can follow."""
        await self._stop_watching(watch.negotiation_id)
        try:
            stored = await service.describe(watch.negotiation_id)
        except NegotiationNotFound as exc:
            await self._send_error(exc, negotiation_id=watch.negotiation_id)
            return
        except Exception:
            logger.exception(
                "watch of %s: reading the stored negotiation failed", watch.negotiation_id
            )
            await self._send_error(
                InternalError("The server failed on this watch; the error is logged"),
                negotiation_id=watch.negotiation_id,
            )
            return
        await self.send_json(_snapshot_frame(stored))
        if stored["status"] == "running":
            await self._send_error(
                NegotiationUnavailable(
                    "No live frames can be followed: the process running this negotiation does "
                    "not answer (it may have stopped, or the channel layer is down). The "
                    "negotiation frame holds what is stored; send watch again to retry."
                ),
                negotiation_id=watch.negotiation_id,
            )

    async def negotiation_snapshot(self, event: dict[str, Any]) -> None:
        watch = self.watches.get(event.get("session_id", ""))
        if watch is None or not watch.pending:
            return
        watch.pending = False
        if watch.asker is not None and watch.asker is not asyncio.current_task():
            watch.asker.cancel()
        watch.offset = event["offset"]
        await self.send_json(event["frame"])
        buffered, watch.buffer = watch.buffer, []
        for message in buffered:
            if self.watches.get(watch.negotiation_id) is not watch:
                return  # a gap among them ended the watch
            await self._forward(watch, message)
        if event["frame"]["status"] != "running":
            await self._stop_watching(watch.negotiation_id)

    async def negotiation_frame(self, event: dict[str, Any]) -> None:
        watch = self.watches.get(event.get("session_id", ""))
        if watch is None:
            return
        if watch.pending:
            watch.buffer.append(event)
        else:
            await self._forward(watch, event)

    async def _forward(self, watch: _Watch, message: dict[str, Any]) -> None:
        offset, frame = message["offset"], message["frame"]
        if offset < watch.offset:
            return  # already in the snapshot
        if offset > watch.offset:  # the layer dropped frames: this socket reads too slowly
            await self._stop_watching(watch.negotiation_id)
            await self._send_error(
                WatchLagged("This watcher fell behind and missed frames; send watch again"),
                negotiation_id=watch.negotiation_id,
            )
            return
        watch.offset = offset + 1
        await self.send_json(frame)
        if frame["type"] == "end":
            await self._stop_watching(watch.negotiation_id)

    async def _stop_watching(self, negotiation_id: str) -> None:
        watch = self.watches.pop(negotiation_id, None)
        if watch is None:
            return
        for task in (watch.asker, watch.forwarder):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if watch.unfollow is not None:  # followed on this process: never in a group
            watch.unfollow()
            return
        with contextlib.suppress(Exception):
            await self.channel_layer.group_discard(
                frames_group(negotiation_id, KIND), self.channel_name
            )


def _snapshot_frame(stored: dict[str, Any]) -> dict[str, Any]:
    """A `negotiation` frame from a stored negotiation (no move is being written)."""
    return {
        "type": "negotiation",
        "negotiation_id": stored["id"],
        **{key: value for key, value in stored.items() if key not in ("created_at", "finished_at")},
        "created_at": stored["created_at"].isoformat() if stored.get("created_at") else None,
        "finished_at": stored["finished_at"].isoformat() if stored.get("finished_at") else None,
        "live": None,
    }
