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
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpcore
import httpx

# Private modules are reached at call time, not imported here: a release that lacks one of their
# names then stops the server with negotiator.E001 (which reads PRIVATE_NAMES below before this
# module is imported anywhere), never with an ImportError from this line.

# The private names of other packages this module relies on: (distribution, dotted name). Checked
# at start by negotiator/internals.py (system check negotiator.E001) and by
# tests/negotiator/test_internals.py; keep it a literal, it is read from this file, not imported.
# "Class().name" is an attribute only instances have: looked up on a throwaway instance built
# without I/O.
PRIVATE_NAMES = (
    # AsyncioStream.has_data: what the stream reader holds, then httpcore's probe of the socket.
    ("Python", "asyncio.StreamReader()._buffer"),
    ("httpcore", "httpcore._utils.is_socket_readable"),
    # _ReclaimOrphans: the pool's hook, its lists, and the connection a waiting request was given.
    ("httpcore", "httpcore.AsyncConnectionPool._assign_requests_to_connections"),
    ("httpcore", "httpcore.AsyncConnectionPool()._requests"),
    ("httpcore", "httpcore.AsyncConnectionPool()._connections"),
    ("httpcore", "httpcore._async.connection_pool.AsyncPoolRequest().connection"),
    # asyncio_transport: the pool httpx builds, and the options it was built with.
    ("httpx", "httpx.AsyncHTTPTransport()._pool"),
    ("httpcore", "httpcore.AsyncConnectionPool()._ssl_context"),
    ("httpcore", "httpcore.AsyncHTTPProxy()._ssl_context"),
    ("httpcore", "httpcore.AsyncHTTPProxy()._proxy_url"),
    ("httpcore", "httpcore.AsyncHTTPProxy()._proxy_headers"),
    ("httpcore", "httpcore.AsyncHTTPProxy()._proxy_ssl_context"),
    # environment_proxy: httpx's reading of *_PROXY and its patterns (sorted, so their __lt__).
    ("httpx", "httpx._utils.get_environment_proxies"),
    ("httpx", "httpx._utils.URLPattern"),
    ("httpx", "httpx._utils.URLPattern.matches"),
    ("httpx", "httpx._utils.URLPattern.__lt__"),
)


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
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
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

    def has_data(self) -> bool:
        """Whether bytes, or the end of the stream, wait to be read (here or in the socket)."""
        # Read off the socket, not yet taken. typeshed leaves out StreamReader's private buffer.
        if self._reader._buffer or self._reader.at_eof():  # type: ignore[attr-defined]
            return True
        sock = self._writer.get_extra_info("socket")
        return sock is not None and _is_socket_readable(sock)

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
            return sock is not None and _is_socket_readable(sock)
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
        return await _connected(
            asyncio.open_connection(host, port, local_addr=local), timeout, socket_options
        )

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
async def closing_stream(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> AsyncIterator[httpx.Response]:
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


class _ReclaimOrphans:
    """Also close connections that no request owns and that are not idle, whenever the pool looks
    at its connections (any request arriving or leaving).

    A request cancelled between being given a new connection and using it leaves that connection
    in the pool for good, holding a slot (encode/httpcore#1093, unfixed in 1.0.9): a relay whose
    clients leave early would run out of LLM_MAX_CONNECTIONS. Such a connection is neither idle
    nor closed, and no request points at it.
    """

    _requests: list[Any]
    _connections: list[httpcore.AsyncConnectionInterface]

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        owned = {
            id(request.connection) for request in self._requests if request.connection is not None
        }
        orphans = [
            connection
            for connection in self._connections
            if id(connection) not in owned
            and not connection.is_idle()
            and not connection.is_closed()
        ]
        for connection in orphans:
            self._connections.remove(connection)
        return orphans + super()._assign_requests_to_connections()  # type: ignore[misc]


class ReclaimingConnectionPool(_ReclaimOrphans, httpcore.AsyncConnectionPool):
    """httpcore's pool, reclaiming orphaned connections."""


class ReclaimingHTTPProxy(_ReclaimOrphans, httpcore.AsyncHTTPProxy):
    """httpcore's pool through an HTTP(S) proxy, reclaiming orphaned connections."""


def asyncio_transport(
    limits: httpx.Limits, *, verify: ssl.SSLContext | bool = True, proxy: str | None = None
) -> httpx.AsyncHTTPTransport:
    """httpx's transport (TLS verification, HTTP/1.1, pooling by `limits`, `proxy`) on
    `AsyncioBackend`, its pool reclaiming orphaned connections. A SOCKS proxy keeps httpx's own."""
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=verify, proxy=proxy)
    built = transport._pool  # the one attribute httpx builds it into
    options: dict[str, Any] = {
        "ssl_context": built._ssl_context,
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "network_backend": AsyncioBackend(),
    }
    if isinstance(built, httpcore.AsyncHTTPProxy):
        transport._pool = ReclaimingHTTPProxy(
            proxy_url=built._proxy_url,
            proxy_headers=built._proxy_headers,  # its auth included
            proxy_ssl_context=built._proxy_ssl_context,
            **options,
        )
    elif type(built) is httpcore.AsyncConnectionPool:
        transport._pool = ReclaimingConnectionPool(**options)
    return transport


def upstream_transport(base_url: str, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """`asyncio_transport` for `base_url`, through the proxy the environment names for it."""
    return asyncio_transport(limits, proxy=environment_proxy(base_url))


# A local server (LM Studio, the bundled model) is reached directly, whatever HTTP_PROXY says.
LOOPBACK = frozenset({"localhost", "::1"})


def environment_proxy(url: str) -> str | None:
    """The proxy httpx itself would take from the environment for `url` (`HTTPS_PROXY`,
    `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`), or None to go direct. httpx ignores these once
    it is given a transport, so its own reading of them is applied here."""
    target = httpx.URL(url)
    if target.host in LOOPBACK or target.host.startswith("127."):
        return None
    from httpx._utils import URLPattern, get_environment_proxies  # httpx's reading of *_PROXY

    mounts = sorted((URLPattern(key), proxy) for key, proxy in get_environment_proxies().items())
    return next((proxy for pattern, proxy in mounts if pattern.matches(target)), None)


def _is_socket_readable(sock: socket.socket) -> bool:
    """httpcore's own test: whether the socket has bytes, or the end of the stream, to read."""
    from httpcore._utils import is_socket_readable

    return bool(is_socket_readable(sock))
