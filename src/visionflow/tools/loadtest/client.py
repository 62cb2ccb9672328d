"""The load generator's HTTP side: the loopback guard and a minimal keep-alive HTTP/1.1 client."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from urllib.parse import urlsplit

from visionflow.errors import VisionflowError

# Idle keep-alive connections are dropped after this long, before the server's own keep-alive timeout (uvicorn:
# 5 s, as `visionflow serve` sets it); reusing one the server is closing would fail a request through no fault of
# the server's.
KEEPALIVE_EXPIRY_S = 2.0


class LoadTestError(VisionflowError):
    """The load test cannot run (target not on loopback, server not ready, bad settings)."""


def require_loopback(url: str) -> str:
    """The base URL without a trailing slash, if its host is (or resolves only to) loopback addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadTestError(f"{url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000")
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise LoadTestError(f"cannot resolve {host!r}: {exc}") from None
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    outside = sorted(str(a) for a in addresses if not a.is_loopback)
    if outside or not addresses:
        raise LoadTestError(
            f"refusing to load {host!r} ({', '.join(outside) or 'no address'}): the load test only "
            "targets loopback (127.0.0.0/8, ::1, localhost)"
        )
    return url.rstrip("/")


class KeepAliveClient:
    """A minimal HTTP/1.1 client that sends one prebuilt request over reusable keep-alive connections, as wrk does.

    Not httpx: on 2 shared cores httpx spent about twice the server's CPU per request (6.5 ms against 3.1 ms), so
    the load generator, not the server, set the figures. Here a request is one write of prebuilt bytes and one
    read of the answer. Every failure (refused, reset, timeout, torn answer) comes back as its exception's name,
    never raised; a connection that failed is closed, never reused.
    """

    def __init__(
        self,
        url: str,
        body: bytes,
        content_type: str,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
    ):
        parts = urlsplit(url)
        self.host, self.tls = parts.hostname, tls if parts.scheme == "https" else None
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout_s = timeout_s
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.request = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "")
            + "Connection: keep-alive\r\n\r\n"
        ).encode() + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < KEEPALIVE_EXPIRY_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port, ssl=self.tls)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = head[9:12].decode(), head.lower()
        if b"transfer-encoding: chunked" in headers:
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        else:
            at = headers.find(b"content-length:")
            await reader.readexactly(int(headers[at + 15 : headers.index(b"\r\n", at)]) if at >= 0 else 0)
        return status, b"connection: close" not in headers

    async def post(self) -> str:
        """Send the request once; the HTTP status ("200", "503", ...) or the failure's name."""
        conn = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self._connection()
                conn[1].write(self.request)
                await conn[1].drain()
                status, keep = await self._answer(conn[0])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
            if conn is not None:
                conn[1].close()
            return "ReadTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        if keep:
            self.idle.append((*conn, time.monotonic()))
        else:
            conn[1].close()
        return status

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()
