"""Fault soak (issue 6, hardening item 3): 200 concurrent clients for a bounded time against an
upstream that randomly stalls, cuts, sends error chunks, answers 429 (with Retry-After) or 5xx, or
streams normally, while some clients cancel or leave mid-stream.

Afterwards every session is stored with a final status (none left `streaming`), its stored reply
is exactly the text its client was sent (for a client that left, what it was sent is a prefix of
the stored reply), its status matches the end frame, the reply and the end are the ones the
upstream called for, and the process's sockets and tasks return to their baseline.

Everything runs in this process (WebsocketCommunicator and raw ASGI HTTP on the real application),
so the sockets and tasks counted are the relay's own. The run is seeded: `SOAK_SEED=<n>` replays
one (the same seed gives the same client behaviours and the same upstream reply per attempt;
only timing differs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import django.core.handlers.asgi
import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import connection, connections

from llm.models import Message, Session
from llm.providers import get_provider, providers
from testkit.fake_upstream import FakeUpstream, Reply, Request
from tests.llm.ws_client import LOCALHOST, PATH, drained, parse

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

SEED = int(os.environ.get("SOAK_SEED", "6003"))
CLIENTS = 200
SOAK_SECONDS = 12.0  # clients start new sessions for this long, then finish the one they are in
SETTLE = 5.0  # sockets, tasks and sessions must be back to normal within this
MAX_RETRIES = 1
IDLE_TIMEOUT = 0.5
RETRY_AFTER = "1"
END_CODES = {"LLM_TIMEOUT", "LLM_UNAVAILABLE", "LLM_BAD_GATEWAY"}  # what these faults may end in
HTTP_STATUS = {"LLM_TIMEOUT": 503, "LLM_UNAVAILABLE": 503, "LLM_BAD_GATEWAY": 502}
MODEL = "soak-model"

# Token texts: multi-byte, JSON-hostile, whitespace; each token also carries its index.
VOCAB = [
    " the",
    " sea",
    " é",
    " 日本",
    " 🙂",
    ' "q"',
    " \\",
    "\n",
    "\t",
    " <b>",
    " &amp;",
    " ",
    "x",
]


# The upstream ---------------------------------------------------------------------------------

# kind -> weight. Stalls/cuts/errors happen before the first token too (`*0`), where a retryable
# one (stall, 429, 5xx) is retried and a bad gateway is not.
UPSTREAM_KINDS = {
    "normal": 34,
    "length": 5,
    "no-finish": 3,
    "stall": 7,
    "stall0": 3,
    "stall-keepalive": 3,
    "cut": 7,
    "cut0": 2,
    "error": 7,
    "error0": 2,
    "invalid": 3,
    "429": 10,
    "5xx": 14,
}


@dataclass
class Attempt:
    kind: str
    reply: Reply

    @property
    def sent(self) -> str:
        """The text the upstream sends before it ends, fails or stalls."""
        r = self.reply
        stop = next(
            (
                n
                for n in (r.stall_after, r.cut_after, r.error_after, r.invalid_after)
                if n is not None
            ),
            len(r.tokens),
        )
        return "".join(r.tokens[:stop]) if r.status == 200 else ""

    @property
    def retryable_before_text(self) -> bool:
        return self.kind in ("stall0", "429", "5xx")

    @property
    def may_be_retried(self) -> bool:
        # A cut before the first token may reach the relay as a connection reset before the
        # response (retryable, LLM_UNAVAILABLE at the end) rather than as a cut body.
        return self.retryable_before_text or self.kind == "cut0"

    def expected_end(self) -> tuple[str, str]:
        """('done', finish_reason) or ('error', code) for a client that stays to the end."""
        if self.kind == "normal":
            return "done", "stop"
        if self.kind == "length":
            return "done", "length"
        if self.kind.startswith("stall"):
            return "error", "LLM_TIMEOUT"
        if self.kind in ("429", "5xx"):
            return "error", "LLM_UNAVAILABLE"
        return "error", "LLM_BAD_GATEWAY"


def pick_reply(rng: random.Random) -> Attempt:
    kind = rng.choices(list(UPSTREAM_KINDS), weights=list(UPSTREAM_KINDS.values()))[0]
    count = rng.randint(3, 40)
    tokens = [f"{rng.choice(VOCAB)}{i}" for i in range(count)]
    reply = Reply(
        tokens=tokens, delay=rng.uniform(0.005, 0.04), ttft=rng.uniform(0, 0.15), model=MODEL
    )
    at = rng.randrange(1, count)
    if rng.random() < 0.3:
        reply.usage = {"prompt_tokens": 7, "completion_tokens": count, "total_tokens": 7 + count}
    match kind:
        case "length":
            reply.finish_reason = "length"
        case "no-finish":
            reply.finish_reason = None
        case "stall":
            reply.stall_after = at
        case "stall0":
            reply.stall_after = 0
        case "stall-keepalive":
            reply.stall_after, reply.keepalive = at, 0.1  # comments must not reset the idle timer
        case "cut":
            reply.cut_after = at
        case "cut0":
            reply.cut_after = 0
        case "error":
            reply.error_after = at
        case "error0":
            reply.error_after = 0
        case "invalid":
            reply.invalid_after = at
        case "429":
            reply.status, reply.headers = 429, {"Retry-After": RETRY_AFTER}
        case "5xx":
            reply.status = rng.choice([500, 502, 503, 504])
    return Attempt(kind, reply)


class ChaosUpstream(FakeUpstream):
    """A FakeUpstream that answers each chat request with a seeded random fault or reply.

    The choice depends on the seed, the conversation (its unique last message) and the attempt
    number, so it does not depend on timing; every attempt is recorded for the checks.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.attempts: dict[str, list[Attempt]] = defaultdict(list)

    async def _answer(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if request.path.endswith("/chat/completions") and isinstance(request.body, dict):
            key = request.body["messages"][-1]["content"]
            tries = self.attempts[key]
            attempt = pick_reply(random.Random(f"{self.seed}:upstream:{key}:{len(tries)}"))
            tries.append(attempt)
            self.replies.append(attempt.reply)  # taken by FakeUpstream._answer before it awaits
        return await super()._answer(request, reader, writer)


# What the clients saw ---------------------------------------------------------------------------


@dataclass
class Outcome:
    key: str
    face: str  # ws, sse, json
    behaviour: str
    session_id: str | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)  # frames the client read
    after_leaving: list[dict[str, Any]] = field(default_factory=list)  # sent, never read
    left: bool = False  # the client went away (or cancelled its task) before the end
    http_status: int | None = None
    json_body: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The reply text this client read."""
        return "".join(f["text"] for f in self.frames if f["type"] == "token")

    @property
    def sent(self) -> list[dict[str, Any]]:
        return self.frames + self.after_leaving

    @property
    def end(self) -> dict[str, Any] | None:
        ends = [f for f in self.sent if f["type"] in ("done", "error")]
        return ends[-1] if ends else None


WS_BEHAVIOURS = {"ws-read": 40, "ws-cancel": 12, "ws-close": 12}
HTTP_BEHAVIOURS = {"sse-read": 14, "sse-leave": 8, "json": 14}
BEHAVIOURS = WS_BEHAVIOURS | HTTP_BEHAVIOURS


def http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/llm/generate",
        "raw_path": b"/api/v1/llm/generate",
        "root_path": "",
        "query_string": b"",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
    }


def sse_frames(body: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Complete SSE events in `body` as frames, and the unfinished rest."""
    *events, rest = body.split(b"\n\n")
    frames = []
    for event in events:
        assert event.startswith(b"data: "), event
        frames.append(parse(event[6:].decode()))
    return frames, rest


def due(leave_after: int, outcome: Outcome, tokens: int) -> bool:
    """Time to cancel or leave: at once (-1), or once `leave_after` tokens came after the start."""
    return leave_after < 0 or (bool(outcome.frames) and tokens >= leave_after)


class Client:
    """One of the CLIENTS: runs sessions one after another until the soak ends."""

    def __init__(self, number: int, deadline: float, outcomes: list[Outcome]) -> None:
        self.number = number
        self.deadline = deadline
        self.outcomes = outcomes
        self.socket: WebsocketCommunicator | None = None

    async def run(self) -> None:
        from negotiator.asgi import application

        self.app = application
        turn = 0
        await asyncio.sleep(random.Random(f"{SEED}:stagger:{self.number}").uniform(0, 0.3))
        try:
            while time.monotonic() < self.deadline:
                rng = random.Random(f"{SEED}:client:{self.number}:{turn}")
                behaviour = rng.choices(list(BEHAVIOURS), weights=list(BEHAVIOURS.values()))[0]
                outcome = Outcome(
                    f"soak {self.number}-{turn} {rng.choice(VOCAB)}",
                    behaviour.split("-")[0],
                    behaviour,
                )
                self.outcomes.append(outcome)
                try:
                    async with asyncio.timeout(20):
                        if outcome.face == "ws":
                            await self.over_websocket(outcome, rng)
                        elif outcome.face == "sse":
                            await self.over_sse(outcome, rng)
                        else:
                            await self.over_json(outcome)
                except TimeoutError:
                    outcome.problems.append(f"no end within 20 s; read {outcome.frames[-3:]}")
                    await self.close_socket(outcome)
                turn += 1
        finally:
            await self.close_socket(None)

    async def close_socket(self, outcome: Outcome | None) -> None:
        comm, self.socket = self.socket, None
        if comm is None:
            return
        await comm.disconnect(timeout=10)  # the consumer waits for its generation to store the end
        frames = drained(comm)
        if outcome is not None:
            outcome.after_leaving += frames
        elif frames:
            pytest.fail(f"frames nobody asked for: {frames}")

    # WebSocket ------------------------------------------------------------------------------------

    async def over_websocket(self, outcome: Outcome, rng: random.Random) -> None:
        if self.socket is None:
            self.socket = WebsocketCommunicator(self.app, PATH, headers=LOCALHOST)
            connected, code = await self.socket.connect(timeout=10)
            assert connected, code
        comm = self.socket
        leave_after = rng.randint(-1, 15)  # tokens read before cancelling / closing (-1: at once)
        await comm.send_json_to(
            {"type": "generate", "messages": [{"role": "user", "content": outcome.key}]}
        )
        tokens = 0
        while True:
            if outcome.behaviour in ("ws-cancel", "ws-close") and due(leave_after, outcome, tokens):
                if outcome.behaviour == "ws-close":
                    outcome.left = True
                    await self.close_socket(outcome)
                    return
                await comm.send_json_to({"type": "cancel"})
                outcome.behaviour = "ws-cancelled"  # then read to the end as usual
            frame = parse(await comm.receive_from(timeout=15))
            outcome.frames.append(frame)
            if frame["type"] == "start":
                outcome.session_id = frame["session_id"]
            elif frame["type"] == "token":
                tokens += 1
            elif frame["type"] in ("done", "error"):
                return
            else:
                outcome.problems.append(f"unexpected frame {frame}")

    # HTTP -----------------------------------------------------------------------------------------

    async def over_sse(self, outcome: Outcome, rng: random.Random) -> None:
        leave_after = rng.randint(-1, 15) if outcome.behaviour == "sse-leave" else None
        body = {"messages": [{"role": "user", "content": outcome.key}], "stream": True}
        comm = ApplicationCommunicator(self.app, http_scope())
        await comm.send_input(
            {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        )
        buffer = b""
        tokens = 0
        try:
            while True:
                if leave_after is not None and due(leave_after, outcome, tokens):
                    outcome.left = True
                    await comm.send_input({"type": "http.disconnect"})
                    await comm.wait(timeout=10)
                    rest = b""
                    while not comm.output_queue.empty():
                        rest += comm.output_queue.get_nowait().get("body", b"")
                    outcome.after_leaving, _ = sse_frames(buffer + rest)
                    return
                message = await comm.receive_output(timeout=15)
                if message["type"] == "http.response.start":
                    outcome.http_status = message["status"]
                    continue
                buffer += message.get("body", b"")
                frames, buffer = sse_frames(buffer)
                for frame in frames:
                    outcome.frames.append(frame)
                    if frame["type"] == "start":
                        outcome.session_id = frame["session_id"]
                    elif frame["type"] == "token":
                        tokens += 1
                if not message.get("more_body"):
                    assert not buffer, buffer
                    await comm.wait(timeout=10)
                    return
        finally:
            if not comm.future.done():
                comm.future.cancel()

    async def over_json(self, outcome: Outcome) -> None:
        body = {"messages": [{"role": "user", "content": outcome.key}]}
        comm = ApplicationCommunicator(self.app, http_scope())
        await comm.send_input(
            {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        )
        start = await comm.receive_output(timeout=15)
        outcome.http_status = start["status"]
        content = b""
        while True:
            message = await comm.receive_output(timeout=15)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        await comm.wait(timeout=10)
        text = content.decode()
        assert "Traceback" not in text, text
        outcome.json_body = json.loads(text)
        if outcome.http_status == 200:
            outcome.session_id = outcome.json_body["session_id"]


# Checks -----------------------------------------------------------------------------------------


STATUS_OF_FINISH: dict[str | None, str] = {
    "stop": "completed",
    "length": "completed",
    "cancelled": "cancelled",
}


def check(
    outcome: Outcome, stored: tuple[Session, str] | None, attempts: list[Attempt], lagged: bool
) -> list[str]:
    """What is wrong with this session, as stored and as its client saw it."""
    problems = list(outcome.problems)
    end = outcome.end
    if stored is None:
        # Only a client that left before its generation began may leave no session behind.
        if outcome.sent or not outcome.left:
            problems.append(
                f"no session stored; the client was sent {outcome.sent[:2]}...{outcome.sent[-1:]}"
            )
        return problems
    session, text = stored
    if outcome.session_id is not None and str(session.pk) != outcome.session_id:
        problems.append(f"stored as {session.pk}, its client was told {outcome.session_id}")
    if session.status == Session.Status.STREAMING:
        return [*problems, "left streaming"]
    if session.finished_at is None:
        problems.append("no finish time")

    if outcome.face == "json":
        return problems + check_json(outcome, session, text, attempts, lagged)

    sent_frames = outcome.sent
    kinds = [f["type"] for f in sent_frames]
    if kinds and kinds[0] != "start" and kinds != ["error"]:  # a lone error: nothing was generated
        problems.append(f"first frame {sent_frames[0]}")
    if kinds.count("start") > 1 or kinds.count("done") + kinds.count("error") > 1:
        problems.append(f"frames out of order: {kinds}")
    if end is not None and kinds[-1] not in ("done", "error"):
        problems.append(f"frames after the end: {kinds[-3:]}")

    sent_text = "".join(f["text"] for f in sent_frames if f["type"] == "token")
    if end is not None:
        # The server sent its end: the stored reply is exactly what it sent, and so is the status.
        if text != sent_text:
            problems.append(f"stored {text!r} but sent {sent_text!r}")
        problems += check_end(end, session)
    else:
        # The client left before the end was sent: the session is stored with all it was sent
        # (the text of a piece that was in flight when the client left may follow it).
        if not outcome.left:
            problems.append("the client stayed but got no end frame")
        if not text.startswith(sent_text):
            problems.append(f"stored {text!r} does not start with what was sent {sent_text!r}")
        if session.status == Session.Status.CANCELLED and session.finish_reason != "cancelled":
            problems.append(f"cancelled with finish reason {session.finish_reason!r}")
    if not outcome.left and not text.startswith(outcome.text):
        problems.append(f"stored {text!r} does not start with what was read {outcome.text!r}")

    problems += check_upstream(outcome, end, text, attempts, lagged)
    return problems


def check_end(end: dict[str, Any], session: Session) -> list[str]:
    problems = []
    if end.get("session_id") != str(session.pk):
        problems.append(f"end frame for another session: {end}")
    if end["type"] == "done":
        expected = STATUS_OF_FINISH.get(end["finish_reason"])
        if (session.status, session.finish_reason) != (expected, end["finish_reason"]):
            problems.append(
                f"done {end['finish_reason']} stored as {session.status}/{session.finish_reason!r}"
            )
        if session.error_code:
            problems.append(f"done but stored error {session.error_code}")
        usage = end.get("usage") or {}
        if usage.get("completion_tokens") != session.completion_tokens:
            problems.append(
                f"usage {usage} but stored {session.completion_tokens} completion tokens"
            )
    else:
        if end["code"] not in END_CODES:
            problems.append(f"unexpected error {end}")
        if "Traceback" in end.get("message", ""):
            problems.append("a traceback in an error frame")
        if (session.status, session.error_code) != ("failed", end["code"]):
            problems.append(
                f"error {end['code']} stored as {session.status}/{session.error_code!r}"
            )
        if session.error_message != end.get("message"):
            problems.append(
                f"error message {end.get('message')!r} stored as {session.error_message!r}"
            )
    return problems


def explained(
    expected: tuple[str, str], got: tuple[str, str | None], last: Attempt, lagged: bool
) -> bool:
    """Whether an end other than the one the upstream called for is still right."""
    if last.kind == "cut0" and got == ("error", "LLM_UNAVAILABLE"):
        return True  # the cut came before the response head: a reset connection
    # The whole world runs in this one event loop: when it stalled for longer than the idle
    # timeout (measured), an in-time upstream may rightly look stalled to the relay.
    return cut_short(got, lagged)


def cut_short(end: tuple[str, str | None], lagged: bool) -> bool:
    """Whether a timeout may have come before the last tokens the upstream wrote were read: with
    the loop stalled past the idle timeout, the upstream (in this loop too) writes them late."""
    return lagged and end == ("error", "LLM_TIMEOUT")


def check_upstream(
    outcome: Outcome, end: dict[str, Any] | None, text: str, attempts: list[Attempt], lagged: bool
) -> list[str]:
    """For clients that let the generation run: the end and the text the upstream called for."""
    if not attempts:
        return (
            []
            if outcome.left or outcome.behaviour == "ws-cancelled"
            else ["the upstream was never asked"]
        )
    problems = []
    for earlier in attempts[:-1]:
        if not earlier.may_be_retried:
            problems.append(f"retried after {earlier.kind}")
    if len(attempts) > MAX_RETRIES + 1:
        problems.append(f"{len(attempts)} attempts")
    last = attempts[-1]
    if not last.sent.startswith(text):
        problems.append(
            f"stored {text!r} is not what the upstream sent ({last.kind}): {last.sent!r}"
        )
    if outcome.behaviour in ("ws-read", "sse-read") and end is not None:
        if last.retryable_before_text and len(attempts) <= MAX_RETRIES:
            problems.append(f"{last.kind} before any text was not retried")
        expected = last.expected_end()
        got = (end["type"], end.get("finish_reason") or end.get("code"))
        if got != expected and not explained(expected, got, last, lagged):
            problems.append(f"upstream {last.kind} ended {got}, expected {expected}")
        if text != last.sent and got == expected and not cut_short(got, lagged):
            problems.append(f"upstream {last.kind} sent {last.sent!r}, the relay kept {text!r}")
    return problems


def check_json(
    outcome: Outcome, session: Session, text: str, attempts: list[Attempt], lagged: bool
) -> list[str]:
    problems = []
    body = outcome.json_body or {}
    last = attempts[-1] if attempts else None
    if outcome.http_status == 200:
        if text != body.get("content"):
            problems.append(f"stored {text!r}, returned {body.get('content')!r}")
        finish = body.get("finish_reason")
        if (session.status, session.finish_reason) != (STATUS_OF_FINISH.get(finish), finish):
            problems.append(
                f"returned {finish} but stored {session.status}/{session.finish_reason!r}"
            )
        expected: tuple[str, str | None] = ("done", finish)
    else:
        code = body.get("error", {}).get("code")
        if HTTP_STATUS.get(code) != outcome.http_status:
            problems.append(f"HTTP {outcome.http_status} with {body}")
        if (session.status, session.error_code) != ("failed", code):
            problems.append(f"error {code} stored as {session.status}/{session.error_code!r}")
        expected = ("error", code)
    if last is not None:
        if last.expected_end() != expected and not explained(
            last.expected_end(), expected, last, lagged
        ):
            problems.append(
                f"upstream {last.kind} ended {expected}, expected {last.expected_end()}"
            )
        if not last.sent.startswith(text):
            problems.append(
                f"stored {text!r} is not what the upstream sent ({last.kind}): {last.sent!r}"
            )
        elif (
            text != last.sent
            and last.expected_end() == expected
            and not cut_short(expected, lagged)
        ):
            problems.append(f"upstream {last.kind} sent {last.sent!r}, the relay kept {text!r}")
    return problems


# Process resources ------------------------------------------------------------------------------


def _tcp_table() -> dict[str, str]:
    """Socket inode -> 'local->remote' for this process's network namespace."""
    table = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/self/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], parts[9]
            table[inode] = (
                f"{int(local.rsplit(':', 1)[1], 16)}->{int(remote.rsplit(':', 1)[1], 16)}"
            )
    return table


def ignored_ports() -> set[int]:
    """Ports of the database and Redis: their client pools are not the relay's sockets."""
    ports = set()
    db = settings.DATABASES["default"]
    if db.get("PORT") or "postgresql" in db["ENGINE"]:
        ports.add(int(db.get("PORT") or 5432))
    if getattr(settings, "REDIS_URL", ""):
        ports.add(urlsplit(settings.REDIS_URL).port or 6379)
    return ports


def open_sockets() -> dict[str, str]:
    """This process's open sockets: inode -> description ('tcp 4711->8000', 'unix/other')."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (or the listing's own descriptor)
        if target.startswith("socket:["):
            found[target[8:-1]] = "socket"
    table = _tcp_table()
    skip = ignored_ports()
    result = {}
    for inode in found:
        description = table.get(inode)
        if description is not None:
            local, remote = (int(p) for p in description.split("->"))
            if local in skip or remote in skip:
                continue
            result[inode] = f"tcp {description}"
        else:
            result[inode] = "unix/other"
    return result


def live_tasks(exclude: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t not in exclude and t is not asyncio.current_task()
    ]


async def settle(condition: Callable[[], Any], timeout: float = SETTLE) -> Any:
    """Poll until `condition()` is falsy (nothing left over).

    Or return what is left after `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = condition()
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


class LoopLag:
    """How late the event loop runs a 10 ms timer: the time in which nothing else could run."""

    def __init__(self) -> None:
        self.max = 0.0
        self.over = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            late = loop.time() - before - 0.01
            self.max = max(self.max, late)
            self.over += late > IDLE_TIMEOUT


# The test ---------------------------------------------------------------------------------------


@pytest.fixture
async def chaos(
    llm_config: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ChaosUpstream]:
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        # Django runs each HTTP request's sync code in a thread of its own; on the suite's
        # in-memory SQLite (shared cache, table locks, no busy timeout) concurrent writers from
        # those threads fail with "database table is locked", which a file database (WAL, busy
        # timeout: what production uses) or PostgreSQL never does. Here HTTP requests use the
        # one database thread WebSocket consumers use; the relay's own code is unchanged.
        monkeypatch.setattr(
            django.core.handlers.asgi, "ThreadSensitiveContext", contextlib.nullcontext
        )
    fake = ChaosUpstream(SEED)
    url = await fake.start()
    llm_config(
        retry_delay=0,
        max_retries=MAX_RETRIES,
        idle_timeout=IDLE_TIMEOUT,
        max_connections=400,
        lm_studio={"base_url": url, "default_model": MODEL},
    )
    yield fake
    await providers.aclose()
    await fake.stop()
    await sync_to_async(connections.close_all)()


@sync_to_async
def stored_sessions() -> dict[str, tuple[Session, str]]:
    """Each stored session by its client's key (the first user message), with its reply text."""
    by_id = {str(s.pk): s for s in Session.objects.all()}
    first: dict[str, str] = {}
    replies: dict[str, str] = {}
    for sid, position, role, content in Message.objects.order_by(
        "session_id", "position"
    ).values_list("session_id", "position", "role", "content"):
        sid = str(sid)
        if position == 0:
            first[sid] = content
        elif position == 1 and role == Message.Role.ASSISTANT:
            replies[sid] = content
    return {key: (by_id[sid], replies.get(sid, "")) for sid, key in first.items()}


@pytest.mark.slow
async def test_fault_soak_200_concurrent_sessions(
    chaos: ChaosUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    from negotiator.asgi import application

    # Thousands of expected failures: not their INFO lines, nor Django's for each 502/503.
    caplog.set_level(logging.WARNING, logger="llm")
    caplog.set_level(logging.CRITICAL, logger="django.request")

    # Warm up (start-up recovery, the provider's client, the channel layer, the database thread),
    # then take the baseline.
    warm = WebsocketCommunicator(application, PATH, headers=LOCALHOST)
    assert (await warm.connect(timeout=10))[0]
    await warm.send_json_to(
        {"type": "generate", "messages": [{"role": "user", "content": "warm-up"}]}
    )
    while parse(await warm.receive_from(timeout=10))["type"] not in ("done", "error"):
        pass
    await warm.disconnect(timeout=10)
    await providers.aclose()
    await settle(lambda: chaos._tasks)
    baseline_sockets = open_sockets()
    baseline_tasks = set(asyncio.all_tasks())

    lag = LoopLag()
    lag.start()
    started = time.monotonic()
    outcomes: list[Outcome] = []
    clients = [Client(n, started + SOAK_SECONDS, outcomes) for n in range(CLIENTS)]
    results = await asyncio.gather(*(c.run() for c in clients), return_exceptions=True)
    soak_time = time.monotonic() - started
    lag.stop()
    crashed = [r for r in results if isinstance(r, BaseException)]
    assert not crashed, f"{len(crashed)} clients crashed, first: {crashed[0]!r}"

    # Nothing left running: no upstream stream, no session streaming, no task, no socket.
    assert await settle(lambda: chaos.active) == 0, "upstream streams left open"

    async def streaming() -> int:
        return await Session.objects.filter(status=Session.Status.STREAMING).acount()

    deadline = time.monotonic() + SETTLE
    while await streaming() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left_streaming = await streaming()

    leftover_tasks = await settle(
        lambda: [t for t in live_tasks(baseline_tasks) if t not in chaos._tasks]
    )
    pool = get_provider("lm_studio").client._transport._pool  # type: ignore[attr-defined]
    busy = await settle(
        lambda: [repr(c) for c in pool.connections if not (c.is_idle() or c.is_closed())]
    )
    new_sockets = {i: d for i, d in open_sockets().items() if i not in baseline_sockets}
    upstream_port = int(chaos.base_url.rsplit(":", 1)[1].split("/")[0])
    # The pool may keep idle keep-alive connections to the upstream (client and server ends).
    foreign = {
        i: d for i, d in new_sockets.items() if str(upstream_port) not in d.split()[-1].split("->")
    }
    keepalive_limit = settings.LLM["DEFAULTS"]["max_keepalive"]

    await providers.aclose()  # closes the idle keep-alive connections
    after_close = await settle(
        lambda: {i: d for i, d in open_sockets().items() if i not in baseline_sockets}
    )
    tasks_after_close = await settle(lambda: live_tasks(baseline_tasks))
    final_sockets = open_sockets()

    stored = await stored_sessions()
    problems: dict[str, list[str]] = {}
    for outcome in outcomes:
        found = check(
            outcome, stored.get(outcome.key), chaos.attempts.get(outcome.key, []), lag.over > 0
        )
        if found:
            problems[f"{outcome.key} ({outcome.behaviour})"] = found
    unknown = set(stored) - {o.key for o in outcomes} - {"warm-up"}

    statuses = Counter(s.status for s, _ in stored.values())
    ends = Counter(
        (o.end or {}).get("finish_reason")
        or (o.end or {}).get("code")
        or ("left" if o.left else "?")
        for o in outcomes
        if o.face != "json"
    )
    kinds = Counter(a.kind for tries in chaos.attempts.values() for a in tries)
    summary = (
        f"seed {SEED}: {len(outcomes)} sessions by {CLIENTS} clients in {soak_time:.1f} s; "
        f"behaviours {dict(Counter(o.behaviour for o in outcomes))}; upstream {dict(kinds)}; "
        f"stored {dict(statuses)}; ends {dict(ends)}; event loop lag max {lag.max:.3f} s, "
        f"over {IDLE_TIMEOUT} s {lag.over} times"
    )
    print(summary)

    shown = "\n".join(f"  {k}: {v}" for k, v in list(problems.items())[:25])
    assert not problems, f"{len(problems)} sessions wrong ({summary}):\n{shown}"
    assert left_streaming == 0, f"{left_streaming} sessions left streaming"
    assert not unknown, f"sessions no client started: {sorted(unknown)[:5]}"
    assert len(outcomes) >= CLIENTS * 2, summary  # it did soak
    assert {"completed", "cancelled", "failed"} <= set(statuses), summary

    leaks = []
    if leftover_tasks:
        leaks.append(
            f"{len(leftover_tasks)} tasks left running: "
            + "; ".join(repr(t) for t in leftover_tasks[:5])
        )
    if busy:
        leaks.append(
            f"{len(busy)} upstream connections neither idle nor closed in the pool, "
            "with no request running "
            f"(each holds a socket and one of LLM_MAX_CONNECTIONS for good): {busy[:5]}"
        )
    if foreign:
        leaks.append(f"sockets left open besides the upstream pool: {sorted(foreign.values())}")
    if len(new_sockets) > 2 * keepalive_limit:
        leaks.append(
            f"{len(new_sockets)} sockets to or from the upstream, more than the keep-alive pool's "
            f"{keepalive_limit} connections (both ends)"
        )
    if after_close:
        leaks.append(
            f"sockets above the baseline once the pool closed: {sorted(after_close.values())}"
        )
    if tasks_after_close:
        leaks.append(
            "tasks left once the pool closed: " + "; ".join(repr(t) for t in tasks_after_close[:5])
        )
    if len(final_sockets) != len(baseline_sockets):
        leaks.append(
            f"{len(final_sockets)} sockets at the end, {len(baseline_sockets)} at the start"
        )
    assert not leaks, "\n".join(leaks)


# Found by the soak -----------------------------------------------------------------------------


class OneChunkUpstream(FakeUpstream):
    """Sends the whole SSE body in one HTTP chunk, as a buffering proxy (or a fast upstream whose
    events land in one network read) does; FakeUpstream sends one chunk per event."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self._pending: dict[asyncio.StreamWriter, bytes] = {}

    async def _raw(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self._pending[writer] = self._pending.get(writer, b"") + data

    async def _end(self, writer: asyncio.StreamWriter) -> None:
        body = self._pending.pop(writer, b"")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        await writer.drain()


@pytest.mark.parametrize("fault", ["error_after", "invalid_after"])
async def test_text_that_arrives_with_an_in_stream_error_is_kept(
    llm_config: Callable[..., Any], fault: str
) -> None:
    """Tokens the upstream sent before its error chunk reach the client and the stored session
    even when they arrive in the same network read as the error (the contract: a stream that
    ends by any fault keeps its partial text)."""
    from tests.llm.ws_client import (
        generate,
        open_socket,
        reply_text,
        text_of,
        until_end,
        wait_for_status,
    )

    fault_after: dict[str, Any] = {fault: 2}
    fake = OneChunkUpstream(Reply(tokens=["Hel", "lo", " there"], **fault_after))
    url = await fake.start()
    llm_config(max_retries=0, lm_studio={"base_url": url, "default_model": MODEL})
    comm = await open_socket()
    try:
        await generate(comm)
        frames = await until_end(comm)
        end = frames[-1]
        assert (end["type"], end["code"]) == ("error", "LLM_BAD_GATEWAY"), frames
        session, messages = await wait_for_status(end["session_id"], "failed")
        assert (session.status, reply_text(messages)) == ("failed", text_of(frames))
        assert text_of(frames) == "Hello", "the text sent before the error was dropped"
    finally:
        await comm.disconnect()
        await providers.aclose()
        await fake.stop()
        await sync_to_async(connections.close_all)()


async def test_clients_that_leave_early_do_not_use_up_the_upstream_pool(
    llm_config: Callable[..., Any],
) -> None:
    """Clients that leave (or cancel) while their upstream request is still being set up must
    not leave pool connections behind: with LLM_MAX_CONNECTIONS=4, a few such leaks and every
    later request waits for a free connection and fails (LLM_TIMEOUT), until a restart."""
    from llm.generation import Generation
    from llm.types import ChatRequest

    fake = FakeUpstream(Reply(tokens=[" t"] * 5, delay=0.001))
    url = await fake.start()
    llm_config(
        max_retries=0,
        max_connections=4,
        lm_studio={"base_url": url, "default_model": MODEL, "read_timeout": 1},
    )
    rng = random.Random(SEED)

    async def consume(generation: Generation) -> list[Any]:
        return [event async for event in generation.events()]

    try:
        for _ in range(200):
            task = asyncio.create_task(
                consume(Generation(ChatRequest(messages=[{"role": "user", "content": "x"}])))
            )
            await asyncio.sleep(rng.uniform(0, 0.004))  # the client leaves while the request starts
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.3)
        pool = get_provider("lm_studio").client._transport._pool  # type: ignore[attr-defined]
        stuck = [repr(c) for c in pool.connections if not (c.is_idle() or c.is_closed())]

        events = await consume(
            Generation(ChatRequest(messages=[{"role": "user", "content": "still there?"}]))
        )
        end = events[-1].frame()
        assert end["type"] == "done", (
            f"a later request failed: {end}; connections stuck in the pool: {stuck}"
        )
        assert not stuck, f"connections stuck in the pool with no request: {stuck}"
    finally:
        await providers.aclose()
        await fake.stop()
        await sync_to_async(connections.close_all)()
