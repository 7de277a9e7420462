"""multipart/form-data read as a stream: each file part is handed on as its bytes arrive, so a
form of many files (or one huge one) goes to the store without being spooled first.

Parts come one after another: a part's bytes must be read (or `skip`ped) before the next part
is asked for. Non-file fields are read and dropped (the API's parameters are in the URL).
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 64 * 1024  # a non-file field is read and dropped; it may not be a file in disguise


class BadForm(ValueError):
    """The body is not a well-formed multipart/form-data document (or it broke off)."""


@dataclass
class FilePart:
    field: str
    filename: str
    content_type: str | None
    chunks: _PartChunks


class _PartChunks:
    """The bytes of the current part (an iterator object, not a generator: a consumer that
    stops early does not close the form under it)."""

    def __init__(self, form: _Form):
        self.form = form
        self.ended = False  # the part's last byte was read

    def __aiter__(self) -> _PartChunks:
        return self

    async def __anext__(self) -> bytes:
        if self.ended:
            raise StopAsyncIteration
        kind, value = await self.form.next_event()
        if kind == "data":
            return value  # type: ignore[return-value]
        self.ended = True  # "end": the part is over
        raise StopAsyncIteration

    async def skip(self) -> None:
        async for _ in self:
            pass


class _Form:
    def __init__(self, boundary: bytes, charset: str, body: AsyncIterator[bytes]):
        self.body = body
        self.charset = charset
        self.events: deque[tuple[str, object]] = deque()
        self.finished = False  # the body ended
        self.complete = False  # the closing boundary was seen
        self._name = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field: bytearray | None = None  # a non-file part's bytes, bounded
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end})

    # Parser callbacks (synchronous): they only queue events for the async side.
    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadForm('A part has no Content-Disposition with a "name".')
        if b"filename" not in options:
            self._field = bytearray()
            return
        self._field = None
        content_type = self._headers.get(b"content-type")
        self.events.append(("part", FilePart(
            field=self._decode(options[b"name"]), filename=self._decode(options[b"filename"]),
            content_type=content_type.decode("latin-1") if content_type else None,
            chunks=_PartChunks(self))))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is None:
            self.events.append(("data", data[start:end]))
            return
        self._field += data[start:end]
        if len(self._field) > MAX_FIELD_BYTES:
            raise BadForm(f"A form field (not a file) is over {MAX_FIELD_BYTES} bytes; send "
                          "files with a filename in their Content-Disposition.")

    def _part_end(self) -> None:
        if self._field is None:
            self.events.append(("end", None))
        self._field = None

    def _end(self) -> None:
        self.complete = True

    def _decode(self, raw: bytes) -> str:
        return raw.decode(self.charset, errors="replace")

    async def next_event(self) -> tuple[str, object]:
        while not self.events:
            if self.finished:
                if not self.complete:
                    raise BadForm("The form broke off before its closing boundary.")
                return ("done", None)
            chunk = await anext(self.body, None)
            if chunk is None:
                self.finished = True
                continue
            try:
                self.parser.write(chunk)
            except FormParserError as e:
                raise BadForm(f"Malformed multipart/form-data: {e}") from e
        return self.events.popleft()


async def file_parts(content_type: str, body: AsyncIterator[bytes]) -> AsyncIterator[FilePart]:
    """The file parts of a multipart/form-data body, in order, each streamed as it arrives."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadForm("The multipart/form-data Content-Type names no boundary.")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "utf-8"
    try:
        form = _Form(boundary, charset, aiter(body))
    except FormParserError as e:  # e.g. a boundary over the parser's 256 bytes
        raise BadForm(f"Malformed multipart/form-data: {e}") from e
    current: FilePart | None = None
    while True:
        if current is not None and not current.chunks.ended:
            await current.chunks.skip()  # the consumer stopped early: move past its bytes
        kind, value = await form.next_event()
        if kind == "done":
            return
        if kind == "part":
            current = value  # type: ignore[assignment]
            yield current  # type: ignore[misc]
        # (stray "data"/"end" events cannot occur: a part's events are read by its chunks)
