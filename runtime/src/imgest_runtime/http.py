"""Checks on a request's head before any route sees it. A bound on its size, kept at both ends:
the server stops reading a head that grows past MAX_HEADER_BYTES (so a client cannot make a
process hold megabytes of headers), and the app answers 431 for any head over it that did
arrive whole. And a target that holds a NUL (which no text column can store) is answered 400.
The answers come from the app, so they read as its other errors do (problem+json; the
gateway's XNAT paths, text)."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.routing import Match
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024  # a request's target, header names and values
LINGER_SECONDS = 2.0  # how long a refused head's bytes are still read (and dropped)
_OVERFLOW = "imgest.head_overflow"  # scope key the protocol sets on a head it cut short

log = logging.getLogger("imgest.http")


def head_fault(scope: Any) -> HTTPException | None:
    """What is wrong with a request's head, as the error to answer; None if nothing is."""
    if scope.get(_OVERFLOW) or sum(
            len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
        return HTTPException(431, f"The request's headers are over {MAX_HEADER_BYTES} bytes.")
    if "\0" in scope["path"] or b"%00" in scope["query_string"]:
        return HTTPException(400, "The URL holds a NUL character.")
    return None


class HeadCheck:
    """ASGI middleware: answers a request whose head is at fault (head_fault) before any route
    sees it, in the form the app's HTTPException handler gives."""

    def __init__(self, app: Any, owner: FastAPI):
        self.app, self.owner = app, owner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (fault := head_fault(scope)):
            answer = self.owner.exception_handlers[HTTPException]
            response = await answer(Request(scope), fault)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def routed(app: FastAPI, scope: Any) -> bool:
    """Whether some route of the app answers this request (its path and method) in full."""
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


class _HeadSent(Exception):
    """A HEAD's answer is out: the GET behind it stops making its body."""


class HeadAsGet:
    """ASGI middleware: HEAD answered as GET, without the body, wherever a GET route is (RFC
    9110 requires it of a general-purpose server; FastAPI's routes answer only the methods
    they name). The GET stops at its first body bytes: a file's are not read on."""

    def __init__(self, app: Any, owner: FastAPI):
        self.app, self.owner = app, owner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or routed(self.owner, scope):
            await self.app(scope, receive, send)
            return

        async def head_only(message: Any) -> None:
            if message["type"] == "http.response.body":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                raise _HeadSent()
            await send(message)

        try:
            await self.app({**scope, "method": "GET"}, receive, head_only)
        except* _HeadSent:  # (from a streaming body, within its task group)
            pass


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, but a request head still incomplete after more than
    MAX_HEADER_BYTES is not read further: httptools would keep a header's value whole until
    its end, however long. The app answers it 431 (through HeadCheck) and the connection
    closes. The body is not counted: a chunk that completes the head passes as before."""

    _in_head = False
    _head_bytes = 0
    _cut = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._cut:
            return
        # Counted only for chunks that began inside a head: at most one chunk is missed,
        # and never a body byte.
        was_in_head = self._in_head
        super().data_received(data)
        if was_in_head and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._cut_head()

    def _cut_head(self) -> None:
        self._cut = True
        self.transport.pause_reading()
        target = urllib.parse.urlsplit(self.url[:MAX_HEADER_BYTES].decode("latin-1"))
        try:
            method = self.parser.get_method().decode("ascii")
        except Exception:  # noqa: BLE001 — not parsed yet: the answer does not depend on it
            method = "GET"
        scope = {**self.scope, "method": method, "path": urllib.parse.unquote(target.path),
                 "raw_path": target.path.encode("latin-1"),
                 "query_string": target.query.encode("latin-1"), "headers": [],
                 _OVERFLOW: True}
        log.warning("%s:%s sent a request head over %d bytes: answered 431 and closed",
                    *(self.client or ("?", "?")), MAX_HEADER_BYTES)
        asyncio.get_running_loop().create_task(self._answer(scope))

    async def _answer(self, scope: dict[str, Any]) -> None:
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.append(message.get("body", b""))

        try:
            await self.app(scope, receive, send)
            status = HTTPStatus(start["status"])
            head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
            head += [name + b": " + value + b"\r\n" for name, value in start["headers"]
                     if name.lower() != b"connection"]
            self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", *body]))
        except BaseException:
            self.transport.close()
            raise
        # A lingering close, as nginx's: closed now, with the client's bytes unread, the
        # socket would be reset and the answer could be lost with it. So the answer is
        # followed by a FIN, what still comes is read and dropped (data_received), and the
        # socket closes a moment later.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)
