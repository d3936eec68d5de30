"""The asyncio network backend under httpx: the same requests, pooling, timeouts and TLS checks."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm.local_model import free_port
from llm.providers.network import asyncio_transport

LIMITS = httpx.Limits(max_connections=5, max_keepalive_connections=5)


class Server:
    """A tiny HTTP/1.1 server.

    It answers `GET /` with "hello", counts connections, can close idle ones.
    """

    def __init__(self, *, answer: bool = True, keep_alive: bool = True) -> None:
        self.answer, self.keep_alive = answer, keep_alive
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if not self.answer:
                    await asyncio.sleep(3600)
                headers = "content-length: 5\r\n" + (
                    "" if self.keep_alive else "connection: close\r\n"
                )
                writer.write(f"HTTP/1.1 200 OK\r\n{headers}\r\n".encode() + b"hello")
                await writer.drain()
                if not self.keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Server, str]]:
    app = Server(**getattr(request, "param", {}))
    listener = await asyncio.start_server(app.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}/"
    for writer in app.writers:
        writer.close()
    listener.close()


async def test_a_request_and_keep_alive_reuse(server: tuple[Server, str]) -> None:
    app, url = server
    async with httpx.AsyncClient(transport=asyncio_transport(LIMITS)) as client:
        for _ in range(3):
            response = await client.get(url)
            assert response.status_code == 200 and response.text == "hello"
    assert app.connections == 1  # one pooled connection served all three


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    server: tuple[Server, str],
) -> None:
    app, url = server
    async with httpx.AsyncClient(transport=asyncio_transport(LIMITS)) as client:
        assert (await client.get(url)).text == "hello"
        for writer in app.writers:
            writer.close()  # the server drops the idle keep-alive connection
        await asyncio.sleep(0.05)
        assert (await client.get(url)).text == "hello"
    assert app.connections == 2


@pytest.mark.parametrize("server", [{"answer": False}], indirect=True)
async def test_a_silent_server_is_a_read_timeout(server: tuple[Server, str]) -> None:
    _, url = server
    async with httpx.AsyncClient(
        transport=asyncio_transport(LIMITS), timeout=httpx.Timeout(5, read=0.2)
    ) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(url)


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with httpx.AsyncClient(transport=asyncio_transport(LIMITS)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")


async def test_streaming_reads_arrive_as_they_are_sent() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"one", b"two", b"three"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/"
    async with httpx.AsyncClient(transport=asyncio_transport(LIMITS)) as client:
        async with client.stream("GET", url) as response:
            parts = [part async for part in response.aiter_bytes()]
    listener.close()
    assert parts == [b"one", b"two", b"three"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_is_verified(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    app = Server()
    listener = await asyncio.start_server(app.handle, "127.0.0.1", 0, ssl=server_context)
    url = f"https://localhost:{listener.sockets[0].getsockname()[1]}/"
    try:
        async with httpx.AsyncClient(transport=asyncio_transport(LIMITS)) as client:
            with pytest.raises(httpx.ConnectError):  # a self-signed certificate is refused
                await client.get(url)
        trusting = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(
            transport=asyncio_transport(LIMITS, verify=trusting)
        ) as client:
            response = await client.get(url)
            assert response.text == "hello"
            assert response.extensions["network_stream"].get_extra_info("ssl_object") is not None
    finally:
        for writer in app.writers:
            writer.close()
        listener.close()


# Through the proxy the environment names ----------------------------------------------------------


class ForwardProxy:
    """A plain-HTTP forward proxy: takes `POST http://host:port/path`, passes it on to that port
    of 127.0.0.1 whatever the host's name, and pipes the answer back."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, rest = head.split(b" ", 2)
            self.targets.append(target.decode())
            url = httpx.URL(target.decode())
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", url.port)  # any name
            up_writer.write(b" ".join([method, url.raw_path, rest]))

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                sink.close()

            await asyncio.gather(
                pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            writer.close()


async def test_the_provider_goes_through_the_environments_proxy(
    upstream: Any, llm_config: Any, monkeypatch: pytest.MonkeyPatch, close_clients: None
) -> None:
    """HTTP(S)_PROXY as httpx reads it (given a transport of ours, httpx alone would ignore it),
    minus NO_PROXY. The upstream's name resolves only at the proxy, which sends it to 127.0.0.1."""
    from llm import ChatRequest, get_provider
    from llm.exceptions import UpstreamUnavailable
    from llm.providers.network import ReclaimingHTTPProxy

    proxy = ForwardProxy()
    listener = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    port = httpx.URL(upstream.base_url).port
    llm_config(
        lm_studio={"base_url": f"http://upstream.invalid:{port}/v1", "default_model": ""},
        max_retries=0,
    )
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    request = ChatRequest(messages=[{"role": "user", "content": "Hi"}])
    try:
        provider = get_provider()
        text = "".join([chunk.text async for chunk in provider.stream(request)])
        assert text == "Hello, world!"
        assert proxy.targets and all(t.startswith(provider.base_url) for t in proxy.targets), (
            proxy.targets
        )
        # Clients that leave early cannot strand its connections either.
        assert type(provider.client._transport._pool) is ReclaimingHTTPProxy

        await provider.aclose()
        seen = len(proxy.targets)
        monkeypatch.setenv("NO_PROXY", "upstream.invalid")  # direct: a name no resolver knows
        with pytest.raises(UpstreamUnavailable):
            async for _ in provider.stream(request):
                pass
        assert len(proxy.targets) == seen
    finally:
        listener.close()


async def test_a_local_upstream_is_reached_directly_whatever_the_proxy(
    upstream: Any, monkeypatch: pytest.MonkeyPatch, close_clients: None
) -> None:
    """LM Studio and the bundled model run on this machine: never through a proxy."""
    from llm import ChatRequest, get_provider

    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    chunks = get_provider().stream(ChatRequest(messages=[{"role": "user", "content": "Hi"}]))
    assert "".join([chunk.text async for chunk in chunks]) == "Hello, world!"


async def test_the_stream_tells_when_bytes_wait_to_be_read() -> None:
    """What the idle timer asks before it calls an upstream silent (llm.idle)."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"5\r\nhello\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/"
    try:
        async with httpx.AsyncClient(transport=asyncio_transport(LIMITS)) as client:
            async with client.stream("GET", url) as response:
                stream = response.extensions["network_stream"]
                await asyncio.sleep(0.1)
                assert not stream.has_data()
                release.set()
                for _ in range(100):
                    if stream.has_data():
                        break
                    await asyncio.sleep(0.01)
                assert stream.has_data()
                assert await response.aread() == b"hello"
    finally:
        listener.close()
