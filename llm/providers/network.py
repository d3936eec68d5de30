"""httpcore's network layer on plain asyncio streams, for the upstream connections.

httpcore's default backend goes through anyio, which per read opens a cancel scope and
re-registers the socket with the selector: measured here, half of the relay's CPU with a
hundred slow streams (one read per token). An asyncio stream keeps its socket registered
and costs one timer per read. Everything above it (HTTP/1.1 parsing, pooling, httpx) is
unchanged; `tests/llm/test_network.py` runs the same requests through both.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from httpcore._utils import is_socket_readable

class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        # No await: httpcore closes inside a cancellation shield that does not stop a plain
        # asyncio cancel, and a cancel landing in a wait here would strand its pool request.
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            # An idle pooled connection is readable when the server closed it (or sent junk);
            # the event loop reads what arrives, so look at the reader, then at the socket.
            if self._reader.at_eof() or self._writer.transport.is_closing():
                return True
            sock = self._writer.get_extra_info("socket")
            return sock is not None and is_socket_readable(sock)
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        return await _connected(asyncio.open_connection(host, port, local_addr=local), timeout, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        return await _connected(asyncio.open_unix_connection(path), timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connected(
    opening: Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    timeout: float | None,
    options: Any,
) -> AsyncioStream:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await opening
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(str(exc)) from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    sock: socket.socket | None = writer.get_extra_info("socket")
    for option in options or ():
        if sock is not None:
            sock.setsockopt(*option)
    return AsyncioStream(reader, writer)


@asynccontextmanager
async def closing_stream(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
    """`client.stream(...)`, but the response's close cannot be cut short by a cancellation.

    httpcore shields its clean-up only from anyio cancel scopes; a plain `task.cancel()` landing
    while it closes a response (it awaits a lock) leaves that request in the pool for good, its
    connection counted against LLM_MAX_CONNECTIONS. The close runs to its end in its own task.
    """
    response = await client.send(client.build_request(method, url, **kwargs), stream=True)
    try:
        yield response
    finally:
        await asyncio.shield(response.aclose())


class ReclaimingConnectionPool(httpcore.AsyncConnectionPool):
    """httpcore's pool, also closing connections that no request owns and that are not idle.

    A request cancelled between being given a new connection and using it leaves that
    connection in the pool for good, holding a slot (encode/httpcore#1093, unfixed in 1.0.9):
    a relay whose clients leave early would run out of LLM_MAX_CONNECTIONS. Such a connection
    is neither idle nor closed, and no request points at it; it is closed the next time the
    pool looks at its connections (any request arriving or leaving).
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        owned = {id(request.connection) for request in self._requests if request.connection is not None}
        orphans = [
            connection for connection in self._connections
            if id(connection) not in owned and not connection.is_idle() and not connection.is_closed()
        ]
        for connection in orphans:
            self._connections.remove(connection)
        return orphans + super()._assign_requests_to_connections()


def upstream_transport(base_url: str, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """`asyncio_transport`, or httpx's own through the proxy the environment names for `base_url`
    (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`), as httpx itself would use."""
    proxy = environment_proxy(base_url)
    if proxy:
        return httpx.AsyncHTTPTransport(limits=limits, proxy=proxy)
    return asyncio_transport(limits)


def environment_proxy(url: str) -> str | None:
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def asyncio_transport(limits: httpx.Limits, *, verify: ssl.SSLContext | bool = True) -> httpx.AsyncHTTPTransport:
    """httpx's transport (TLS verification, HTTP/1.1, pooling by `limits`) on `AsyncioBackend`."""
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=verify)
    transport._pool = ReclaimingConnectionPool(  # the one attribute httpx builds it into
        ssl_context=transport._pool._ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return transport
