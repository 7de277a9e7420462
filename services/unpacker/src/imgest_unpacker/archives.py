"""Archives read out of the store member by member, never whole (blocking; run in a thread).

- zip: the central directory is read first with ranged reads (a few requests, however big
  the archive), so links, devices, encryption, duplicates and declared sizes are refused
  before a byte is unpacked; the members are then streamed from the front (stream-unzip:
  stored, deflate, deflate64, bzip2, zip64), their sizes and CRCs checked as they flow.
  A zip whose members are all stored (not compressed), on a store that maps its objects, is
  not streamed: each member is copied out of the archive where it lies (`copy_span`), by
  threads side by side.
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
from imgest_runtime.store import IterReader, ObjectStore, RangeFile, StoredObject

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
    """A stored zip member's bytes, as they lie in the archive's object."""
    key: str
    offset: int
    length: int
    crc: int
    head: bytes  # the first HEAD of them (enough to tell most formats)


@dataclass
class Entry:
    path: str
    chunks: Iterator[bytes]  # read it to the end before asking for the next entry
    span: Span | None = None  # or, with no chunks, where its bytes lie (to `copy_span`)


def sniff(store: ObjectStore, key: str) -> str | None:
    """The archive format of an object, from its first bytes (decompressed if need be)."""
    return sniff_head(lambda n: store.read_range(key, 0, n))


def sniff_span(store: ObjectStore, span: Span) -> str | None:
    """The archive format of a stored zip member: its head is at hand; only a compressed one's
    needs more."""
    return sniff_head(lambda n: span.head[:n] if n <= HEAD else
                      store.read_range(span.key, span.offset, min(n, span.length)))


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
    if tally.members == 0:  # the outermost archive: its directory gives the total
        tally.expected = check.members
    elif tally.expected is not None:  # a zip inside a zip: its files replace it
        tally.expected += check.members - tally.members - 1
    if store.maps_objects and all(i.compress_type == zipfile.ZIP_STORED for i in infos):
        yield from _stored_zip_entries(store, key, infos, directory, listed, tally, prefix)
        return
    try:
        for raw_name, _size, chunks in stream_unzip.stream_unzip(store.iter_chunks(key)):
            # A name the central directory does not list is not unpacked.
            name, kind = listed.get(raw_name, (raw_name.decode("utf-8", "replace"), DIRECTORY))
            path = tally.member(name, kind, prefix=prefix)
            if path is None:
                for _ in _guarded(chunks, tally, "zip"):  # read (and counted) to go on
                    pass
                continue
            yield Entry(path, _guarded(chunks, tally, "zip"))
    except _ERRORS["zip"] as e:
        raise _corrupt("zip", e) from e


def _stored_zip_entries(store: ObjectStore, key: str, infos: list[zipfile.ZipInfo],
                        directory: int, listed: dict[bytes, tuple[str, str]], tally: Tally,
                        prefix: str) -> Iterator[Entry]:
    """The members of a zip that stores them all, in the archive's order, each as the span of
    the archive its local header points to. Each header must store its member; the spans must
    lie one after the other before the central directory (`directory`), none inside another
    (overlapping members are a way to build a bomb). A member whose local header gives another
    name is skipped, as when streamed (what the directory lists is what is unpacked)."""
    reach = 0  # the end of the last span
    with store.open(key) as archive:  # (each header and head: one read, mostly from its buffer)
        for info in sorted(infos, key=lambda i: i.header_offset):
            archive.seek(info.header_offset)
            header = archive.read(_LOCAL_HEADER)
            if (len(header) < _LOCAL_HEADER or header[:4] != b"PK\x03\x04"
                    or int.from_bytes(header[8:10], "little") != zipfile.ZIP_STORED):
                raise ArchiveError("archive.corrupt", "The zip archive cannot be read (the "
                                   f"local header of {info.orig_filename!r} is missing or does "
                                   "not store it as its central directory says); it may be "
                                   "damaged.")
            raw = archive.read(int.from_bytes(header[26:28], "little"))
            start = archive.tell() + int.from_bytes(header[28:30], "little")
            if (start < reach or info.compress_size != info.file_size
                    or start + info.file_size > directory):
                raise ArchiveError("archive.corrupt", "The zip archive cannot be read (the "
                                   f"member {info.orig_filename!r} overlaps another or runs "
                                   "past the central directory); it may be damaged.")
            reach = start + info.file_size
            name, kind = (listed[raw] if raw == _raw_name(info)
                          else (raw.decode("utf-8", "replace"), DIRECTORY))
            path = tally.member(name, kind, prefix=prefix)
            tally.grew(info.file_size)  # (what is skipped counts too, as when streamed)
            if path is not None:
                archive.seek(start)
                yield Entry(path, iter(()), Span(key, start, info.file_size, info.CRC,
                                                 archive.read(min(HEAD, info.file_size))))


_LOCAL_HEADER = 30  # bytes of a local file header before its name and extra field
MAP_WINDOW = 64 * 1024 * 1024  # mapped at once, of a large member


def copy_span(store: ObjectStore, span: Span, path: str, key: str) -> StoredObject:
    """A stored member's bytes, copied from the archive into the object `key` straight from the
    store's map, a window at a time (not durable yet); their CRC-32 is checked on the way, and
    the object deleted again if it fails (blocking; threads may run side by side: none of it
    holds the GIL for long)."""
    crc = 0

    def windows() -> Iterator[memoryview]:
        nonlocal crc
        for at in range(0, span.length, MAP_WINDOW):
            size = min(MAP_WINDOW, span.length - at)
            with store.mapped(span.key, span.offset + at, size) as view:
                if len(view) != size:
                    raise ArchiveError("archive.corrupt", "The zip archive cannot be read "
                                       f"({path!r} is cut short); it may be truncated.")
                crc = zlib.crc32(view, crc)
                yield view

    stored = store.put(key, IterReader(windows()), durable=False)
    if crc != span.crc:
        store.delete(key)
        raise ArchiveError("archive.corrupt", f"The zip archive cannot be read ({path!r} fails "
                           "its CRC-32 check); it may be truncated or damaged.")
    return stored


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
