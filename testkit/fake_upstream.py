"""A scriptable OpenAI-compatible upstream for tests and benchmarks, on a real socket.

It streams at a set rate, stalls, cuts the connection, sends error chunks or error statuses, and
records every request and every client that went away (`disconnects`), which a mock cannot.

    upstream = FakeUpstream(Reply(tokens=["Hi", "!"], delay=0.01))
    base_url = await upstream.start()          # http://127.0.0.1:<port>/v1
    upstream.replies.append(Reply(status=503))  # the next request gets this, later ones the default
    ...
    await upstream.stop()

Run alone (for `make run` or benchmarks):
`python -m testkit.fake_upstream --port 9000 --tokens 200`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    """How to answer one chat completion."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    ttft: float = 0.0  # seconds before the first token
    delay: float = 0.0  # seconds between tokens
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # a non-200 body (default: an OpenAI-style error object)
    finish_reason: str | None = "stop"  # None: end the stream without one
    usage: dict[str, int] | None = None  # sent as a last chunk, as with include_usage
    model: str = "fake-model"
    stall_after: int | None = None  # stop sending after this many tokens, keep the socket open
    keepalive: float | None = None  # while stalled, send an SSE comment this often
    cut_after: int | None = None  # close the socket mid-stream after this many tokens
    error_after: int | None = None  # send an in-stream error chunk after this many tokens
    invalid_after: int | None = None  # send a chunk that is not JSON after this many tokens
    done: bool = True  # send `data: [DONE]`
    timestamps: bool = False  # append the send time (perf_counter) to each token as "|<t>"

    @classmethod
    def from_spec(cls, spec: str) -> Reply:
        """A reply described in the model name, for benchmarks through a relay that passes the
        model on: `bench:tokens=2000,delay=0.02,ttft=0.2,timestamps=1` (`size=4096` pads each
        token to that many characters)."""
        options = dict(
            part.split("=", 1) for part in spec.removeprefix("bench:").split(",") if "=" in part
        )
        size = int(options.get("size", 0))
        return cls(
            tokens=[f" t{i}".ljust(size, ".") for i in range(int(options.get("tokens", 100)))],
            delay=float(options.get("delay", 0)),
            ttft=float(options.get("ttft", 0)),
            timestamps=options.get("timestamps", "0") == "1",
            model=spec,
        )


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float


class FakeUpstream:
    def __init__(self, default: Reply | None = None, *, models: list[str] | None = None) -> None:
        self.default = default or Reply()
        self.replies: deque[Reply] = deque()
        self.models = models or ["fake-model"]
        self.requests: list[Request] = []
        self.disconnects: list[float] = []  # when a client left before its reply ended
        self.completed = 0
        self.active = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.base_url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._serve, host, port)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://{host}:{port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def wait_for_disconnects(self, count: int = 1, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.disconnects) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return len(self.disconnects) >= count

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # Connection handling ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                keep_open = await self._answer(request, reader, writer)
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio reports handler tasks that end cancelled)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw
        return Request(method, path, headers, body, time.monotonic())

    async def _answer(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if request.method == "GET" and request.path.endswith("/models"):
            listing = {
                "object": "list",
                "data": [{"id": m, "object": "model"} for m in self.models],
            }
            await self._send_json(writer, 200, listing)
            return True
        if not request.path.endswith("/chat/completions"):
            await self._send_json(writer, 404, {"error": {"message": "not found"}})
            return True
        reply = self.replies.popleft() if self.replies else self.default
        model = request.body.get("model") if isinstance(request.body, dict) else None
        if isinstance(model, str) and model.startswith("bench:"):
            reply = Reply.from_spec(model)
        if reply.status != 200:
            body = (
                reply.body
                or json.dumps({"error": {"message": f"fake upstream says {reply.status}"}}).encode()
            )
            await self._send(
                writer, reply.status, body, {"content-type": "application/json", **reply.headers}
            )
            return True
        if not (isinstance(request.body, dict) and request.body.get("stream")):
            await asyncio.sleep(reply.ttft + reply.delay * len(reply.tokens))
            await self._send_json(writer, 200, self._completion(reply))
            return True
        return await self._stream(reply, reader, writer)

    async def _stream(
        self, reply: Reply, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Stream the reply while watching the socket: a client that leaves is recorded at once.

        The connection closes after each stream, so the watch never reads a next request.
        """
        self.active += 1
        streaming = asyncio.ensure_future(self._write_stream(reply, writer))
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and not streaming.done():
                self.disconnects.append(time.monotonic())
                streaming.cancel()
                return False
            gone.cancel()
            try:
                finished = streaming.result()
            except (ConnectionError, RuntimeError):
                self.disconnects.append(time.monotonic())
                return False
            if finished:
                self.completed += 1
            return False  # one stream per connection: no byte of a next request is misread
        finally:
            self.active -= 1
            for task in (streaming, gone):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _write_stream(self, reply: Reply, writer: asyncio.StreamWriter) -> bool:
        """Write the SSE body (chunked); False when the socket must close (a cut)."""
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            "cache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        writer.write(head.encode())
        if reply.ttft:
            await asyncio.sleep(reply.ttft)
        role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        await self._event(writer, self._chunk(reply, role))
        for index, token in enumerate(reply.tokens):
            if index == reply.cut_after:
                writer.write(b"5\r\ndata:")  # half a chunk, then the socket closes
                await writer.drain()
                return False
            if index == reply.stall_after:
                while True:
                    await asyncio.sleep(reply.keepalive or 3600)
                    await self._raw(writer, b": keep-alive\n\n")
            if index == reply.error_after:
                await self._event(
                    writer,
                    self._chunk(
                        reply,
                        {
                            "error": {"code": 502, "message": "Provider disconnected"},
                            "choices": [
                                {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
                            ],
                        },
                    ),
                )
                await self._end(writer)
                return True
            if index == reply.invalid_after:
                await self._raw(writer, b"data: {not json\n\n")
                await self._end(writer)
                return True
            if index and reply.delay:
                await asyncio.sleep(reply.delay)
            text = f"{token}|{time.perf_counter():.6f}" if reply.timestamps else token
            await self._event(
                writer,
                self._chunk(
                    reply,
                    {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                ),
            )
        if reply.finish_reason:
            await self._event(
                writer,
                self._chunk(
                    reply,
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]},
                ),
            )
        if reply.usage:
            await self._event(writer, self._chunk(reply, {"choices": [], "usage": reply.usage}))
        if reply.done:
            await self._raw(writer, b"data: [DONE]\n\n")
        await self._end(writer)
        return True

    def _chunk(self, reply: Reply, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": reply.model,
            **payload,
        }

    def _completion(self, reply: Reply) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": reply.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(reply.tokens)},
                    "finish_reason": reply.finish_reason or "stop",
                }
            ],
            **({"usage": reply.usage} if reply.usage else {}),
        }

    async def _event(self, writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
        await self._raw(writer, b"data: " + json.dumps(payload).encode() + b"\n\n")

    async def _raw(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()

    async def _end(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, body: Any) -> None:
        await self._send(
            writer, status, json.dumps(body).encode(), {"content-type": "application/json"}
        )

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--ttft", type=float, default=0.0)
    parser.add_argument("--timestamps", action="store_true")
    args = parser.parse_args()
    upstream = FakeUpstream(
        Reply(
            tokens=[f" t{i}" for i in range(args.tokens)],
            delay=args.delay,
            ttft=args.ttft,
            timestamps=args.timestamps,
        )
    )
    print(await upstream.start(args.host, args.port), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
