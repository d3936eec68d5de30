"""The WebSocket contract on a real daphne server (issue 10, item 3), not only through channels'
in-process communicator.

One daphne serves the project with `LLM_MAX_REQUEST_BYTES` at 64 KiB (big frames stay cheap),
a second one with the default 1 MiB, both in front of one fake upstream process. Over them:
every bad frame of the in-process suite gets its error frame and the socket then streams a
reply; a frame up to the limit reaches the consumer, one over it gets `MESSAGE_TOO_LARGE` on a
socket that stays usable, one over the transport cap is closed with 1009 and a reason; invalid
UTF-8 and protocol violations are closed with RFC 6455's codes (1007, 1002), never a silent drop,
and a generation under way on such a socket stops; an unknown path is refused at the handshake
with one INFO line and no traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import path as route
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from negotiator.routing import CLOSE_NO_ROUTE, WebSocketRouter, websocket_urlpatterns
from negotiator.websocket_server import transport_cap
from testkit import servers
from tests.llm.test_consumers import BAD_FRAMES
from tests.raw_websocket import (
    client_frame,
    close_frame,
    closing_handshake,
    handshake,
    server_frames,
)

LIMIT = 64 * 1024  # LLM_MAX_REQUEST_BYTES of the main server
DEFAULT_LIMIT = 1024 * 1024
CAP = transport_cap(LIMIT)
TOKENS = 5  # the fake upstream's reply: " t0 t1 t2 t3 t4"
REPLY = "".join(f" t{i}" for i in range(TOKENS))
SLOW = "bench:tokens=400,delay=0.02"  # a model name the fake upstream answers slowly with
HI = [{"role": "user", "content": "Hi"}]
TIMEOUT = 5


@dataclass
class Site:
    base: str
    log: Path

    def url(self, path: str = "/ws/llm/stream/") -> str:
        return self.base.replace("http://", "ws://") + path

    def connect(self, path: str = "/ws/llm/stream/") -> Any:
        return websockets.connect(self.url(path), max_size=None, open_timeout=TIMEOUT)

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("websocket-daphne")


@pytest.fixture(scope="module")
def fake_llm(logs: Path) -> Iterator[str]:
    with servers.fake_upstream(logs, "--tokens", str(TOKENS)) as base:
        yield base


def _site(base: str, logs: Path) -> Site:
    return Site(base, logs / f"daphne-{base.rsplit(':', 1)[1]}.log")


@pytest.fixture(scope="module")
def site(logs: Path, fake_llm: str) -> Iterator[Site]:
    env = servers.project_env(logs, LM_STUDIO_BASE_URL=fake_llm, LLM_MAX_REQUEST_BYTES=str(LIMIT))
    with servers.daphne(env, logs) as base:
        yield _site(base, logs)


@pytest.fixture(scope="module")
def default_site(logs: Path, fake_llm: str, site: Site) -> Iterator[Site]:
    """The default limit (1 MiB), on the database `site` migrated."""
    env = servers.project_env(logs, LM_STUDIO_BASE_URL=fake_llm)
    with servers.daphne(env, logs, migrate=False) as base:
        yield _site(base, logs)


# Helpers --------------------------------------------------------------------------------------


def generate_of(size: int, pad: str = "a") -> str:
    """A valid generate frame of exactly `size` UTF-8 bytes (`pad` may be multi-byte)."""
    frame: dict[str, Any] = {"type": "generate", "messages": [{"role": "user", "content": ""}]}
    base = len(json.dumps(frame, ensure_ascii=False).encode())
    unit = len(pad.encode())
    count = (size - base) // unit
    frame["messages"][0]["content"] = pad * count + "a" * (size - base - count * unit)
    text = json.dumps(frame, ensure_ascii=False)
    assert len(text.encode()) == size
    return text


async def recv(ws: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    text = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(text, str), text
    assert "Traceback" not in text, text
    frame = json.loads(text)
    assert isinstance(frame, dict), text
    return frame


async def until_end(ws: Any, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await recv(ws)
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                return frames


async def streams_a_reply(ws: Any) -> list[dict[str, Any]]:
    """A normal generate on `ws` works: start, the tokens of the reply, done/stop."""
    await ws.send(json.dumps({"type": "generate", "messages": HI}))
    frames = await until_end(ws)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start" and kinds[-1] == "done", frames
    assert set(kinds[1:-1]) == {"token"}, kinds
    assert "".join(f["text"] for f in frames[1:-1]) == REPLY
    assert frames[-1]["finish_reason"] == "stop"
    return frames


async def closed_with(ws: Any, data: str | bytes | list[str]) -> tuple[int, str]:
    """Send `data` (a list: as fragments of one message): the close frame the server sent, once
    the socket is closed (1006: none, a dropped TCP). The close may interrupt the sending."""
    with pytest.raises(ConnectionClosedError) as closed:
        async with asyncio.timeout(TIMEOUT):
            await ws.send(data)
            while True:
                await ws.recv()
    received = closed.value.rcvd
    return (1006, "") if received is None else (received.code, received.reason)


def raw_close(site: Site, *frames: bytes) -> tuple[int, str]:
    """Send `frames` on a fresh raw socket; the server's close (code, reason), which must come,
    alone, and be followed by the end of the connection."""
    sock, head = handshake(site.base)
    with sock:
        assert b" 101 " in head.split(b"\r\n")[0], head
        sock.sendall(b"".join(frames))
        data, closed = closing_handshake(sock)
    assert closed, f"the server neither closed nor dropped the connection: {data!r}"
    sent = list(server_frames(data))
    assert [opcode for opcode, _ in sent] == [0x8], f"expected one close frame, got {sent!r}"
    found = close_frame(data)
    assert found is not None, data
    return found


async def session_status(base: str, session_id: str, until: str, timeout: float = 3.0) -> str:
    async with httpx.AsyncClient(base_url=base) as http:
        deadline = time.monotonic() + timeout
        while True:
            status = (await http.get(f"/api/v1/sessions/{session_id}")).json()["status"]
            if status == until or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.05)


# Every bad input of the in-process suite, on the real server ----------------------------------

# (id, frame (text or bytes), the codes the contract allows, words the message must contain)
CASES: list[tuple[str, str | bytes, set[str], list[str]]] = [
    (name, text % '{"role": "user", "content": "Hi"}' if "%s" in text else text, {code}, words)
    for name, text, code, words in BAD_FRAMES
] + [
    # test_consumers.py's other cases
    (
        "unknown-session",
        json.dumps({"type": "generate", "messages": HI, "session_id": str(uuid.UUID(int=7))}),
        {"SESSION_NOT_FOUND"},
        [],
    ),
    (
        "binary-json",
        json.dumps({"type": "generate", "messages": HI}).encode(),
        {"INVALID_JSON", "INVALID_REQUEST"},
        [],
    ),
    ("binary-over-limit", b"x" * (LIMIT + 1), {"MESSAGE_TOO_LARGE"}, []),
    ("text-over-limit", generate_of(LIMIT + 1), {"MESSAGE_TOO_LARGE"}, []),
    ("twice-the-limit", generate_of(2 * LIMIT), {"MESSAGE_TOO_LARGE"}, []),
    # fewer characters than the limit, more UTF-8 bytes
    ("multibyte-over-limit", generate_of(LIMIT + 2, pad="é"), {"MESSAGE_TOO_LARGE"}, []),
    # test_ws_fuzz.py's blank-ish, spliced and deep frames, and an escaped lone surrogate
    ("empty-text", "", {"INVALID_JSON"}, []),
    ("empty-binary", b"", {"INVALID_JSON"}, []),
    ("blank", " \n", {"INVALID_JSON"}, []),
    ("bom-object", "\ufeff{}", {"INVALID_JSON"}, []),
    ("nul", "\x00", {"INVALID_JSON"}, []),
    ("cut-json", '{"type": "generate", "messa', {"INVALID_JSON"}, []),
    ("nan", '{"type": "generate", "messages": NaN}', {"INVALID_JSON"}, []),
    (
        "lone-surrogate",
        '{"type": "generate", "messages": [{"role": "user", "content": "\\ud800"}]}',
        {"INVALID_JSON"},
        [],
    ),
    (
        "deep-type",
        '{"type": ' + "[" * 1000 + "0" + "]" * 1000 + "}",
        {"INVALID_JSON", "INVALID_REQUEST", "UNKNOWN_TYPE"},
        [],
    ),
    ("deep-frame", "[" * 1100 + "]" * 1100, {"INVALID_JSON", "INVALID_REQUEST"}, []),
]


@pytest.mark.parametrize(
    ("data", "codes", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_input_gets_its_error_frame_and_the_socket_streams_on(
    site: Site, data: str | bytes, codes: set[str], words: list[str]
) -> None:
    async with site.connect() as ws:
        await ws.send(data)
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] in codes, error
        assert set(error) == {"type", "code", "message"}, error
        assert len(error["message"]) < 500  # a big frame is not echoed back
        for word in words:
            assert word in error["message"], error
        await streams_a_reply(ws)


async def test_many_bad_frames_in_a_row_each_get_their_answer_on_one_socket(site: Site) -> None:
    # (not the unknown session: its answer comes from a task, maybe after later frames' answers)
    cases = [case for case in CASES if case[0] != "unknown-session"]
    async with site.connect() as ws:
        for _, data, _, _ in cases:
            await ws.send(data)
        answers = [await recv(ws) for _ in cases]
        for answer, (name, _, codes, _) in zip(answers, cases, strict=True):
            assert answer["type"] == "error" and answer["code"] in codes, (name, answer)
        await streams_a_reply(ws)


# Sizes: the limit, the transport cap ------------------------------------------------------------


async def test_a_frame_of_exactly_the_limit_reaches_the_consumer(site: Site) -> None:
    async with site.connect() as ws:
        await ws.send(generate_of(LIMIT))
        frames = await until_end(ws)
        assert [frames[0]["type"], frames[-1]["type"]] == ["start", "done"], frames[:1]
        await streams_a_reply(ws)


async def test_one_byte_over_the_limit_is_too_large_and_the_socket_streams_on(site: Site) -> None:
    async with site.connect() as ws:
        await ws.send(generate_of(LIMIT + 1))
        error = await recv(ws)
        assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
        assert str(LIMIT) in error["message"]
        await streams_a_reply(ws)


async def test_a_frame_of_exactly_the_cap_is_still_answered_too_large(site: Site) -> None:
    async with site.connect() as ws:
        await ws.send(generate_of(CAP))
        error = await recv(ws)
        assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
        await streams_a_reply(ws)


async def test_the_users_1_1_mb_frame_under_the_default_limit(default_site: Site) -> None:
    """The report: 1.1 MB over the default 1 MiB dropped the TCP connection, no error frame."""
    async with default_site.connect() as ws:
        await ws.send(generate_of(1_100_000))
        error = await recv(ws)
        assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
        assert str(DEFAULT_LIMIT) in error["message"]
        await streams_a_reply(ws)
        await ws.send(generate_of(DEFAULT_LIMIT))  # exactly the limit: generated
        frames = await until_end(ws)
        assert [frames[0]["type"], frames[-1]["type"]] == ["start", "done"], frames[:1]


@pytest.mark.parametrize("kind", ["text", "binary", "fragmented"])
async def test_a_message_over_the_transport_cap_is_closed_with_1009_and_a_reason(
    site: Site, kind: str
) -> None:
    big = generate_of(CAP + 1)
    half = len(big) // 2
    data: str | bytes | list[str] = big
    if kind == "binary":
        data = big.encode()
    elif kind == "fragmented":  # two frames, each under the cap, one message over it
        data = [big[:half], big[half:]]
    async with site.connect() as ws:
        code, reason = await closed_with(ws, data)
    assert code == 1009, (code, reason)
    assert str(CAP) in reason, reason


def test_the_cap_is_well_above_the_limit() -> None:
    assert transport_cap(LIMIT) == transport_cap(DEFAULT_LIMIT) == 16 * 1024 * 1024
    assert transport_cap(4 * DEFAULT_LIMIT) == 64 * 1024 * 1024


# Protocol violations: RFC 6455's close codes, never a silent drop -------------------------------


GENERATE = json.dumps({"type": "generate", "messages": HI}).encode()
VIOLATIONS = [
    # (id, frames, close code)
    ("invalid-utf8-text", [client_frame(b'{"type": "\xff\xfe"}')], 1007),
    ("utf8-cut-in-a-code-point", [client_frame("é".encode()[:1])], 1007),
    (
        "invalid-utf8-in-a-fragment",
        [client_frame(b'{"a": "', fin=False), client_frame(b"\xc3\x28", opcode=0x0)],
        1007,
    ),
    ("reserved-data-opcode", [client_frame(GENERATE, opcode=0x3)], 1002),
    ("reserved-control-opcode", [client_frame(b"", opcode=0xB)], 1002),
    ("rsv-bit-without-extension", [client_frame(GENERATE, rsv=0b100)], 1002),
    ("unmasked-client-frame", [client_frame(GENERATE, masked=False)], 1002),
    ("continuation-outside-a-message", [client_frame(GENERATE, opcode=0x0)], 1002),
    ("fragmented-control-frame", [client_frame(b"", opcode=0x9, fin=False)], 1002),
    ("announced-over-the-cap", [client_frame(b"{", length=CAP + 1)], 1009),
]


@pytest.mark.parametrize(
    ("frames", "code"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS]
)
def test_a_protocol_violation_is_closed_with_its_rfc_6455_code(
    site: Site, frames: list[bytes], code: int
) -> None:
    received, reason = raw_close(site, *frames)
    assert received == code, (received, reason)
    assert reason


@pytest.mark.parametrize(
    ("violation", "code"),
    [(client_frame(b"\xff"), 1007), (client_frame(b"", opcode=0x3), 1002),
     (client_frame(b"{", length=CAP + 1), 1009)],
    ids=["invalid-utf8", "reserved-opcode", "over-the-cap"],
)  # fmt: skip
async def test_a_generation_under_way_stops_when_the_client_breaks_the_protocol(
    site: Site, violation: bytes, code: int
) -> None:
    sock, head = handshake(site.base)
    with sock:
        assert b" 101 " in head.split(b"\r\n")[0], head
        generate = {"type": "generate", "model": SLOW, "messages": HI}
        sock.sendall(client_frame(json.dumps(generate).encode()))
        data, start = b"", None
        while start is None:
            data += sock.recv(65536)
            texts = [json.loads(p) for op, p in server_frames(data) if op == 0x1]
            start = next((f for f in texts if f["type"] == "start"), None)
        sock.sendall(violation)
        data, closed = closing_handshake(sock, data)
    assert closed
    found = close_frame(data)
    assert found is not None and found[0] == code, found
    # The consumer was told: the generation stopped there, stored `cancelled` (it streams ~8 s).
    assert await session_status(site.base, start["session_id"], "cancelled") == "cancelled"


# Unknown paths: refused at the handshake --------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/ws/nope/", "/", "/ws/llm/stream/extra/", "/ws/llm/", "/api/v1/health"]
)
async def test_an_unknown_path_is_refused_at_the_handshake_with_one_info_line(
    site: Site, path: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with site.connect(path):
            pass
    assert refused.value.response.status_code in (403, 404)
    deadline = time.monotonic() + 2
    while True:
        lines = [line for line in site.log_lines() if "no route" in line and f"{path!r}" in line]
        if lines or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 1, lines
    assert " INFO negotiator.websocket " in lines[0], lines
    log = "\n".join(site.log_lines())
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


# In process: the router alone ----------------------------------------------------------------


async def test_in_process_an_unknown_path_is_refused_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="negotiator.websocket")
    nested = WebSocketRouter([*websocket_urlpatterns, route("ws/more/", URLRouter([]))])
    for url in ("/ws/nope/", "/ws/more/nope/"):
        comm = WebsocketCommunicator(nested, url)
        assert await comm.connect(timeout=TIMEOUT) == (False, CLOSE_NO_ROUTE)
        await comm.wait(timeout=TIMEOUT)  # the refusal ends the application
    records = [r for r in caplog.records if r.name == "negotiator.websocket"]
    assert [(r.levelname, r.exc_info) for r in records] == [("INFO", None)] * 2
    assert "'/ws/nope/'" in records[0].getMessage()


async def test_a_value_error_of_a_routed_application_is_not_taken_for_no_route() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("No route found for path 'ws/x/'.")  # the router's words, not its frame

    comm = WebsocketCommunicator(WebSocketRouter([route("ws/x/", app)]), "/ws/x/")
    with pytest.raises(ValueError, match="No route found"):
        await comm.connect(timeout=0.5)  # (the communicator raises it once this has passed)


def test_the_servers_logged_no_traceback_and_no_error(site: Site, default_site: Site) -> None:
    """Run last: nothing any test above sent made either server log an error."""
    for server in (site, default_site):
        log = "\n".join(server.log_lines())
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
