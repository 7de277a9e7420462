"""Archives read out of the store member by member, never whole (blocking; run in a thread).

- zip: the central directory is read first with ranged reads (a few requests, however big
  the archive), so links, devices, encryption, duplicates and declared sizes are refused
  before a byte is unpacked; the members are then streamed from the front (stream-unzip:
  stored, deflate, deflate64, bzip2, zip64), their sizes and CRCs checked as they flow.
  A zip whose members are all stored or deflated, on a store that reads anywhere at no cost
  (a local disk), is not streamed: each member is unpacked from where it lies in the archive
  (`write_span`), by threads side by side.
- tar, tar.gz, tar.bz2, tar.xz: streamed (tarfile's `r|*`), nothing seeks.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import stream_unzip
from imgest_runtime.store import (
    CHUNK,
    IterReader,
    ObjectStore,
    RangeFile,
    StoredObject,
    pieces,
)

from .domain import (
    DIRECTORY,
    FILE,
    HEAD,
    LINK,
    SPECIAL,
    ArchiveError,
    Tally,
    archive_format,
    compression,
)

_DECOMPRESSORS = {"gz": lambda: zlib.decompressobj(31), "bz2": bz2.BZ2Decompressor,
                  "xz": lzma.LZMADecompressor}


@dataclass(frozen=True)
class Span:
    """A zip member as it lies in the archive's object: stored, or deflated."""
    key: str
    offset: int
    length: int  # its bytes in the archive
    size: int  # its bytes unpacked, as the central directory says
    crc: int
    deflated: bool
    head: bytes  # the first HEAD bytes unpacked (enough to tell most formats)


@dataclass
class Entry:
    path: str
    chunks: Iterator[bytes | memoryview]  # read it to the end before asking for the next entry
    span: Span | None = None  # where it lies in the archive: to `write_span` instead


def sniff(store: ObjectStore, key: str) -> str | None:
    """The archive format of an object, from its first bytes (decompressed if need be)."""
    return sniff_head(lambda n: store.read_range(key, 0, n))


def sniff_span(store: ObjectStore, span: Span, path: str) -> str | None:
    """The archive format of a zip member: its head is at hand; only a compressed one's needs
    more."""
    return sniff_head(lambda n: span.head[:n] if n <= HEAD
                      else _unpacked_prefix(store, span, path, n))


def _unpacked_prefix(store: ObjectStore, span: Span, path: str, n: int) -> bytes:
    pieces, got = [], 0
    for piece in span_chunks(store, span, path):
        pieces.append(bytes(piece[:n - got]))
        got += len(pieces[-1])
        if got >= n:
            break
    return b"".join(pieces)


def sniff_head(head_of: Callable[[int], bytes]) -> str | None:
    """The archive format of a file whose first n bytes are head_of(n)."""
    head = head_of(HEAD)
    suffix = compression(head)
    unpacked = None
    if suffix:  # what it holds tells: more of it, decompressed (bzip2 gives nothing before
        head = head_of(1100 * 1024 if suffix == "bz2" else 64 * 1024)  # its first block is in)
        try:  # (bounded: a few KB of bzip2 can be gigabytes of zeros)
            unpacked = _DECOMPRESSORS[suffix]().decompress(head, HEAD)
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
            unpacked = None  # not really compressed: a file like any other
    return archive_format(head, unpacked)


def entries(store: ObjectStore, key: str, size: int, fmt: str, tally: Tally, prefix: str = ""
            ) -> Iterator[Entry]:
    """The files of the archive at `key`, each checked by `tally` (which raises ArchiveError
    for what refuses the whole archive), junk and directories skipped. `prefix`: where this
    archive sits inside the upload's archive."""
    if fmt == "zip":
        yield from _zip_entries(store, key, size, tally, prefix)
    else:
        yield from _tar_entries(store, key, size, fmt, tally, prefix)


# --- zip ------------------------------------------------------------------------------------------


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The member's name as the archive spells it (zipfile decodes it per the UTF-8 flag)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return DIRECTORY
    # File types are in the upper half of the external attributes, written by Unix zippers.
    kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
    if kind == stat.S_IFLNK:
        return LINK
    if kind == stat.S_IFDIR:
        return DIRECTORY
    if kind and kind != stat.S_IFREG:
        return SPECIAL
    return FILE


def _zip_entries(store: ObjectStore, key: str, size: int, tally: Tally, prefix: str
                 ) -> Iterator[Entry]:
    _check_entry_count(store, key, size, tally)
    try:
        with zipfile.ZipFile(io.BufferedReader(RangeFile(store, key, size), 1024 * 1024)) as zf:
            infos, directory = zf.infolist(), zf.start_dir
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise ArchiveError("archive.corrupt", "The zip archive cannot be read (its central "
                           f"directory: {e}); it may be truncated or damaged.") from e
    # All of it checked before anything is unpacked (declared sizes too: a bomb is refused
    # before it explodes); the tally itself then counts what really flows.
    check = Tally(tally.limits, tally.packed, members=tally.members, skipped=tally.skipped,
                  unpacked=tally.unpacked)
    listed: dict[bytes, tuple[str, str]] = {}  # raw name → (name, kind)
    for info in infos:
        raw = _raw_name(info)
        listed[raw] = (info.orig_filename, _zip_kind(info))
        check.member(info.orig_filename, listed[raw][1], bool(info.flag_bits & 0x1), prefix)
        check.grew(info.file_size)
    _check_methods(infos)
    if tally.members == 0:  # the outermost archive: its directory gives the total
        tally.expected = check.members
    elif tally.expected is not None:  # a zip inside a zip: its files replace it
        tally.expected += check.members - tally.members - 1
    if store.reads_anywhere and all(i.compress_type in _IN_PLACE for i in infos):
        yield from _zip_spans(store, key, infos, directory, listed, tally, prefix)
        return
    try:
        for raw_name, _size, chunks in stream_unzip.stream_unzip(store.iter_chunks(key)):
            if raw_name not in listed:
                raise _renamed(None, raw_name)
            name, kind = listed[raw_name]
            path = tally.member(name, kind, prefix=prefix)
            if path is None:
                for _ in _guarded(chunks, tally, "zip"):  # read (and counted) to go on
                    pass
                continue
            yield Entry(path, _guarded(chunks, tally, "zip"))
    except _ERRORS["zip"] as e:
        raise _corrupt("zip", e) from e


# Compression methods (APPNOTE 4.4.5): those unpacked (stream-unzip), and names for the rest.
_UNPACKED = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, 9, zipfile.ZIP_BZIP2}  # 9: deflate64
_METHODS = {1: "Shrink", 2: "Reduce", 3: "Reduce", 4: "Reduce", 5: "Reduce", 6: "Implode",
            10: "PKWARE DCL Implode", 14: "LZMA", 16: "IBM z/OS CMPSC", 18: "IBM TERSE",
            19: "IBM LZ77", 20: "Zstandard", 93: "Zstandard", 94: "MP3", 95: "XZ", 96: "JPEG",
            97: "WavPack", 98: "PPMd"}


def _check_methods(infos: list[zipfile.ZipInfo]) -> None:
    """Refuses a zip with a member compressed in a way not unpacked here, naming the way (it
    would fail mid-way as a corrupt archive)."""
    for info in infos:
        if info.compress_type not in _UNPACKED:
            method = _METHODS.get(info.compress_type, "an unknown method")
            raise ArchiveError("archive.unsupported_compression", (
                f"The zip archive's member {info.orig_filename!r} is compressed with {method} "
                f"(method {info.compress_type}), which imgest does not unpack; zip it again "
                "with the usual compression (deflate)."))


def _renamed(listed_as: str | None, raw: bytes) -> ArchiveError:
    """A member whose local header names it otherwise than the central directory does: zip
    tools disagree on which to believe (a way to slip a file past a check), so neither is."""
    found = raw.decode("utf-8", "replace")
    return ArchiveError("archive.corrupt", "The zip archive cannot be read (a member's local "
                        f"header names it {found!r}, " + (
                            f"its central directory {listed_as!r}" if listed_as else
                            "a name its central directory does not list") + "); it may be "
                        "damaged.")


_IN_PLACE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what members `write_span` unpacks


def _zip_spans(store: ObjectStore, key: str, infos: list[zipfile.ZipInfo], directory: int,
               listed: dict[bytes, tuple[str, str]], tally: Tally, prefix: str
               ) -> Iterator[Entry]:
    """The members of a zip, in the archive's order, each as the span of the archive its local
    header points to. Each header must lie before the central directory (`directory`) and agree
    on how its member is packed, and name it as the directory does (as when streamed); the
    members' bytes must lie one after the other before the directory, none shared (overlapping
    members are a way to build a bomb). Streamed (from S3) a zip is read from its front
    instead, so a few damaged ones fare differently: data before the first header, or members
    the front's reading never reaches, refuse it here."""
    reach = 0  # the end of the last member's bytes
    with store.open_once(key) as archive:  # (a header and its member's head: one read)
        for info in sorted(infos, key=lambda i: i.header_offset):
            if not 0 <= info.header_offset <= directory - _LOCAL_HEADER:
                raise ArchiveError("archive.corrupt", "The zip archive cannot be read (the "
                                   f"local header of {info.orig_filename!r} lies outside it); "
                                   "it may be damaged.")
            archive.seek(info.header_offset)
            header = archive.read(_LOCAL_HEADER)
            if (header[:4] != b"PK\x03\x04"
                    or int.from_bytes(header[8:10], "little") != info.compress_type
                    or int.from_bytes(header[6:8], "little") & 0x1):  # (encrypted)
                raise ArchiveError("archive.corrupt", "The zip archive cannot be read (the "
                                   f"local header of {info.orig_filename!r} is missing or does "
                                   "not pack it as its central directory says); it may be "
                                   "damaged.")
            raw = archive.read(int.from_bytes(header[26:28], "little"))
            start = archive.tell() + int.from_bytes(header[28:30], "little")
            deflated = info.compress_type == zipfile.ZIP_DEFLATED
            if (start < reach or start + info.compress_size > directory
                    or (not deflated and info.compress_size != info.file_size)):
                raise ArchiveError("archive.corrupt", "The zip archive cannot be read (the "
                                   f"member {info.orig_filename!r} overlaps another or runs "
                                   "past the central directory); it may be damaged.")
            reach = start + info.compress_size
            if raw != _raw_name(info):
                raise _renamed(info.orig_filename, raw)
            name, kind = listed[raw]
            path = tally.member(name, kind, prefix=prefix)
            tally.grew(info.file_size)  # (what is skipped counts too, as when streamed; more
            if path is not None:        # than it says is refused as it is unpacked)
                archive.seek(start)
                head = archive.read(min(info.compress_size, _HEAD_IN if deflated else HEAD))
                span = Span(key, start, info.compress_size, info.file_size, info.CRC, deflated,
                            _head(head, deflated))
                yield Entry(path, span_chunks(store, span, path), span)


_LOCAL_HEADER = 30  # bytes of a local file header before its name and extra field
_HEAD_IN = 16 * 1024  # deflated bytes that unpack to HEAD (unless crafted: then not sniffed)
READ = CHUNK  # bytes of the archive read at a time
_INFLATE_IN = 64 * 1024  # deflated bytes handed to zlib at a time


def _head(data: bytes, deflated: bool) -> bytes:
    if not deflated:
        return data[:HEAD]
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, HEAD)
    except zlib.error as e:
        raise _corrupt("zip", e) from e


def span_chunks(store: ObjectStore, span: Span, path: str) -> Iterator[bytes | memoryview]:
    """A member's bytes, unpacked, read from where they lie in the archive a READ at a time.
    Raises ArchiveError at once if they run past the size the central directory gives, and at
    their end if they fall short of it or fail their CRC-32 (what follows a deflate stream
    inside the member's span is not looked at). Nothing here holds the GIL for long: threads
    run side by side. Each chunk is valid until the next is asked for (a stored member's are
    views of a reused buffer)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if span.deflated else None
    crc = size = read = 0
    with store.open_once(span.key) as archive:
        archive.seek(span.offset)
        for packed in pieces(archive, span.length, READ):
            read += len(packed)
            for piece in (packed,) if inflater is None else _inflated(inflater, packed):
                size += len(piece)
                if size > span.size:
                    raise ArchiveError("archive.corrupt", "The zip archive cannot be read "
                                       f"({path!r} unpacks to more than the {span.size} bytes "
                                       "its directory says); it may be damaged or a bomb.")
                crc = zlib.crc32(piece, crc)
                yield piece
    if read != span.length:
        raise ArchiveError("archive.corrupt", "The zip archive cannot be read "
                           f"({path!r} is cut short); it may be truncated.")
    if size != span.size:
        raise ArchiveError("archive.corrupt", f"The zip archive cannot be read ({path!r} unpacks "
                           f"to {size} bytes, not the {span.size} its directory says); it may be "
                           "truncated or damaged.")
    if crc != span.crc:
        raise ArchiveError("archive.corrupt", f"The zip archive cannot be read ({path!r} fails "
                           "its CRC-32 check); it may be damaged.")


def _inflated(inflater: Any, data: memoryview) -> Iterator[bytes]:
    try:
        for at in range(0, len(data), _INFLATE_IN):
            pending: bytes | memoryview = data[at:at + _INFLATE_IN]
            while not inflater.eof:
                out = inflater.decompress(pending, CHUNK)  # (at most a chunk out at a time)
                pending = inflater.unconsumed_tail
                if out:
                    yield out
                if not pending and len(out) < CHUNK:  # all in, and nothing more held back
                    break
    except zlib.error as e:
        raise _corrupt("zip", e) from e


def write_span(store: ObjectStore, span: Span, path: str, key: str) -> StoredObject:
    """A member unpacked from the archive into the object `key` (not durable yet); checked as it
    goes (`span_chunks`), and nothing is left of the object if it fails."""
    return store.put(key, IterReader(span_chunks(store, span, path)), durable=False)


def _check_entry_count(store: ObjectStore, key: str, size: int, tally: Tally) -> None:
    """The entry count from the end of central directory record, before zipfile builds an
    object for each entry (a directory of millions of tiny entries would fill the memory)."""
    tail = store.read_range(key, max(0, size - 65_557), 65_557)
    at = tail.rfind(b"PK\x05\x06")
    if at >= 0 and len(tail) >= at + 12:
        count = int.from_bytes(tail[at + 10:at + 12], "little")
        if count != 0xFFFF and tally.members + count > tally.limits.max_members:
            raise ArchiveError("archive.too_many_members",
                               f"The archive holds more than {tally.limits.max_members} files.")


# --- tar (plain or compressed) ----------------------------------------------------------------------


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return DIRECTORY
    if info.issym() or info.islnk():
        return LINK
    if not info.isreg():
        return SPECIAL
    return FILE


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long name or a PAX header whole, before any limit of ours could
    count it: one over 1 MiB refuses the archive."""

    def _proc_gnulong(self, tarfile):  # type: ignore[no-untyped-def,override]
        _bounded_header(self)
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]

    def _proc_pax(self, tarfile):  # type: ignore[no-untyped-def,override]
        _bounded_header(self)
        return super()._proc_pax(tarfile)  # type: ignore[misc]


def _bounded_header(info: tarfile.TarInfo) -> None:
    if info.size > 1024 * 1024:
        raise ArchiveError("archive.corrupt", f"The tar archive has a {info.size}-byte header "
                           "(a long name or extended attributes); refusing it.")


def _decompressed(fmt: str, source: io.BufferedReader) -> Any:
    """A reader that decompresses in bounded steps, whatever a block expands to (tarfile's own
    stream mode hands the decompressor ~10 KB at a time, with no limit on what comes out)."""
    if fmt == "tar.gz":
        return gzip.GzipFile(fileobj=source, mode="rb")
    if fmt == "tar.bz2":
        return bz2.BZ2File(source)
    if fmt == "tar.xz":
        return lzma.LZMAFile(source)
    return contextlib.nullcontext(source)


def _tar_entries(store: ObjectStore, key: str, size: int, fmt: str, tally: Tally, prefix: str
                 ) -> Iterator[Entry]:
    # A plain tar cut at a member's boundary reads as a shorter, whole archive: only its end
    # marker (two zero blocks) tells. A compressed one that is cut fails in decompression.
    if fmt == "tar" and (size < 1024 or store.read_range(key, size - 1024, 1024) != bytes(1024)):
        raise ArchiveError("archive.corrupt", "The tar archive has no end-of-archive marker; "
                           "it is truncated.")
    source = io.BufferedReader(IterReader(store.iter_chunks(key)), 1024 * 1024)
    try:
        with (_decompressed(fmt, source) as stream,
              tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tf):
            for info in tf:
                path = tally.member(info.name, _tar_kind(info), prefix=prefix)
                if path is None:
                    tally.grew(max(0, info.size))  # skipped, still read through: it counts
                    continue
                member = tf.extractfile(info)
                assert member is not None  # a regular file
                yield Entry(path, _guarded(_read_all(member), tally, "tar"))
    except _ERRORS["tar"] as e:
        raise _corrupt("tar", e) from e


def _read_all(stream: io.BufferedReader) -> Iterator[bytes]:
    while block := stream.read(1024 * 1024):
        yield block


# What a damaged archive raises, while its listing is read or while a member's bytes flow.
_ERRORS: dict[str, tuple[type[BaseException], ...]] = {
    "zip": (stream_unzip.UnzipError, ValueError),  # (stream-inflate raises ValueErrors)
    "tar": (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)}


def _corrupt(fmt: str, error: BaseException) -> ArchiveError:
    detail = str(error) or type(error).__name__
    return ArchiveError("archive.corrupt", f"The {fmt} archive cannot be read ({detail}); it "
                        "may be truncated or damaged.")


def _guarded(chunks: Iterator[bytes], tally: Tally, fmt: str) -> Iterator[bytes]:
    """A member's bytes, counted against the limits; a damaged archive raises ArchiveError
    here too (the bytes are read by the store, outside the listing's loop)."""
    try:
        for chunk in chunks:
            tally.grew(len(chunk))
            yield chunk
    except _ERRORS[fmt] as e:
        raise _corrupt(fmt, e) from e
