"""`/ws/llm/stream/`: frame sequences, coalescing, cancel (frame and close), busy, bad input,
faults, continuation. Against the real ASGI `application` and a real-socket fake upstream.

Watching is in test_consumers_watch.py; origin, token auth and rate limit in
test_consumers_access.py.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from testkit.fake_upstream import FakeUpstream, Reply
from tests.llm.ws_client import (
    HELLO_REPLY,
    all_sessions,
    assert_sequence,
    drained,
    generate,
    generate_ok,
    open_socket,
    recv,
    reply_text,
    text_of,
    token_frames,
    tokens,
    until_end,
    wait_for_status,
)

# The consumer stores sessions from worker threads: only transactional tests see those writes.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]


# Frames -----------------------------------------------------------------------------------------


async def test_generate_frames_start_tokens_one_done_estimated_usage(
    upstream: FakeUpstream,
) -> None:
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    assert_sequence(frames)
    start, done = frames[0], frames[-1]
    assert start["provider"] == "lm_studio"
    assert start["model"] == "fake-model"  # as the upstream reported it
    uuid.UUID(start["session_id"])
    assert text_of(frames) == HELLO_REPLY
    assert done["session_id"] == start["session_id"]
    assert done["finish_reason"] == "stop"
    usage = done["usage"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Exactly one end: nothing follows the done frame.
    assert await comm.receive_nothing(timeout=0.2)

    session, messages = await wait_for_status(start["session_id"], "completed")
    assert session.status == "completed"
    assert session.model == "fake-model"
    assert session.provider == "lm_studio"
    assert session.finish_reason == "stop"
    assert session.usage_estimated is True
    assert messages == [("user", "Hi"), ("assistant", HELLO_REPLY)]
    await comm.disconnect()


async def test_done_carries_the_upstreams_usage(upstream: FakeUpstream) -> None:
    upstream.default = Reply(
        usage={"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    )
    comm = await open_socket()
    frames = await generate_ok(comm)
    assert frames[-1]["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 4,
        "total_tokens": 15,
        "estimated": False,
    }
    session, _ = await wait_for_status(frames[0]["session_id"], "completed")
    assert (session.prompt_tokens, session.completion_tokens, session.usage_estimated) == (
        11,
        4,
        False,
    )
    await comm.disconnect()


async def test_fast_reply_is_coalesced_into_far_fewer_frames(upstream: FakeUpstream) -> None:
    # One token a millisecond, each in a network read of its own: only coalescing (at most a
    # frame per 10 ms) makes fewer frames than tokens.
    reply = tokens(300)
    upstream.default = Reply(tokens=reply, delay=0.001)
    comm = await open_socket()
    frames = await generate_ok(comm, expected="".join(reply), max_tokens=5000)
    count = len(token_frames(frames))
    assert count < 100, f"{count} token frames for 300 tokens in about 0.3 s: not coalesced"
    await comm.disconnect()


async def test_start_frame_and_session_name_the_model_the_upstream_reports(
    upstream: FakeUpstream,
) -> None:
    """LM Studio serves its loaded model whatever name is asked: the reported name is stored."""
    upstream.models = ["listed-model"]
    upstream.default = Reply(model="loaded-model")
    comm = await open_socket()
    for asked in ({}, {"model": "asked-model"}):
        frames = await generate_ok(comm, **asked)
        assert frames[0]["model"] == "loaded-model"
        session, _ = await wait_for_status(frames[0]["session_id"], "completed")
        assert session.model == "loaded-model"
    assert [r.body["model"] for r in upstream.chat_requests] == ["listed-model", "asked-model"]
    await comm.disconnect()


async def test_slow_reply_arrives_one_frame_per_token(upstream: FakeUpstream) -> None:
    reply = tokens(8)
    upstream.default = Reply(tokens=reply, delay=0.03)
    comm = await open_socket()
    frames = await generate_ok(comm, expected="".join(reply))
    assert [f["text"] for f in token_frames(frames)] == reply
    await comm.disconnect()


# Cancel ---------------------------------------------------------------------------------------


async def test_cancel_frame_ends_with_cancelled_closes_upstream_and_keeps_partial_text(
    upstream: FakeUpstream,
) -> None:
    reply = tokens(100)
    upstream.replies.append(Reply(tokens=reply, delay=0.03))
    comm = await open_socket()
    await generate(comm)
    frames = [await recv(comm), await recv(comm), await recv(comm)]  # start and two tokens
    assert [f["type"] for f in frames] == ["start", "token", "token"]
    cancelled_at = time.monotonic()
    await comm.send_json_to({"type": "cancel"})
    frames += await until_end(comm)
    assert_sequence(frames)
    done = frames[-1]
    assert done["finish_reason"] == "cancelled"
    assert done["usage"]["estimated"] is True
    assert await upstream.wait_for_disconnects(1, timeout=1.0), (
        "the upstream request was not closed"
    )
    assert upstream.disconnects[0] - cancelled_at < 1.0, (
        "the upstream saw its client leave after 1 s"
    )
    partial = text_of(frames)
    assert partial and "".join(reply).startswith(partial) and partial != "".join(reply)

    session, messages = await wait_for_status(frames[0]["session_id"], "cancelled")
    assert session.status == "cancelled"
    assert session.finish_reason == "cancelled"
    assert reply_text(messages) == partial  # exactly what the client received

    # The same connection serves a normal generate afterwards.
    await generate_ok(comm)
    await comm.disconnect()


async def test_cancel_without_a_generation_is_harmless(upstream: FakeUpstream) -> None:
    comm = await open_socket()
    await comm.send_json_to({"type": "cancel"})
    assert await comm.receive_nothing(timeout=0.2)
    await generate_ok(comm)
    await comm.disconnect()


async def test_closing_the_socket_cancels_closes_upstream_and_stores_partial_text(
    upstream: FakeUpstream,
) -> None:
    reply = tokens(100)
    upstream.default = Reply(tokens=reply, delay=0.03)
    comm = await open_socket()
    await generate(comm)
    frames = [await recv(comm), await recv(comm), await recv(comm)]
    assert [f["type"] for f in frames] == ["start", "token", "token"]
    session_id = frames[0]["session_id"]
    closed_at = time.monotonic()
    await comm.disconnect(timeout=5)
    frames += drained(comm)
    assert await upstream.wait_for_disconnects(1, timeout=1.0), (
        "the upstream request was not closed"
    )
    assert upstream.disconnects[0] - closed_at < 1.0, "the upstream saw its client leave after 1 s"

    session, messages = await wait_for_status(session_id, "cancelled")
    assert session.status == "cancelled"
    assert session.finish_reason == "cancelled"
    stored = reply_text(messages)
    assert stored and "".join(reply).startswith(stored) and stored != "".join(reply)
    assert stored == text_of(frames)  # what was sent before the close, no more, no less


async def test_second_generate_while_streaming_is_refused_and_first_completes(
    upstream: FakeUpstream,
) -> None:
    reply = tokens(15)
    upstream.replies.append(Reply(tokens=reply, delay=0.02))
    comm = await open_socket()
    await generate(comm)
    first = await recv(comm)
    assert first["type"] == "start"
    await generate(comm, messages=[{"role": "user", "content": "again"}])
    frames = [first] + await until_end(comm)
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["GENERATION_IN_PROGRESS"]
    # The first generation is untouched and ends normally, after the refusal.
    frames = [f for f in frames if f["type"] != "error"]
    if frames[-1]["type"] != "done":
        frames += await until_end(comm)
    assert_sequence(frames)
    assert frames[-1]["finish_reason"] == "stop"
    assert text_of(frames) == "".join(reply)
    assert len(upstream.chat_requests) == 1
    assert len(await all_sessions()) == 1
    await generate_ok(comm)  # and once it has ended, a new generate works
    await comm.disconnect()


# Bad input ------------------------------------------------------------------------------------

BAD_FRAMES = [
    # (id, frame as text, code, words the message must contain)
    ("not-json", "{not json", "INVALID_JSON", []),
    ("list", "[1]", "INVALID_REQUEST", ["object"]),
    ("string", '"x"', "INVALID_REQUEST", ["object"]),
    ("null", "null", "INVALID_REQUEST", ["object"]),
    (
        "missing-type",
        '{"messages": [{"role": "user", "content": "Hi"}]}',
        "INVALID_REQUEST",
        ["type"],
    ),
    ("unknown-type", '{"type": "shout"}', "UNKNOWN_TYPE", ["shout"]),
    ("type-not-string", '{"type": 5}', "UNKNOWN_TYPE", []),
    ("missing-messages", '{"type": "generate"}', "INVALID_REQUEST", ["messages"]),
    ("empty-messages", '{"type": "generate", "messages": []}', "INVALID_REQUEST", ["messages"]),
    (
        "messages-not-list",
        '{"type": "generate", "messages": "Hi"}',
        "INVALID_REQUEST",
        ["messages"],
    ),
    (
        "unknown-role",
        '{"type": "generate", "messages": [{"role": "robot", "content": "Hi"}]}',
        "INVALID_REQUEST",
        ["role"],
    ),
    (
        "content-not-string",
        '{"type": "generate", "messages": [{"role": "user", "content": 5}]}',
        "INVALID_REQUEST",
        ["content"],
    ),
    (
        "missing-content",
        '{"type": "generate", "messages": [{"role": "user"}]}',
        "INVALID_REQUEST",
        ["content"],
    ),
    (
        "model-int",
        '{"type": "generate", "messages": [%s], "model": 5}',
        "INVALID_REQUEST",
        ["model"],
    ),
    (
        "model-too-long",
        '{"type": "generate", "messages": [%s], "model": "' + "m" * 256 + '"}',
        "INVALID_REQUEST",
        ["model", "255"],
    ),
    (
        "model-two-lines",
        '{"type": "generate", "messages": [%s], "model": "a\\nb"}',
        "INVALID_REQUEST",
        ["model", "one line"],
    ),
    (
        "max-tokens-str",
        '{"type": "generate", "messages": [%s], "max_tokens": "ten"}',
        "INVALID_REQUEST",
        ["max_tokens"],
    ),
    (
        "max-tokens-zero",
        '{"type": "generate", "messages": [%s], "max_tokens": 0}',
        "INVALID_REQUEST",
        ["max_tokens"],
    ),
    (
        "temperature-str",
        '{"type": "generate", "messages": [%s], "temperature": "hot"}',
        "INVALID_REQUEST",
        ["temperature"],
    ),
    (
        "extra-field",
        '{"type": "generate", "messages": [%s], "colour": "blue"}',
        "INVALID_REQUEST",
        ["colour"],
    ),
    (
        "session-malformed",
        '{"type": "generate", "messages": [%s], "session_id": "nope"}',
        "INVALID_REQUEST",
        ["session_id"],
    ),
    (
        "watch-malformed",
        '{"type": "watch", "session_id": "nope"}',
        "INVALID_REQUEST",
        ["session_id"],
    ),
    ("watch-missing", '{"type": "watch"}', "INVALID_REQUEST", ["session_id"]),
    ("cancel-extra", '{"type": "cancel", "now": true}', "INVALID_REQUEST", ["now"]),
]


@pytest.mark.parametrize(
    ("text", "code", "words"), [c[1:] for c in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES]
)
async def test_bad_frame_gets_error_and_connection_stays_usable(
    upstream: FakeUpstream, text: str, code: str, words: list[str]
) -> None:
    if "%s" in text:
        text = text % '{"role": "user", "content": "Hi"}'
    comm = await open_socket()
    await comm.send_to(text_data=text)
    error = await recv(comm)
    assert error["type"] == "error"
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error
    assert upstream.chat_requests == []
    await generate_ok(comm)
    await comm.disconnect()


async def test_unknown_session_id_is_session_not_found(upstream: FakeUpstream) -> None:
    comm = await open_socket()
    await generate(comm, session_id=str(uuid.uuid4()))
    frames = await until_end(comm)
    assert [f["type"] for f in frames] == ["error"]  # no start: nothing was generated
    assert frames[0]["code"] == "SESSION_NOT_FOUND"
    assert upstream.chat_requests == []
    assert await all_sessions() == []
    await generate_ok(comm)
    await comm.disconnect()


async def test_binary_frame_gets_error(upstream: FakeUpstream) -> None:
    comm = await open_socket()
    await comm.send_to(
        bytes_data=b'{"type": "generate", "messages": [{"role": "user", "content": "Hi"}]}'
    )
    error = await recv(comm)
    assert error["type"] == "error"
    assert error["code"] in ("INVALID_JSON", "INVALID_REQUEST")
    await generate_ok(comm)
    await comm.disconnect()


async def test_frame_over_the_configured_limit_is_too_large(
    upstream: FakeUpstream, settings: Any
) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1000
    comm = await open_socket()
    await generate(comm, messages=[{"role": "user", "content": "x" * 2000}])
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
    await comm.send_to(bytes_data=b"x" * 2000)
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
    assert upstream.chat_requests == []
    await generate_ok(comm)
    await comm.disconnect()


async def test_two_megabyte_frame_is_too_large_with_the_default_limit(
    upstream: FakeUpstream,
) -> None:
    comm = await open_socket()
    await generate(comm, messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
    assert len(error["message"]) < 500  # the frame is not echoed back
    # A frame of multi-byte characters under 1 Mi characters but over 1 MiB of UTF-8.
    frame = {"type": "generate", "messages": [{"role": "user", "content": "é" * (600 * 1024)}]}
    await comm.send_to(text_data=json.dumps(frame, ensure_ascii=False))
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "MESSAGE_TOO_LARGE")
    await generate_ok(comm)
    await comm.disconnect()


# Faults keep the partial text ---------------------------------------------------------------


def _configure(llm_config: Callable[..., Any], base_url: str, **options: Any) -> None:
    llm_config(lm_studio={"base_url": base_url, "default_model": ""}, max_retries=0, **options)


FAULTS = [
    ("stall", {"stall_after": 3}, "LLM_TIMEOUT"),
    ("cut", {"cut_after": 3}, "LLM_BAD_GATEWAY"),
    ("error-chunk", {"error_after": 3}, "LLM_BAD_GATEWAY"),
    ("invalid-json", {"invalid_after": 3}, "LLM_BAD_GATEWAY"),
    ("no-finish-reason", {"finish_reason": None}, "LLM_BAD_GATEWAY"),
]


@pytest.mark.parametrize(("fault", "code"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
async def test_fault_mid_stream_is_an_error_frame_and_keeps_partial_text(
    upstream: FakeUpstream, llm_config: Callable[..., Any], fault: dict[str, Any], code: str
) -> None:
    _configure(llm_config, upstream.base_url, idle_timeout=0.5)
    reply = tokens(6)
    upstream.default = Reply(tokens=reply, **fault)
    sent = "".join(reply) if "finish_reason" in fault else "".join(reply[:3])
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm, timeout=5)
    assert_sequence(frames, end="error")
    error = frames[-1]
    assert error["code"] == code, error
    assert error["session_id"] == frames[0]["session_id"]
    assert text_of(frames) == sent  # the tokens before the fault reached the client

    session, messages = await wait_for_status(frames[0]["session_id"], "failed")
    assert session.status == "failed"
    assert session.error_code == code
    assert session.error_message
    assert reply_text(messages) == sent
    upstream.default = Reply()
    await generate_ok(comm)
    await comm.disconnect()


async def test_refused_upstream_is_unavailable_without_start(
    upstream: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _configure(llm_config, f"http://127.0.0.1:{port}/v1")
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm, timeout=5)
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["code"] == "LLM_UNAVAILABLE"
    sessions = await all_sessions()
    assert len(sessions) == 1
    session_id = frames[0].get("session_id", str(sessions[0].pk))
    assert session_id == str(sessions[0].pk)
    session, messages = await wait_for_status(session_id, "failed")
    assert session.status == "failed"
    assert session.error_code == "LLM_UNAVAILABLE"
    assert messages == [("user", "Hi")]
    await comm.disconnect()


# Continuation ---------------------------------------------------------------------------------


async def test_generate_with_session_id_continues_the_stored_conversation(
    upstream: FakeUpstream,
) -> None:
    comm = await open_socket()
    first = await generate_ok(comm)
    session_id = first[0]["session_id"]
    upstream.replies.append(Reply(tokens=["Fine", ", thanks"]))
    turn = {"role": "user", "content": "How are you?"}
    second = await generate_ok(
        comm, expected="Fine, thanks", messages=[turn], session_id=session_id
    )
    assert second[0]["session_id"] == session_id
    assert second[-1]["session_id"] == session_id
    assert upstream.chat_requests[-1].body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": HELLO_REPLY},
        turn,
    ]
    _session, messages = await wait_for_status(session_id, "completed")
    assert messages == [
        ("user", "Hi"),
        ("assistant", HELLO_REPLY),
        ("user", "How are you?"),
        ("assistant", "Fine, thanks"),
    ]
    assert len(await all_sessions()) == 1
    await comm.disconnect()


async def test_continuing_a_session_that_is_streaming_is_refused(upstream: FakeUpstream) -> None:
    upstream.replies.append(Reply(tokens=tokens(20), delay=0.02))
    a, b = await open_socket(), await open_socket()
    await generate(a)
    start = await recv(a)
    await generate(
        b, messages=[{"role": "user", "content": "me too"}], session_id=start["session_id"]
    )
    frames = await until_end(b)
    assert frames[-1]["type"] == "error"
    assert frames[-1]["code"] == "GENERATION_IN_PROGRESS"
    frames_a = [start] + await until_end(a)
    assert_sequence(frames_a)
    assert text_of(frames_a) == "".join(tokens(20))
    _session, messages = await wait_for_status(start["session_id"], "completed")
    assert messages == [("user", "Hi"), ("assistant", "".join(tokens(20)))]
    await a.disconnect()
    await b.disconnect()


async def test_continuation_of_a_cancelled_session_sends_its_partial_reply(
    upstream: FakeUpstream,
) -> None:
    upstream.replies.append(Reply(tokens=tokens(100), delay=0.02))
    comm = await open_socket()
    await generate(comm)
    frames = [await recv(comm), await recv(comm)]
    await comm.send_json_to({"type": "cancel"})
    frames += await until_end(comm)
    partial = text_of(frames)
    session_id = frames[0]["session_id"]
    await generate_ok(comm, messages=[{"role": "user", "content": "go on"}], session_id=session_id)
    assert upstream.chat_requests[-1].body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "go on"},
    ]
    await comm.disconnect()
