"""Transport limits: request bodies bounded in size and time (BodyLimit), request heads bounded in time
(header_deadline_protocol, for uvicorn)."""

from __future__ import annotations

import asyncio


class BodyLimit:
    """ASGI middleware: refuse bodies over max_bytes early (Content-Length) or as soon as the stream passes it
    (413), and bodies still arriving timeout_s after the app began to read them (408): a client that trickles
    its upload would otherwise hold the request, and a predict slot, for as long as it likes."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _plain(send, 413, b"request body too large")
        seen, deadline, complete, started = 0, None, False, False

        async def limited():
            nonlocal seen, deadline, complete
            if complete:  # after the body: waiting for a disconnect has no deadline
                return await receive()
            deadline = deadline or asyncio.get_running_loop().time() + self.timeout_s
            try:  # (a timeout scope, not wait_for: wait_for wraps every receive in a task of its own)
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise Refused(408, b"request body not received in time") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise Refused(413, b"request body too large")
                complete = not message.get("more_body", False)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except Refused as exc:
            if not started:  # (a FastAPI route's error handler may have answered already)
                await _plain(send, exc.status, exc.body)


class Refused(Exception):
    """A request body BodyLimit refuses: the status and the text to answer with (the predict handler lets it
    through to BodyLimit)."""

    def __init__(self, status: int, body: bytes):
        super().__init__(body.decode())
        self.status, self.body = status, body


async def _plain(send, status: int, body: bytes) -> None:
    # Connection: close, or uvicorn keeps the connection alive and reads (and drops) the rest of a 1 GiB body.
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def header_deadline_protocol(header_timeout_s: float):
    """uvicorn's httptools protocol with a deadline on request headers: a connection that has not sent a whole
    request head within header_timeout_s of opening, or of its previous response, gets a 408 and is closed.
    uvicorn itself has no such timer (its keep-alive timer stops at the first byte), so idle and slowloris
    connections would stay open for ever; with uvicorn's limit_concurrency they made every request, /health
    included, a 503."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadline(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            idle_next = not self.pipeline  # a queued pipelined request has its head already
            super().on_response_complete()
            if idle_next and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline
