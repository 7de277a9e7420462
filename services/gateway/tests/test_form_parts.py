"""The streaming multipart/form-data reader: parts arrive in order, as they come, whatever the
chunking of the body; broken forms are refused, never half-read as if whole."""

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imgest_gateway.form_parts import BadForm, file_parts

BOUNDARY = "xYzZy"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        out += (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/dicom\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


async def _body(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _read(data: bytes, chunk: int, read_first: bool = True
                ) -> list[tuple[str, str | None, bytes]]:
    """(filename, content type, bytes) per file part; with read_first=False only the first
    part is read and the others are skipped by the reader itself."""
    out = []
    async for part in file_parts(CONTENT_TYPE, _body(data, chunk)):
        if read_first or not out:
            out.append((part.filename, part.content_type,
                        b"".join([c async for c in part.chunks])))
        else:
            out.append((part.filename, part.content_type, b""))
    return out


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.binary(max_size=3000), min_size=1, max_size=5),
       chunk=st.integers(1, 4096))
def test_file_parts_come_whole_and_in_order_whatever_the_chunking(files, chunk):
    body = form(("note", None, b"a field, dropped"),
                *(("file", f"f{i}.dcm", data) for i, data in enumerate(files)))
    parts = asyncio.run(_read(body, chunk))
    assert parts == [(f"f{i}.dcm", "application/dicom", data) for i, data in enumerate(files)]


def test_a_part_not_read_is_skipped_and_the_next_one_still_comes():
    body = form(("file", "a.dcm", b"A" * 100_000), ("file", "b.dcm", b"B" * 10))
    assert asyncio.run(_read(body, 1000, read_first=False)) == [
        ("a.dcm", "application/dicom", b"A" * 100_000), ("b.dcm", "application/dicom", b"")]


@pytest.mark.parametrize("body, message", [
    (form(("file", "a.dcm", b"abc"))[:-20], "broke off"),  # truncated: no closing boundary
    (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: x\r\n\r\nabc\r\n--" + BOUNDARY.encode()
     + b"--\r\n", "name"),  # no Content-Disposition
    (form(("field", None, b"x" * 70_000)), "form field"),  # a huge non-file field
    (b"this is not multipart at all", "Malformed"),
])
def test_broken_forms_are_refused(body, message):
    with pytest.raises(BadForm, match=message):
        asyncio.run(_read(body, 512))


def test_a_content_type_without_boundary_is_refused():
    async def read():
        async for _ in file_parts("multipart/form-data", _body(b"", 1)):
            pass

    with pytest.raises(BadForm, match="boundary"):
        asyncio.run(read())


def test_a_boundary_longer_than_the_parser_takes_is_a_bad_form():
    """(It was a 500: the parser refuses boundaries over 256 bytes as it is made.)"""
    boundary = "B" * 300

    async def read():
        body = f"--{boundary}\r\nContent-Disposition: form-data; name=f; filename=a\r\n\r\nabc"
        async for _ in file_parts(f"multipart/form-data; boundary={boundary}",
                                  _body(f"{body}\r\n--{boundary}--\r\n".encode(), 64)):
            pass

    with pytest.raises(BadForm, match="Malformed multipart/form-data: .*256"):
        asyncio.run(read())
