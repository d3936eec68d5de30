"""Watchers: a generation's frames go to its session's channel-layer group once someone watches.

    watcher                               generating process
    group_add(frames_group)
    group_send(control_group, llm.watch)  ->  Broadcaster answers llm.snapshot (status, text,
                                              offset) to the watcher's channel, then publishes
    llm.frame {frame, offset}             <-  every later frame to frames_group

Token frames carry the offset of their text in the reply, so a watcher drops what its snapshot
already holds however the layer orders the two: nothing missing, nothing doubled.
A generation nobody watches sends nothing to the layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from channels.layers import get_channel_layer

from .streaming import cancel_and_wait

logger = logging.getLogger("llm.broadcast")


def frames_group(session_id: str, kind: str = "llm") -> str:
    """The group a watched stream's frames go to (`kind` names the app: llm, negotiation)."""
    return f"{kind}.session.{session_id}"


def control_group(session_id: str, kind: str = "llm") -> str:
    """The group its process listens on for watch requests (and, for some kinds, commands)."""
    return f"{kind}.session.{session_id}.ctl"


# A command a stream's process answers besides watch requests: the message, its answer (if any).
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class Broadcaster:
    """Publishes one stream's frames to its watchers and answers their snapshot requests.

    `kind` names the messages (`{kind}.watch` asks, `{kind}.snapshot` answers, `{kind}.frame`
    carries a frame with its offset), so another app (negotiations) runs the same mechanism;
    `handlers` answer its other commands (a message type -> a coroutine whose result, if any, is
    sent to the message's `reply_to`).
    """

    def __init__(
        self,
        session_id: str,
        snapshot: Callable[[], dict[str, Any]],
        *,
        kind: str = "llm",
        handlers: Mapping[str, Handler] | None = None,
    ) -> None:
        self.session_id = session_id
        self.snapshot = snapshot
        self.kind = kind
        self.handlers = dict(handlers or {})
        self.watched = False
        self.layer = get_channel_layer()
        self._channel: str | None = None
        self._listener: asyncio.Task[None] | None = None
        self._sending: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Listen for watchers; a layer that is down only means nobody can watch this one."""
        if self.layer is None:
            return
        try:
            # The default prefix: channels-redis polls one key per process for all such channels.
            self._channel = await self.layer.new_channel()
            await self.layer.group_add(control_group(self.session_id, self.kind), self._channel)
        except Exception as exc:  # one line per generation while Redis is down, not a traceback
            logger.warning(
                "%s %s cannot be watched: the channel layer failed (%s: %s)",
                self.kind,
                self.session_id,
                type(exc).__name__,
                exc,
            )
            self._channel = None
            return
        self._listener = asyncio.create_task(self._listen())

    async def publish(self, frame: Mapping[str, Any], offset: int | None = None) -> None:
        """Send a frame to the watchers. A frame being sent when the stream is cancelled still
        goes, before any later one (its end): its text is in the reply, so watchers need it. With
        Redis a send is several round trips, and a client leaving in one of them once cost a
        watcher the reply's last token (CI)."""
        if not self.watched or self.layer is None:
            return
        message = {
            "type": f"{self.kind}.frame",
            "session_id": self.session_id,
            "frame": frame,
            "offset": offset,
        }
        previous = self._sending
        if previous is not None and not previous.done():  # only after a cancel
            await asyncio.shield(previous)
        self._sending = asyncio.ensure_future(self._send(message))
        await asyncio.shield(self._sending)

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.layer is not None
        try:
            await self.layer.group_send(frames_group(self.session_id, self.kind), message)
        except Exception:  # a broken layer must never break the generation itself
            logger.exception("could not publish a frame of %s %s", self.kind, self.session_id)

    async def stop(self) -> None:
        if self._sending is not None and not self._sending.done():
            await asyncio.shield(self._sending)  # `_send` raises nothing
        if self._listener is not None:
            await cancel_and_wait(self._listener)
        if self._channel is not None and self.layer is not None:
            with contextlib.suppress(Exception):
                await self.layer.group_discard(
                    control_group(self.session_id, self.kind), self._channel
                )

    async def _listen(self) -> None:
        assert self.layer is not None and self._channel is not None
        while True:
            try:
                message = await self.layer.receive(self._channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "watch requests of %s %s: receive failed", self.kind, self.session_id
                )
                await asyncio.sleep(0.5)
                continue
            kind, reply_to = message.get("type"), message.get("reply_to")
            reply: dict[str, Any] | None = None
            if kind == f"{self.kind}.watch" and reply_to:
                self.watched = True
                reply = {"type": f"{self.kind}.snapshot", **self.snapshot()}
            elif kind in self.handlers:
                try:
                    reply = await self.handlers[kind](message)
                except Exception:
                    logger.exception("%s of %s %s failed", kind, self.kind, self.session_id)
                    continue
            if reply is not None and reply_to:
                with contextlib.suppress(Exception):
                    await self.layer.send(reply_to, reply)
