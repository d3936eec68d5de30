"""Hardening (issue 6, item 2): hypothesis-generated input on `/ws/llm/stream/`.

Random JSON, dicts with a random or a real `type` and ill-typed fields, frames around and over
`LLM_MAX_REQUEST_BYTES`, unicode (escaped surrogates, control characters), deep nesting,
non-JSON text, binary frames, and rapid generate / cancel / watch sequences, each on a fresh
socket against the real ASGI application and a real-socket fake upstream. For every example:

- every frame the server sends is JSON text without a traceback, and is either a contract error
  frame (`{"type": "error", "code": <a code of CONTRACT.md>, "message": str}`) or part of a valid
  sequence: `start`, `token`..., exactly one `done` | `error` per generation, or `watching`;
- every frame the client sends gets exactly one answer (an error frame, a generation, a
  `watching`), except a valid `cancel` (none) and a watch replaced by the next watch;
- the socket stays open and then serves a normal generate;
- once the socket is closed, no generation, upstream request or task is left running, and no
  session is left `streaming` in the database.

Bounded for CI: fixed examples per test, `derandomize=True` (the same examples on every run), no
example database. A defect the fuzzer finds is pinned below with `@example`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone
from hypothesis import HealthCheck, example, given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import llm
import llm.consumers
import llm.generation
from llm.generation import Generation
from llm.models import Message, Session
from llm.providers import providers
from testkit.fake_upstream import FakeUpstream, Reply
from tests.llm.ws_client import generate_ok, open_socket

# The consumer stores sessions from worker threads: only transactional tests see those writes.
pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 4096  # LLM_MAX_REQUEST_BYTES for these tests: huge frames stay cheap
SERVER_RECURSION_LIMIT = 1000  # CPython's default, which daphne keeps
CONTRACT_CODES = {
    "LLM_PROVIDER_DISABLED",
    "LLM_TIMEOUT",
    "LLM_UNAVAILABLE",
    "LLM_BAD_GATEWAY",
    "LLM_BAD_REQUEST",
    "INVALID_JSON",
    "INVALID_REQUEST",
    "MESSAGE_TOO_LARGE",
    "UNKNOWN_TYPE",
    "GENERATION_IN_PROGRESS",
    "SESSION_NOT_FOUND",
    "UNAUTHORIZED",
    "RATE_LIMITED",
}
KNOWN_TYPES = ("generate", "cancel", "watch")
FINISH_REASONS = {"stop", "length", "cancelled"}
STATUSES = {"streaming", "completed", "cancelled", "failed", "interrupted"}
GENERATE_FIELDS = {"type", "messages", "model", "max_tokens", "temperature", "session_id"}
STORED_REPLY = "Stored reply."
LLM_DIR = Path(llm.__file__).parent
TESTS_DIR = Path(__file__).parent.parent

# Outcomes of one client frame besides an error code.
GENERATION, NOTHING, WATCHING = "<generation>", "<nothing>", "<watching>"

FUZZ = hsettings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# Strategies -------------------------------------------------------------------------------------

# Any code point a WebSocket text frame can carry (UTF-8: no lone surrogates), controls included.
TEXT_CHARS = st.characters(codec="utf-8")
# What message contents are made of: any of those, and often one that some layer treats specially
# (NUL, escape, DEL, line/paragraph separators, BOM, a combining mark, astral).
CONTENT_CHARS = TEXT_CHARS | st.sampled_from(
    ["\x00", "\x1b", "\x7f", "\u2028", "\u2029", "\ufeff", "\u0301", "\U0001f600"]
)
# Inside JSON strings surrogates can also come escaped (`"\ud800"`): lone ones included.
JSON_CHARS = st.characters(min_codepoint=0, max_codepoint=0x10FFFF)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(JSON_CHARS, max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(JSON_CHARS, max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)
field_names = st.sampled_from(
    sorted(GENERATE_FIELDS | {"role", "content", "stream", "text", "__proto__", ""})
) | st.text(TEXT_CHARS, max_size=10)
roles = st.sampled_from(["system", "user", "assistant"]) | json_values
near_messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": roles, "content": st.text(JSON_CHARS, max_size=40) | json_values}
        )
        | st.dictionaries(field_names, json_values, max_size=3)
        | json_values,
        max_size=3,
    )
    | json_values
)
ill_typed = {
    "messages": near_messages,
    "model": st.text(TEXT_CHARS, max_size=20) | json_values,
    "max_tokens": st.integers() | st.floats() | st.text(max_size=5) | json_values,
    "temperature": st.floats() | st.integers(-5, 5) | st.booleans() | json_values,
    "session_id": st.uuids().map(str) | st.text(max_size=40) | json_values,
}
typed_dicts = st.builds(
    lambda kind, known, other: {"type": kind, **known, **other},
    st.sampled_from(KNOWN_TYPES) | st.text(TEXT_CHARS, max_size=12) | json_values,
    st.fixed_dictionaries({}, optional=ill_typed),
    st.dictionaries(field_names, json_values, max_size=3),
)


@dataclass(frozen=True)
class Frame:
    """One client frame: text or bytes, and why it was made (shown when an example fails)."""

    data: str | bytes
    why: str = ""

    def __repr__(self) -> str:
        shown: str | bytes
        if isinstance(self.data, bytes):
            shown = self.data if len(self.data) <= 200 else self.data[:200] + b"..."
        else:
            shown = self.data if len(self.data) <= 200 else self.data[:200] + "..."
        return f"Frame({shown!r}, {len(self.data)} chars/bytes, {self.why!r})"


def dumped(value: Any, why: str, ascii_only: bool = True) -> Frame:
    """`value` as JSON text. Lone surrogates are always escaped (a text frame is UTF-8)."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(value)
    return Frame(text, why)


@st.composite
def json_frames(draw: st.DrawFn) -> Frame:
    return dumped(draw(json_values), "json value", draw(st.booleans()))


@st.composite
def typed_frames(draw: st.DrawFn) -> Frame:
    return dumped(draw(typed_dicts), "typed dict", draw(st.booleans()))


@st.composite
def not_json_frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(["text", "cut", "spliced", "blank"]))
    if kind == "text":
        return Frame(draw(st.text(TEXT_CHARS, max_size=60)), "text")
    valid = json.dumps({"type": "generate", "messages": [{"role": "user", "content": "Hi"}]})
    if kind == "cut":  # a valid frame cut short
        return Frame(valid[: draw(st.integers(0, len(valid) - 1))], "cut json")
    if kind == "spliced":  # a stray character inside a valid frame
        at = draw(st.integers(0, len(valid)))
        stray = draw(st.sampled_from(["\x00", "'", "}", "{", ",", "\\", "\ufeff", "NaN"]))
        return Frame(valid[:at] + stray + valid[at:], "spliced json")
    return Frame(draw(st.sampled_from(["", " ", "\n", "\ufeff{}", "null", "\x00"])), "blank-ish")


@st.composite
def binary_frames(draw: st.DrawFn) -> Frame:
    if draw(st.booleans()):
        return Frame(draw(st.binary(max_size=64)), "binary")
    size = draw(st.integers(LIMIT - 2, LIMIT + 2) | st.sampled_from([2 * LIMIT, 16 * LIMIT]))
    valid = json.dumps(
        {"type": "generate", "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()
    return Frame(valid + b" " * max(0, size - len(valid)), "sized binary json")


@st.composite
def sized_frames(draw: st.DrawFn) -> Frame:
    """A valid generate frame of exactly `size` UTF-8 bytes (multi-byte padding included)."""
    size = draw(st.integers(LIMIT - 3, LIMIT + 3) | st.integers(LIMIT // 2, 20 * LIMIT))
    pad = draw(st.sampled_from(["a", "é", "€", "𝄞", "\x01", "\\"]))
    head: dict[str, Any] = {"type": "generate", "messages": [{"role": "user", "content": ""}]}
    base = len(json.dumps(head, ensure_ascii=False).encode())
    unit = len(json.dumps(pad, ensure_ascii=False).encode()) - 2
    count = max(0, (size - base) // unit)
    head["messages"][0]["content"] = pad * count + "a" * max(0, size - base - count * unit)
    return Frame(json.dumps(head, ensure_ascii=False), f"generate of {size} bytes")


@st.composite
def deep_frames(draw: st.DrawFn) -> Frame:
    """Nesting up to past the JSON parser's depth limit.

    As the frame or inside one of its fields.
    """
    depth = draw(
        st.integers(1, 1100) | st.integers(940, 1030)
    )  # around Python's and orjson's limits
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    deep = opener * depth + "0" + closer * depth
    hi = '[{"role": "user", "content": "Hi"}]'
    where, template = draw(
        st.sampled_from(
            [
                ("frame", "%s"),
                ("type", '{"type": %s}'),
                ("messages", '{"type": "generate", "messages": %s}'),
                ("content", '{"type": "generate", "messages": [{"role": "user", "content": %s}]}'),
                ("model", '{"type": "generate", "messages": ' + hi + ', "model": %s}'),
                ("session_id", '{"type": "watch", "session_id": %s}'),
            ]
        )
    )
    return Frame(template % deep, f"depth {depth} as the {where}")


any_frame = st.one_of(
    json_frames(), typed_frames(), not_json_frames(), binary_frames(), sized_frames(), deep_frames()
)


REPLIES = {  # the fake upstream's reply to every generate of an example
    "instant": Reply(),
    "fast": Reply(delay=0.01),
    "slow": Reply(delay=0.03),
    # Cut at max_tokens=64 (llm_config): about 4 s, so only a cancel or a close ends it in time.
    "long": Reply(tokens=[f" t{i}" for i in range(200)], delay=0.06),
}
DEEP_TYPE = Frame('{"type": ' + "[" * 1000 + "0" + "]" * 1000 + "}", "a type nested 1000 deep")
HI = [{"role": "user", "content": "Hi"}]
NUL_CONTENT = Frame(
    json.dumps({"type": "generate", "messages": [{"role": "user", "content": "a\x00b"}]}),
    "a NUL in a message content",
)

# What the server must answer ------------------------------------------------------------------


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    return json.loads(text, parse_constant=refuse)


def _walk(value: Any) -> tuple[bool, int]:
    """Whether `value` holds a lone surrogate (in a key or a string), and its nesting depth.
    Iterative: frames nest deeper than Python's recursion limit."""
    surrogate, deepest = False, 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, str):
            surrogate = surrogate or any(0xD800 <= ord(c) <= 0xDFFF for c in item)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
    return surrogate, deepest


def _valid_uuid(value: Any) -> bool:
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def allowed_outcomes(frame: Frame) -> set[str]:
    """What the contract allows as the answer to `frame`.

    Error codes, GENERATION, NOTHING, WATCHING.
    """
    if isinstance(frame.data, bytes):
        return {"MESSAGE_TOO_LARGE"} if len(frame.data) > LIMIT else {"INVALID_JSON"}
    if len(frame.data.encode()) > LIMIT:
        return {"MESSAGE_TOO_LARGE"}
    try:
        value = _strict_json(frame.data)
    except RecursionError:  # deeper than Python's parser goes: the server may refuse it as not JSON
        return {"INVALID_JSON", "INVALID_REQUEST", "UNKNOWN_TYPE"}
    except ValueError:
        return {"INVALID_JSON"}
    allowed: set[str] = set()
    surrogate, depth = _walk(value)
    if surrogate or depth > 512:
        allowed.add("INVALID_JSON")  # not valid Unicode, or nested past a parser's limit
    if not isinstance(value, dict) or "type" not in value:
        return allowed | {"INVALID_REQUEST"}
    kind = value["type"]
    if kind is None:
        return allowed | {"INVALID_REQUEST", "UNKNOWN_TYPE"}
    if not isinstance(kind, str) or kind not in KNOWN_TYPES:
        return allowed | {"UNKNOWN_TYPE"}
    if kind == "cancel":
        return allowed | ({NOTHING} if value == {"type": "cancel"} else {"INVALID_REQUEST"})
    if kind == "watch":
        if set(value) == {"type", "session_id"} and _valid_uuid(value["session_id"]):
            return allowed | {"SESSION_NOT_FOUND", WATCHING}
        return allowed | {"INVALID_REQUEST"}
    messages = value.get("messages")
    if set(value) <= GENERATE_FIELDS and isinstance(messages, list) and messages:
        return allowed | {"INVALID_REQUEST", GENERATION}
    return allowed | {"INVALID_REQUEST"}


# The client side ------------------------------------------------------------------------------


@dataclass
class Checker:
    """Checks every server frame as it arrives and counts the answers."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    open: str | None = None  # session of the generation between its start and its end
    starts: int = 0
    done: int = 0
    errors_with_session: int = 0
    errors: list[str] = field(default_factory=list)  # codes of error frames without a session_id
    watching: list[dict[str, Any]] = field(default_factory=list)
    last_session: str | None = None

    @property
    def answers(self) -> int:
        return self.done + self.errors_with_session + len(self.errors) + len(self.watching)

    @property
    def ends(self) -> int:
        return self.done + self.errors_with_session + len(self.errors)

    def feed(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        assert kind == "websocket.send", (
            f"the server closed or sent {message!r}: the socket must stay open"
        )
        assert message.get("bytes") is None, f"binary frame from the server: {message!r}"
        text = message.get("text")
        assert isinstance(text, str), message
        assert "Traceback" not in text, text
        frame = json.loads(text)
        assert isinstance(frame, dict), text
        self.frames.append(frame)
        getattr(self, f"_{frame.get('type')}", self._unknown)(frame)

    def _unknown(self, frame: dict[str, Any]) -> None:
        raise AssertionError(f"not a contract frame: {frame!r}")

    def _start(self, frame: dict[str, Any]) -> None:
        assert self.open is None, f"start while {self.open} still streams: {frame!r}"
        assert set(frame) <= {"type", "session_id", "provider", "model", "tried"}, frame
        assert _valid_uuid(frame["session_id"]), frame
        assert isinstance(frame["provider"], str) and isinstance(frame["model"], str), frame
        self.open = self.last_session = frame["session_id"]
        self.starts += 1

    def _token(self, frame: dict[str, Any]) -> None:
        assert self.open is not None, f"token outside a generation: {frame!r}"
        assert (
            set(frame) == {"type", "text"} and isinstance(frame["text"], str) and frame["text"]
        ), frame

    def _done(self, frame: dict[str, Any]) -> None:
        assert self.open is not None and frame.get("session_id") == self.open, (
            f"done without its start: {frame!r}"
        )
        assert set(frame) == {"type", "session_id", "finish_reason", "usage"}, frame
        assert frame["finish_reason"] in FINISH_REASONS, frame
        usage = frame["usage"]
        assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated"}, (
            frame
        )
        counts = ("prompt_tokens", "completion_tokens")
        assert all(isinstance(usage[k], int) and usage[k] >= 0 for k in counts), frame
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], frame
        assert isinstance(usage["estimated"], bool), frame
        self.open = None
        self.done += 1

    def _error(self, frame: dict[str, Any]) -> None:
        assert set(frame) <= {"type", "code", "message", "session_id"}, frame
        assert frame.get("code") in CONTRACT_CODES, f"not a contract error code: {frame!r}"
        assert isinstance(frame.get("message"), str) and frame["message"], frame
        if "session_id" in frame:  # the end of a generation (before or after its start)
            assert _valid_uuid(frame["session_id"]), frame
            assert self.open in (None, frame["session_id"]), (
                f"error of another session while {self.open} streams: {frame!r}"
            )
            self.last_session = frame["session_id"]
            self.open = None
            self.errors_with_session += 1
        else:
            self.errors.append(frame["code"])

    def _watching(self, frame: dict[str, Any]) -> None:
        assert set(frame) == {"type", "session_id", "status", "text"}, frame
        assert _valid_uuid(frame["session_id"]), frame
        assert frame["status"] in STATUSES and isinstance(frame["text"], str), frame
        self.watching.append(frame)


class Socket:
    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.check = Checker()

    async def send(self, frame: Frame) -> None:
        # As `send_to` does, but empty frames too (a real client can send those).
        key = "bytes" if isinstance(frame.data, bytes) else "text"
        await self.comm.send_input({"type": "websocket.receive", key: frame.data})

    def poll(self) -> None:
        """Check what the server sent so far; the application must still run."""
        while not self.comm.output_queue.empty():
            self.check.feed(self.comm.output_queue.get_nowait())
        if self.comm.future.done():
            try:
                self.comm.future.result()
            except BaseException as exc:
                raise AssertionError(
                    f"the application crashed and dropped the socket: {exc!r}"
                ) from exc
            raise AssertionError("the application ended: the socket was dropped")

    async def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if condition():
                return
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}; last frames: {self.check.frames[-10:]!r}"
            )
            await asyncio.sleep(0.005)

    async def quiet(self, seconds: float = 0.1) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            await asyncio.sleep(0.005)
        self.poll()


# Fixtures and the scenario around every example ------------------------------------------------


@dataclass
class Env:
    upstream: FakeUpstream
    generations: list[Generation]
    watch_id: str  # a finished session, only ever watched
    continue_id: str  # a finished session, only ever continued


@database_sync_to_async
def _stored_session() -> str:
    session = Session.objects.create(
        provider="lm_studio",
        model="fake-model",
        status="completed",
        finish_reason="stop",
        finished_at=timezone.now(),
    )
    Message.objects.create(session=session, position=0, role="user", content="Hi")
    Message.objects.create(session=session, position=1, role="assistant", content=STORED_REPLY)
    return str(session.pk)


@database_sync_to_async
def _streaming_sessions() -> list[str]:
    return [
        str(pk)
        for pk in Session.objects.filter(status=Session.Status.STREAMING).values_list(
            "pk", flat=True
        )
    ]


@pytest.fixture
async def env(
    upstream: FakeUpstream, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Env]:
    settings.LLM_MAX_REQUEST_BYTES = LIMIT
    # A watch of an unknown session is answered after these: short, so examples stay fast.
    monkeypatch.setattr(llm.consumers, "WATCH_RETRY", 0.02)
    monkeypatch.setattr(llm.consumers, "NOT_STORED_TIMEOUT", 0.1)
    generations: list[Generation] = []

    class Recorded(Generation):  # the consumer's generations, to check that each one ended
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            generations.append(self)

    monkeypatch.setattr(llm.consumers, "Generation", Recorded)
    yield Env(upstream, generations, await _stored_session(), await _stored_session())
    await providers.aclose()


def _pending_tasks(baseline: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since `baseline` that still run, but the fake upstream's own."""
    left = []
    for task in asyncio.all_tasks() - baseline:
        if task.done() or task is asyncio.current_task():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and Path(code.co_filename) == TESTS_DIR / "fake_upstream.py":
            continue
        left.append(task)
    return left


def _from_llm(task: asyncio.Task[Any]) -> bool:
    coro: Any = task.get_coro()
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "ag_code", None)
        if code is not None and Path(code.co_filename).is_relative_to(LLM_DIR):
            return True
        coro = getattr(coro, "cr_await", None)
    return False


async def scenario(
    env: Env,
    body: Callable[[Socket], Any],
    *,
    reply: Reply | None = None,
    close_early: bool = False,
) -> None:
    """Open a socket, run `body`, check the socket still serves a generate, close it, check for
    leaks.

    Runs under Python's default recursion limit, as a server process does (Hypothesis raises it
    around each example, which would hide a frame nested deep enough to exhaust it).
    """
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(SERVER_RECURSION_LIMIT)
    try:
        await _scenario(env, body, reply=reply, close_early=close_early)
    finally:
        sys.setrecursionlimit(limit)


async def _scenario(
    env: Env, body: Callable[[Socket], Any], *, reply: Reply | None, close_early: bool
) -> None:
    env.upstream.default = reply or Reply(delay=0.01)
    env.upstream.replies.clear()
    env.generations.clear()
    baseline = asyncio.all_tasks()
    comm = await open_socket()
    sock = Socket(comm)
    failure: BaseException | None = None
    try:
        await body(sock)
        if not close_early:
            sock.poll()
            assert sock.check.open is None
            env.upstream.default = Reply(delay=0.01)
            sock.check.frames += await generate_ok(comm)  # the socket is still usable
    except BaseException as exc:
        failure = exc
    finally:
        if not comm.future.done():  # (a crashed application is reported above)
            await comm.disconnect(timeout=llm.consumers.CLOSE_TIMEOUT + 2)

    leaks = await _left_running(env, baseline)
    if leaks:
        await _clean_up(env, baseline)  # so the next example starts clean
    if failure is not None:
        if leaks:
            failure.add_note("and once the socket was closed: " + "; ".join(leaks))
        raise failure
    assert not leaks, "once the socket was closed: " + "; ".join(leaks)


async def _left_running(
    env: Env, baseline: set[asyncio.Task[Any]], timeout: float = 2.0
) -> list[str]:
    """What still runs (or is stored as running) after the socket closed, polled for `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        leaks = []
        if env.upstream.active:
            leaks.append(f"{env.upstream.active} upstream request(s) still streaming")
        # (A generation whose client left while its session was being looked up may keep no end:
        # nothing of it runs or is stored. What runs or is stored is checked here.)
        streaming = await _streaming_sessions()
        if streaming:
            leaks.append(f"sessions left streaming: {streaming}")
        tasks = _pending_tasks(baseline)
        if tasks:
            shown = (f"{'[llm] ' if _from_llm(t) else ''}{t!r}" for t in tasks)
            leaks.append("tasks still running: " + ", ".join(shown))
        if llm.generation._background:
            leaks.append(f"background tasks of llm.generation: {llm.generation._background}")
        groups = getattr(get_channel_layer(), "groups", None)
        if isinstance(
            groups, dict
        ):  # the in-memory layer: no group keeps a member of a closed socket
            members = {name: list(channels) for name, channels in groups.items() if channels}
            if members:
                leaks.append(f"channel-layer groups left behind: {members}")
        if not leaks or time.monotonic() > deadline:
            return leaks
        await asyncio.sleep(0.02)


async def _clean_up(env: Env, baseline: set[asyncio.Task[Any]]) -> None:
    for task in _pending_tasks(baseline):
        task.cancel()
    deadline = time.monotonic() + 10
    while (env.upstream.active or _pending_tasks(baseline)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


# Arbitrary frames, one at a time: each gets exactly the answer the contract allows -------------


async def answer_to(sock: Socket, env: Env, frame: Frame) -> str:
    """Send `frame`, wait for its one answer (an error code, GENERATION run to its end, WATCHING,
    or NOTHING after a while) and return it."""
    allowed = allowed_outcomes(frame)
    generations, errors, watching = (
        len(env.generations),
        len(sock.check.errors),
        len(sock.check.watching),
    )
    ends = sock.check.ends
    await sock.send(frame)
    started = time.monotonic()
    while True:
        sock.poll()
        if len(env.generations) > generations:
            await sock.until(
                lambda: sock.check.ends > ends and sock.check.open is None,
                5,
                f"the end of the generation of {frame!r}",
            )
            answer = GENERATION
            break
        if len(sock.check.errors) > errors:
            answer = sock.check.errors[errors]
            break
        if len(sock.check.watching) > watching:
            answer = WATCHING
            break
        if NOTHING in allowed and time.monotonic() - started > 0.1:
            answer = NOTHING
            break
        assert time.monotonic() - started < 5, f"no answer to {frame!r}"
        await asyncio.sleep(0.002)
    await sock.quiet(0.01)
    assert answer in allowed, (
        f"{frame!r} was answered {answer}, the contract allows {sorted(allowed)}"
    )
    return answer


@hsettings(FUZZ, max_examples=100)
@given(frames=st.lists(any_frame, min_size=1, max_size=4))
# Found by this test: a `type` nested 1,000 deep (valid JSON, 2 KB) crashes the consumer.
@example(frames=[DEEP_TYPE])
# Found on PostgreSQL, which cannot store a NUL: the reply streamed, then ended in INTERNAL_ERROR.
@example(frames=[NUL_CONTENT])
async def test_any_frame_gets_a_contract_answer_and_the_socket_stays_usable(
    env: Env, frames: list[Frame]
) -> None:
    note(f"frames: {frames!r}")

    async def body(sock: Socket) -> None:
        for frame in frames:
            before = sock.check.answers
            answer = await answer_to(sock, env, frame)
            count = sock.check.answers - before
            assert count == (0 if answer == NOTHING else 1), (
                f"{frame!r} got {count} answers: {sock.check.frames[-4:]!r}"
            )

    await scenario(env, body)


# Rapid generate / cancel / watch sequences, with junk in between --------------------------------


@dataclass(frozen=True)
class Action:
    name: str
    frame: Frame | None = None
    pause: float = 0.0
    messages: tuple[tuple[str, str], ...] = (("user", "go on"),)  # the new turn of a continuation

    def __repr__(self) -> str:
        if self.name == "pause":
            return f"pause({self.pause})"
        if self.frame is not None:
            return f"{self.name}({self.frame!r})"
        return f"{self.name}({list(self.messages)!r})"

    @property
    def turn(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def _pairs(messages: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


def _generate(messages: list[dict[str, Any]], **fields: Any) -> Frame:
    return dumped(
        {"type": "generate", "messages": messages, **fields}, "generate", ascii_only=False
    )


valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": st.text(CONTENT_CHARS, max_size=40),
        }
    ),
    min_size=1,
    max_size=3,
)
generate_options = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(TEXT_CHARS, min_size=1, max_size=20).filter(
            lambda m: not m.startswith("bench:")
        ),
        "max_tokens": st.integers(1, 64) | st.just(1_000_000),
        "temperature": st.floats(0, 2) | st.integers(0, 2),
    },
)
actions = st.one_of(
    st.builds(lambda m, o: Action("generate", _generate(m, **o)), valid_messages, generate_options),
    st.just(Action("generate", _generate([{"role": "user", "content": "Hi"}]))),
    st.just(Action("cancel", Frame('{"type": "cancel"}', "cancel"))),
    st.builds(
        lambda u: Action("watch", dumped({"type": "watch", "session_id": str(u)}, "watch unknown")),
        st.uuids(),
    ),
    st.just(Action("watch_stored")),
    st.builds(lambda m: Action("continue_stored", messages=_pairs(m)), valid_messages),
    st.builds(lambda m: Action("continue_last", messages=_pairs(m)), valid_messages),
    st.builds(
        lambda u: Action(
            "continue", _generate([{"role": "user", "content": "go on"}], session_id=str(u))
        ),
        st.uuids(),
    ),
    st.builds(
        lambda f: Action("junk", f),
        json_frames() | typed_frames() | not_json_frames() | binary_frames(),
    ),
    st.builds(lambda f: Action("big", f), sized_frames()),
    st.builds(lambda p: Action("pause", pause=p), st.sampled_from([0.0, 0.005, 0.02, 0.05])),
)


def _resolve(action: Action, sock: Socket, env: Env) -> Frame | None:
    if action.name == "watch_stored":
        return dumped({"type": "watch", "session_id": env.watch_id}, "watch a finished session")
    if action.name == "continue_stored":
        return _generate(action.turn, session_id=env.continue_id)
    if action.name == "continue_last":  # this socket's latest session (maybe still streaming)
        return _generate(action.turn, session_id=sock.check.last_session or str(uuid.uuid4()))
    return action.frame


@pytest.mark.slow
@hsettings(FUZZ, max_examples=80)
@given(
    steps=st.lists(actions, min_size=1, max_size=14),
    reply=st.sampled_from(sorted(REPLIES)),
    close_early=st.booleans(),
)
@example(  # the sequence of the issue
    steps=[
        Action("generate", _generate(HI)),
        Action("cancel", Frame('{"type": "cancel"}')),
        Action("cancel", Frame('{"type": "cancel"}')),
        Action("generate", _generate(HI)),
        Action(
            "watch", dumped({"type": "watch", "session_id": str(uuid.UUID(int=1))}, "watch unknown")
        ),
        Action("generate", _generate(HI)),
    ],
    reply="slow",
    close_early=False,
)
# Found by the first test: a frame that crashes the consumer while it streams leaves the
# generation running, the upstream request open and the session `streaming`, socket gone.
@example(
    steps=[
        Action("generate", _generate(HI)),
        Action("pause", pause=0.05),
        Action("junk", DEEP_TYPE),
    ],
    reply="long",
    close_early=False,
)
# Found on PostgreSQL: continuing a stored session with a NUL in the new turn ended in
# INTERNAL_ERROR.
@example(
    steps=[Action("continue_stored", messages=(("user", "a\x00b"),))],
    reply="fast",
    close_early=False,
)
async def test_rapid_sequences_end_every_generation_once_and_leave_nothing_running(
    env: Env, steps: list[Action], reply: str, close_early: bool
) -> None:
    sent: list[Frame] = []

    async def body(sock: Socket) -> None:
        for step in steps:
            sock.poll()
            if step.name == "pause":
                await asyncio.sleep(step.pause)
                continue
            frame = _resolve(step, sock, env)
            assert frame is not None
            sent.append(frame)
            await sock.send(frame)
        if close_early:  # close whatever is under way: nothing may be left running
            await asyncio.sleep(0.01)
            sock.poll()
            return
        if reply == "long":  # end the generation under way rather than wait for it
            sent.append(Frame('{"type": "cancel"}', "final cancel"))
            await sock.send(sent[-1])
        # Every frame answered once (a valid cancel: never; a watch replaced by the next watch:
        # maybe never), every generation ended once.
        outcomes = [allowed_outcomes(f) for f in sent]
        cancels = sum(1 for o in outcomes if o == {NOTHING})
        watches = [i for i, o in enumerate(outcomes) if WATCHING in o]
        replaced = len(watches) - 1 if watches else 0
        most = len(sent) - cancels
        await sock.until(
            lambda: (
                sock.check.open is None
                and all(g.finished_at is not None for g in env.generations)
                and sock.check.answers >= most - replaced
            ),
            5,
            "every frame answered and every generation ended",
        )
        await sock.quiet(0.15)
        assert sock.check.open is None
        assert most - replaced <= sock.check.answers <= most, (
            f"{len(sent)} frames ({cancels} cancels, {replaced} replaceable watches) got "
            f"{sock.check.answers} answers: {sock.check.frames!r}"
        )
        generation_ends = sock.check.done + sock.check.errors_with_session
        assert generation_ends <= len(env.generations) <= sock.check.ends, (
            f"{len(env.generations)} generations, {generation_ends} ends: {sock.check.frames!r}"
        )
        for watching in sock.check.watching:
            assert watching["session_id"] == env.watch_id and watching["status"] == "completed"
            assert watching["text"] == STORED_REPLY

    note(f"steps: {steps!r}; reply: {reply}; close_early: {close_early}")
    await scenario(env, body, reply=REPLIES[reply], close_early=close_early)
