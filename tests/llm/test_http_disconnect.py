"""`POST /api/v1/llm/generate` closes its upstream request when the HTTP client leaves.

Issue 3, item 3.

Streaming or not, the upstream sees its client go within 1 s and the session is stored as
`cancelled` with the text generated so far. The ASGI app is driven directly, so the test can send
`http.disconnect` the way daphne does when the client's socket closes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator

from llm.models import Message, Session
from testkit.fake_upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

TOKENS = [f" t{i}" for i in range(100)]
FULL = "".join(TOKENS)


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
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }


async def start(body: dict[str, Any]) -> ApplicationCommunicator:
    from negotiator.asgi import application

    communicator = ApplicationCommunicator(application, http_scope())
    await communicator.send_input(
        {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
    )
    return communicator


async def wait_for_session_end(timeout: float = 3.0) -> Session:
    deadline = time.monotonic() + timeout
    while True:
        session = await Session.objects.afirst()
        if session is not None and session.status != Session.Status.STREAMING:
            return session
        assert time.monotonic() < deadline, f"the session did not end: {session}"
        await asyncio.sleep(0.02)


async def stored_reply(session: Session) -> str:
    reply = await Message.objects.filter(session=session, role="assistant").afirst()
    return reply.content if reply is not None else ""


async def finish(communicator: ApplicationCommunicator) -> None:
    """The app returns after the disconnect (no hanging task, no exception)."""
    await communicator.wait(timeout=3)


async def test_streaming_request_closes_upstream_when_client_leaves(upstream: Any) -> None:
    upstream.replies.append(Reply(tokens=TOKENS, delay=0.05))  # 5 s if nobody leaves
    communicator = await start({"messages": [{"role": "user", "content": "Count"}], "stream": True})

    start_message = await communicator.receive_output(timeout=5)
    assert start_message["type"] == "http.response.start"
    assert start_message["status"] == 200
    received = b""
    while b'"type":"token"' not in received.replace(b" ", b""):
        message = await communicator.receive_output(timeout=5)
        assert message["type"] == "http.response.body"
        received += message.get("body", b"")
    assert upstream.active == 1 and upstream.disconnects == []

    left_at = time.monotonic()
    await communicator.send_input({"type": "http.disconnect"})
    assert await upstream.wait_for_disconnects(1, timeout=1.0), "the upstream request stayed open"
    assert upstream.disconnects[0] - left_at < 1.0
    await finish(communicator)

    session = await wait_for_session_end()
    assert session.status == Session.Status.CANCELLED
    assert session.finish_reason == "cancelled"
    assert session.finished_at is not None
    text = await stored_reply(session)
    assert text, "the partial text was not kept"
    assert FULL.startswith(text) and len(text) < len(FULL)
    # At least what the client was sent before it left.
    sent_text = "".join(
        json.loads(line[len(b"data: ") :])["text"]
        for line in received.split(b"\n\n")
        if line.startswith(b"data: ") and json.loads(line[len(b"data: ") :])["type"] == "token"
    )
    assert text.startswith(sent_text)
    assert upstream.completed == 0


async def test_non_streaming_request_closes_upstream_when_client_leaves(upstream: Any) -> None:
    upstream.replies.append(
        Reply(tokens=TOKENS, delay=0.05, timestamps=True)
    )  # 5 s if nobody leaves
    communicator = await start({"messages": [{"role": "user", "content": "Count"}]})

    deadline = time.monotonic() + 5
    while not upstream.active:
        assert time.monotonic() < deadline, "the upstream was never called"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.4)  # the upstream sends a few tokens (one per 50 ms)
    assert upstream.disconnects == []

    left_at = time.monotonic()
    left_at_perf = time.perf_counter()
    await communicator.send_input({"type": "http.disconnect"})
    assert await upstream.wait_for_disconnects(1, timeout=1.0), "the upstream request stayed open"
    assert upstream.disconnects[0] - left_at < 1.0
    await finish(communicator)

    session = await wait_for_session_end()
    assert session.status == Session.Status.CANCELLED
    assert session.finish_reason == "cancelled"
    text = await stored_reply(session)
    assert text, "the partial text was not kept"
    # The text the upstream had sent so far: tokens in order, each sent before the client left,
    # and (give or take one in flight) all of those.
    parts = [p for p in text.split(" ") if p]
    names = [p.split("|")[0] for p in parts]
    sent_at = [float(p.split("|")[1]) for p in parts]
    assert names == [f"t{i}" for i in range(len(names))]
    assert all(t <= left_at_perf for t in sent_at)
    expected = int((left_at_perf - sent_at[0]) / 0.05) + 1
    assert len(names) >= min(expected - 2, 4), (len(names), expected)
    assert len(names) < len(TOKENS)
    assert upstream.completed == 0


async def test_client_that_stays_gets_the_whole_reply_and_upstream_completes(upstream: Any) -> None:
    """The control case: no disconnect, no cancellation."""
    upstream.replies.append(Reply(tokens=TOKENS[:5], delay=0.01))
    communicator = await start({"messages": [{"role": "user", "content": "Count"}]})
    response = await communicator.receive_output(timeout=5)
    assert response["status"] == 200
    body = await communicator.receive_output(timeout=5)
    assert json.loads(body["body"])["content"] == "".join(TOKENS[:5])
    await finish(communicator)

    assert upstream.disconnects == []
    session = await wait_for_session_end()
    assert session.status == Session.Status.COMPLETED
