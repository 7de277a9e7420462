"""The object store port and its two adapters: a local directory and S3 (through `minio`).

The port is synchronous on purpose: `minio` is synchronous, and so is file I/O. Async code calls
it through `asyncio.to_thread`, and `put_async` bridges an async byte stream into `put` without
ever holding a whole object in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import hashlib
import io
import mmap
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Self, TypeVar

from .settings import RuntimeSettings

CHUNK = 1024 * 1024
MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000
MAX_COPY = 5 * 1024**3  # S3 CopyObject limit; larger copies are composed from parts
COPY_THREADS = 8  # S3 copies at once (each waits on a round trip)


class StoreError(Exception):
    """A store operation failed; transient unless it is `ObjectNotFound` or `InvalidKey`."""


class ObjectNotFound(StoreError):
    pass


class InvalidKey(StoreError):
    pass


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str | None = None


MAX_NAME = 255  # bytes in one key component (a file name on every local file system)


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated, with no empty, '.' or '..' parts: nothing escapes;
    and no part longer than a file name may be."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise InvalidKey(f"invalid object key: {key!r}")
    if any(len(p.encode()) > MAX_NAME for p in parts):
        raise InvalidKey(f"object key part longer than {MAX_NAME} bytes: {key[:80]!r}…")
    return key


def fit_name(name: str, limit: int = MAX_NAME) -> str:
    """A name shortened to `limit` UTF-8 bytes if it is longer, keeping its extension and
    never cutting a character in half."""
    if len(name.encode()) <= limit:
        return name
    suffix = PurePosixPath(name).suffix
    if len(suffix.encode()) > 32:
        suffix = ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    return stem.encode()[: limit - len(suffix.encode())].decode(errors="ignore") + suffix


def part_size_for(length: int | None) -> int:
    """Smallest part size (a multiple of 1 MiB, at least 5 MiB) that fits in 10,000 parts."""
    if length is None or length < 0:
        return 64 * 1024 * 1024  # unknown length: up to 640 GB
    size = max(MIN_PART, -(-length // MAX_PARTS))
    return -(-size // CHUNK) * CHUNK


def _temporary_beside(path: Path) -> Path:
    """Where an object is written before its atomic rename: same directory, short unique name
    (the object's own name may already be as long as a name can be)."""
    return path.with_name(f".{uuid.uuid4().hex}.part")


_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.part")  # what _temporary_beside names


def _is_temporary(name: str) -> bool:
    """Exactly the names `_temporary_beside` makes: an object a user named `.notes.part` is
    an object (listed, and never swept as a writer's leftover)."""
    return _TEMPORARY.fullmatch(name) is not None


class _Reader(io.RawIOBase):
    """A readable stream: subclasses define `read` or `readinto`, and get the other."""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _FullReads(_Reader):
    """A reader whose reads return all `n` bytes asked for unless the source ends first. minio
    gathers a part by adding read to read (`bytes +=`): over sources that hand back a chunk at a
    time, a 64 MiB part would be copied over and over (28 s instead of 0.07 s)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return self.raw.read()
        pieces, got = [], 0
        while got < n:
            piece = self.raw.read(n - got)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _Hashing(_Reader):
    """Wraps a readable, counting and hashing what passes through."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.source_error: BaseException | None = None  # the source failed, not the store

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n)
        except BaseException as e:
            self.source_error = e
            raise
        self.sha.update(data)
        self.size += len(data)
        return data


class ObjectStore(ABC):
    """Streaming object storage, keyed by '/'-separated paths."""

    @abstractmethod
    def put(self, key: str, data: BinaryIO, length: int | None = None, *,
            durable: bool = True) -> StoredObject:
        """Stream `data` (read until EOF) into `key`; returns its size and sha256. With
        `durable=False` the object may still be only in memory until `make_durable(key)`."""

    def make_durable(self, key: str) -> None:
        """Makes an object put with `durable=False` survive a crash of the machine (S3 objects
        are durable once put)."""

    def durable_batch(self) -> DurableBatch:
        """For objects about to be put with `durable=False`, then made durable together (a
        store may do it in one flush): open it before the first is written."""
        return DurableBatch(self)

    # How many small requests (a small object's put, a file's head read) are worth running side
    # by side: on S3 each waits a round trip; on a local disk each is work for the CPU, and
    # threads would only take turns at the GIL.
    side_by_side = 1

    # A store whose objects can be written at an offset assembles a resumable upload in one
    # object (each byte written once); others keep its segments and `concat` them at the end.
    writes_in_place = False

    def write_at(self, key: str, offset: int, data: BinaryIO, *, durable: bool = True
                 ) -> StoredObject:
        """Writes `data` (until EOF) into the object at `offset`, creating it, durably (or, with
        `durable=False`, once `make_durable`); returns how many bytes were written. Bytes
        already there past them stay (`move` the object once it is whole)."""
        raise NotImplementedError

    # Reading any part of an object costs no more than reading it in order (a file; on S3 each
    # read is a request of its own): readers may go straight to each part they need, from
    # threads side by side.
    reads_anywhere = False

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object; the caller closes it."""

    @abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the object)."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """Size of the object, or None if there is none."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Server-side copy; replaces `dst`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Removes the object; no error if it is already gone."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with `prefix`."""

    def move(self, src: str, dst: str) -> None:
        """Copy then delete; idempotent: a move already done is not an error."""
        if self.stat(src) is None:
            if self.stat(dst) is not None:
                return
            raise ObjectNotFound(src)
        self.copy(src, dst)
        self.delete(src)

    def concat(self, sources: list[str], dst: str) -> StoredObject:
        """Writes the sources one after the other into `dst` (a resumable upload's segments
        into the file). Streams through the caller unless the adapter can do it server-side."""
        return self.put(dst, _Chained(self, sources))

    def copy_all(self, copies: list[tuple[str, str, bool]]) -> None:
        """Server-side copies (src, dst, replace): a copy that does not replace is skipped when
        `dst` is there already, so a repeated run copies only what is missing. One after the
        other here (a local disk is fastest so: threads only contend for its directories)."""
        for copy in copies:
            self._copy_unless_there(copy)

    def _copy_unless_there(self, copy: tuple[str, str, bool]) -> None:
        src, dst, replace = copy
        if replace or self.stat(dst) is None:
            self.copy(src, dst)

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def open_once(self, key: str) -> BinaryIO:
        """`open`, for a reader that goes through the object once in big pieces (an archive
        unpacked, a download): the store may then read past its cache."""
        return self.open(key)

    def iter_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with self.open_once(key) as stream:
            while block := stream.read(chunk):
                yield block

    def ping(self) -> None:
        """Raises if the store cannot be reached."""

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Removes what writers killed mid-write left, untouched for `older_than` seconds;
        returns how many. None here: an S3 object appears whole or not at all (an interrupted
        multipart upload is for the bucket's lifecycle rules to abort)."""
        return 0


# --- local directory -----------------------------------------------------------------------------


WRITEBACK_EVERY = 8 * CHUNK


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range(2) (Python's os module lacks it), or None elsewhere."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call  # type: ignore[no-any-return]


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2): every file of one file system to disk, with one journal commit. None
    before Linux 5.8 (it did not report write-back errors) and elsewhere."""
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    if sys.platform != "linux" or release < (5, 8):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    return call  # type: ignore[no-any-return]


SYNCFS_UNWRITTEN_MAX = 64 * 1024 * 1024  # a syncfs waiting for more would be slower than fsyncs


def _unwritten_bytes() -> int | None:
    """Bytes of the machine's page cache not yet on disk (Dirty + Writeback), or None."""
    try:
        with open("/proc/meminfo", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        return (int(fields[b"Dirty"].split()[0]) + int(fields[b"Writeback"].split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _write_out(data: BinaryIO, out: BinaryIO, offset: int, *, eager: bool,
               direct_from: int | None = None) -> int:
    """Copies `data` to `out` (positioned at `offset`); returns the bytes written. Through the
    page cache, but for the file's bytes past `direct_from`: by O_DIRECT where the file system
    allows it (`_DirectWriter`)."""
    cached = None if direct_from is None else max(0, direct_from - offset)
    written = _write_cached(data, out, offset, eager=eager, most=cached) if cached != 0 else 0
    if cached is None or written < cached:
        return written
    out.flush()
    direct = _DirectWriter.open(out.fileno(), offset + written)
    if direct is None:
        return written + _write_cached(data, out, offset + written, eager=eager)
    with direct:
        while block := data.read(CHUNK):
            direct.write(block)
        direct.finish()
    return written + direct.written


def _write_cached(data: BinaryIO, out: BinaryIO, offset: int, *, eager: bool,
                  most: int | None = None) -> int:
    """Copies `data` to `out` through the page cache, until it ends or `most` bytes are
    written; returns the bytes written. With `eager`, each 8 MiB written is handed
    to the disk at once (SYNC_FILE_RANGE_WRITE: start, do not wait): the disk then works while
    the rest arrives, and the final fsync finds little left, where it would otherwise write the
    whole object back only then."""
    written = started = 0
    start_writeback = _sync_file_range() if eager else None
    while (most is None or written < most) and (
            block := data.read(CHUNK if most is None else min(CHUNK, most - written))):
        out.write(block)
        written += len(block)
        if start_writeback is not None and written - started >= WRITEBACK_EVERY:
            out.flush()
            start_writeback(out.fileno(), offset + started, written - started, 2)
            started = written
    if start_writeback is not None and written > started:  # the tail too (a small file whole)
        out.flush()
        start_writeback(out.fileno(), offset + started, written - started, 2)
    return written


# A file's first bytes go through the page cache, as its headers are read soon (the metadata
# service reads a file's first 64 KiB); past them, by O_DIRECT (`_DirectWriter`).
DIRECT_FROM = 64 * 1024
DIRECT_BUFFER = 4 * CHUNK
DIRECT_ALIGN = 4096  # of offsets, lengths and memory: a page covers the disk's logical block


class _DirectWriter:
    """Writes a file from offset `at` on by O_DIRECT: gathered in an aligned buffer of its own,
    then straight to the disk, past the page cache. Each page of the page cache costs a fault
    when first touched, and on a virtual machine whose freed memory goes back to its host (free
    page reporting) that fault is most of a buffered write's CPU: ~2-3 ms per MiB, against ~0.3
    through recycled pages and ~0.02 this way (measured on the benchmark's machine). What reads
    a file whole reads it once, past the page cache too (`_DirectReader`); a big upload no
    longer pushes other files out of the cache. The unaligned ends go through the page cache
    (the kernel keeps the two coherent).

    A full buffer goes to the disk from another thread while the next bytes fill a second
    one: the caller's work on them (hashing, receiving) and the disk's wait overlap, instead
    of taking turns (a put of 500 MiB: 0.62 s, of which 0.27 s waiting for the disk)."""

    def __init__(self, cached: int, direct: int, at: int):
        self.cached, self.direct, self.at = cached, direct, at
        self.lead = -at % DIRECT_ALIGN  # bytes before the first aligned offset
        self.buffer = _spare_buffers.take()
        self.view = memoryview(self.buffer)
        self.twin: tuple[mmap.mmap, memoryview] | None = None  # taken once the first is full
        self.pending: Future[None] | None = None  # a full buffer's write, on its way
        self.fill = 0
        self.written = 0

    @classmethod
    def open(cls, fd: int, at: int) -> _DirectWriter | None:
        """A writer on the file behind `fd`, or None where O_DIRECT is not to be had (not Linux,
        or a file system without it, e.g. tmpfs before Linux 6.6)."""
        try:
            direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError):
            return None
        try:
            return cls(fd, direct, at)
        except BaseException:
            os.close(direct)
            raise

    def write(self, block: bytes) -> None:
        self.written += len(block)
        view = memoryview(block)
        if self.lead:
            lead = view[:self.lead]
            self._write(self.cached, lead, self.at)
            self.at += len(lead)
            self.lead -= len(lead)
            view = view[len(lead):]
        while view:
            n = min(len(view), DIRECT_BUFFER - self.fill)
            self.view[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == DIRECT_BUFFER:
                self._hand_off()

    def _hand_off(self) -> None:
        """The full buffer to the disk, from another thread; the next bytes go to its twin
        (once the twin's own write is done)."""
        self._settle()
        if self.twin is None:
            spare = _spare_buffers.take()
            self.twin = (spare, memoryview(spare))
        try:
            self.pending = _direct_writes().submit(self._write, self.direct, self.view, self.at)
        except RuntimeError:  # (the interpreter is ending: no new threads) written here
            self._write(self.direct, self.view, self.at)
        self.at += DIRECT_BUFFER
        (self.buffer, self.view), self.twin = self.twin, (self.buffer, self.view)
        self.fill = 0

    def _settle(self) -> None:
        """Waits for the write on its way; raises its error."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def finish(self) -> None:
        """Writes what the buffer holds: its aligned part by O_DIRECT, the tail cached."""
        self._settle()
        aligned = self.fill - self.fill % DIRECT_ALIGN
        if aligned:
            self._write(self.direct, self.view[:aligned], self.at)
        if self.fill > aligned:
            self._write(self.cached, self.view[aligned:self.fill], self.at + aligned)
        self.at += self.fill
        self.fill = 0

    def _write(self, fd: int, data: memoryview, at: int) -> None:
        while data:
            try:
                n = os.pwrite(fd, data, at)
            except OSError as e:
                if fd == self.cached or e.errno != errno.EINVAL:
                    raise
                # A file system that took the flag but not these writes (a logical block
                # larger than a page): the rest through the page cache. (Only one write is on
                # its way at a time: none uses the descriptor meanwhile.)
                os.close(self.direct)
                fd = self.direct = self.cached
                continue
            if n == 0:
                raise OSError(errno.EIO, "the file system wrote nothing")
            at += n
            data = data[n:]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pending is not None:  # (failing already: the caller's error is the one told)
            try:
                self.pending.result()
            except Exception:  # noqa: BLE001, S110 - its error, if any, was raised or is moot
                pass
            except BaseException:  # interrupted meanwhile: what it uses goes once it ends
                self.pending.add_done_callback(lambda _: self._release())
                self.pending = None
                raise
            self.pending = None
        self._release()

    def _release(self) -> None:
        if self.direct != self.cached:
            os.close(self.direct)
        # Not closed here: after a failed write, a frame of the traceback may still hold a
        # slice of it (closing would raise BufferError over the real error); unmapped when the
        # last reference goes.
        for buffer, view in [(self.buffer, self.view), *([self.twin] if self.twin else [])]:
            view.release()
            _spare_buffers.give(buffer)


class _DirectReader(_Reader):
    """Reads a file by O_DIRECT, through an aligned buffer of its own: a file read once costs
    no pages of the page cache, which on the benchmark's machine made reading a file the
    writer had not left cached cost ~1.4 ms of CPU per MiB, against ~0.06 this way. The last
    piece read stays in the buffer, so small reads close together (a zip's local header, its
    member's name and first bytes) cost one read of the disk."""

    LEAST = 16 * 1024  # read from the disk at a time, at least

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.pos = 0
        self.buffer = _spare_buffers.take()
        self.view = memoryview(self.buffer)
        self.held_at = self.held = 0  # the buffer holds the file's bytes [held_at, +held)

    @classmethod
    def open(cls, path: Path) -> BinaryIO:
        """A direct reader of the file, or a plain one where O_DIRECT is not to be had."""
        try:
            return cls(path)  # type: ignore[return-value]
        except FileNotFoundError:
            raise
        except OSError:  # (EINVAL: a file system without it, e.g. tmpfs before Linux 6.6)
            return open(path, "rb")

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek of a closed file")
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            raise ValueError(f"invalid whence ({whence})")
        at = pos + (0 if whence == os.SEEK_SET else self.pos if whence == os.SEEK_CUR
                    else os.fstat(self.fd).st_size)
        if at < 0:
            raise OSError(errno.EINVAL, f"negative seek position {at}")
        self.pos = at
        return at

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:  # type: ignore[override]
        out = memoryview(b).cast("B")
        done = 0
        for piece in self.pieces(len(out), len(out)):
            out[done:done + len(piece)] = piece
            done += len(piece)
        return done

    def pieces(self, length: int, most: int) -> Iterator[memoryview]:
        """See `pieces`: views of this reader's own buffer, nothing copied."""
        end = self.pos + length
        while self.pos < end:
            at, n = self.pos, min(most, end - self.pos)
            if not (self.held_at <= at and at + n <= self.held_at + self.held):
                if not self._fetch(at, n):
                    return
                n = min(n, self.held_at + self.held - at)
            self.pos += n
            yield self.view[at - self.held_at:at - self.held_at + n]

    def _fetch(self, at: int, wanted: int) -> bool:
        """Reads the aligned blocks from the one holding `at` on (up to a buffer); False if
        the file ends before `at`."""
        start = at - at % DIRECT_ALIGN
        end = -(-(at + max(wanted, self.LEAST)) // DIRECT_ALIGN) * DIRECT_ALIGN
        self.held_at, self.held = start, 0
        piece = self.view[:min(DIRECT_BUFFER, end - start)]
        try:
            self.held = os.preadv(self.fd, [piece], start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # A file system that took the flag but not these reads (a logical block larger
            # than a page): the rest through the page cache.
            cached = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY)
            os.close(self.fd)
            self.fd = cached
            self.held = os.preadv(self.fd, [piece], start)
        return self.held > at - start

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
            self.view.release()
            _spare_buffers.give(self.buffer)  # (never closed: see `_DirectWriter.__exit__`)
        super().close()


def pieces(f: BinaryIO, length: int, most: int = CHUNK) -> Iterator[memoryview]:
    """`length` bytes of `f` from where it stands (fewer if it ends first), at most `most` at a
    time, each a view valid until the next is asked for: of the reader's own buffer where it
    has one (`open_once` on a local disk: nothing is copied), else of a spare buffer."""
    if isinstance(f, _DirectReader):
        yield from f.pieces(length, most)
        return
    with spare_buffer() as buffer:
        while length > 0 and (n := f.readinto(buffer[:min(most, length)])):
            length -= n
            yield buffer[:n]


class _SpareBuffers:
    """Aligned buffers kept for the next `_DirectWriter`s (each segment of a tus upload has
    one) and readers (`spare_buffer`): a fresh mapping's pages each cost a fault when first
    touched, on a virtual machine as dear as the page cache's."""

    KEPT = 12  # (each of the unpacker's two threads per core holds a reader's and a writer's
    #             two, on two cores)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spare: list[mmap.mmap] = []
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: its own buffers and lock (a copy of a lock held at the fork would
        stay held)."""
        self.lock = threading.Lock()
        self.spare = []

    def take(self) -> mmap.mmap:
        with self.lock:
            if self.spare:
                return self.spare.pop()
        # Private (a forked process gets its own copy) and page-aligned, as O_DIRECT needs.
        return mmap.mmap(-1, DIRECT_BUFFER, flags=mmap.MAP_PRIVATE)

    def give(self, buffer: mmap.mmap) -> None:
        with self.lock:
            if len(self.spare) < self.KEPT:
                self.spare.append(buffer)


_spare_buffers = _SpareBuffers()


class _DirectWrites:
    """The threads that write `_DirectWriter`s' full buffers: this process's own (a pool made
    before a fork would have no threads in the child)."""

    def __init__(self) -> None:
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def __call__(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(8, thread_name_prefix="imgest-direct-writes")
            return self.pool


_direct_writes = _DirectWrites()


@contextlib.contextmanager
def spare_buffer() -> Iterator[memoryview]:
    """A page-aligned buffer of DIRECT_BUFFER bytes, the caller's alone until the context ends;
    then kept for the next caller (see `_SpareBuffers`)."""
    buffer = _spare_buffers.take()
    view = memoryview(buffer)
    try:
        yield view
    finally:
        view.release()
        _spare_buffers.give(buffer)  # (never closed: see `_DirectWriter.__exit__`)


class DurableBatch:
    """Objects put with `durable=False`, made durable together; a context manager."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def make_durable(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.store.make_durable(key)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SyncfsBatch(DurableBatch):
    """Many files: one syncfs, not an fsync (and journal commit) each, when little else waits
    to be written (a syncfs waits for all of it: others' writes too); otherwise fsyncs side by
    side, which the file system commits together. Their data is mostly on its way already
    (`_write_out` started its write-back).

    The store's directory is opened before the first file is written: a syncfs reports a
    write-back error that came after its descriptor was opened, even one another process's
    syncfs saw first; opened later, it could miss one of these files'."""

    def __init__(self, store: LocalStore):
        super().__init__(store)
        self.fd: int | None = os.open(store.root, os.O_RDONLY)

    def make_durable(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        syncfs = _syncfs()
        unwritten = _unwritten_bytes()
        if (len(keys) < 2 or syncfs is None or self.fd is None or unwritten is None
                or unwritten > SYNCFS_UNWRITTEN_MAX):
            with ThreadPoolExecutor(min(len(keys), 8)) as pool:
                list(pool.map(self.store.make_durable, keys))
            return
        if syncfs(self.fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs of the store: {os.strerror(error)}")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalStore(ObjectStore):
    """Objects as files below a root directory; writes are atomic (temp file, then rename)."""

    def __init__(self, root: Path, fsync: bool = True, direct_io: bool = True):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.direct_from = DIRECT_FROM if direct_io else None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: BinaryIO, length: int | None = None, *,
            durable: bool = True) -> StoredObject:
        path = self._path(key)
        self._make_folder(path)
        tmp = _temporary_beside(path)
        hashing = _Hashing(data)
        try:
            with open(tmp, "wb") as out:
                _write_out(hashing, out, 0, eager=self.fsync, direct_from=self.direct_from)
                if self.fsync and durable:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredObject(key, hashing.size, hashing.sha.hexdigest())

    writes_in_place = True

    def write_at(self, key: str, offset: int, data: BinaryIO, *, durable: bool = True
                 ) -> StoredObject:
        path = self._path(key)
        self._make_folder(path)
        # Created at offset 0 only: later, a missing object is an error, never a file of zeros.
        fd = os.open(path, os.O_WRONLY | (os.O_CREAT if offset == 0 else 0), 0o644)
        with open(fd, "wb", closefd=True) as out:  # (no O_TRUNC: what is there stays)
            out.seek(offset)
            written = _write_out(data, out, offset, eager=self.fsync,
                                 direct_from=self.direct_from)
            if self.fsync and durable:
                out.flush()
                os.fsync(out.fileno())
        if offset == 0:
            self._sync_dir(path.parent)  # its name survives a crash too
        return StoredObject(key, written)

    def _sync_dir(self, directory: Path) -> None:
        if self.fsync:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def make_durable(self, key: str) -> None:
        if self.fsync:
            fd = os.open(self._path(key), os.O_RDONLY)
            try:
                os.fsync(fd)  # on Linux also for a descriptor opened read-only
            finally:
                os.close(fd)

    def durable_batch(self) -> DurableBatch:
        return _SyncfsBatch(self) if self.fsync and _syncfs() else DurableBatch(self)

    def _away(self) -> StoreError | None:
        if not self.root.is_dir():
            return StoreError(f"the store's directory {self.root} is not there")
        return None

    def _make_folder(self, path: Path) -> None:
        """The object's folder, but never the store's own: a directory away (unmounted, moved)
        must not come back empty."""
        if away := self._away():
            raise away
        path.parent.mkdir(parents=True, exist_ok=True)

    def _missing(self, key: str) -> StoreError:
        """ObjectNotFound; unless the store's own directory is not there (unmounted, moved
        away): then the store is away, which passes (a retry), and the object may well be
        in it still. (Found when a service read a file just as the store went away, and took
        it for deleted: its upload lost the file.)"""
        return self._away() or ObjectNotFound(key)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as e:
            raise self._missing(key) from e

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self.open(key) as f:
            f.seek(offset)
            return f.read(length)

    def open_once(self, key: str) -> BinaryIO:
        if self.direct_from is None:  # (IMGEST_STORE_DIRECT_IO=false)
            return self.open(key)
        try:
            return _DirectReader.open(self._path(key))
        except FileNotFoundError as e:
            raise self._missing(key) from e

    reads_anywhere = True

    def stat(self, key: str) -> StoredObject | None:
        try:
            return StoredObject(key, self._path(key).stat().st_size)
        except FileNotFoundError as e:
            if away := self._away():
                raise away from e
            return None

    def copy(self, src: str, dst: str) -> None:
        """A hard link where the file system allows (no byte is copied: objects are never
        changed in place, a write always renames a new file over the old), else a copy."""
        source, target = self._path(src), self._path(dst)
        self._make_folder(target)
        tmp = _temporary_beside(target)
        try:
            try:
                os.link(source, tmp)
            except FileNotFoundError:
                raise
            except OSError:  # another device, or links not allowed
                shutil.copyfile(source, tmp)
        except FileNotFoundError as e:
            raise self._missing(src) from e
        os.replace(tmp, target)

    def move(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        self._make_folder(target)
        try:
            os.replace(source, target)  # same file system: a rename is the server-side move
        except FileNotFoundError as e:
            if not target.exists():
                raise self._missing(src) from e
        self._sync_dir(target.parent)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        """Also, under a folder-like prefix (`staging/<upload>/`, with its `members/`), the
        temporary files of writers killed mid-write (`list` skips them) and the folders
        emptied: left behind, there would be some per upload for ever."""
        deleted = super().delete_prefix(prefix)
        top = self.root / prefix if prefix.endswith("/") else None
        if top is not None and top.is_dir():
            for folder, _dirs, files in os.walk(top, topdown=False):
                for name in files:
                    if _is_temporary(name):
                        (Path(folder) / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty: something was added since
                    os.rmdir(folder)
        return deleted

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Removes the temporary files that no write touched for `older_than` seconds: their
        writers were killed mid-write. By ctime, which a write and a copy's link both set (a
        link keeps its source's mtime). Returns how many."""
        removed = 0
        stale_before = time.time() - older_than
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(folder) / name
                with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
                    if _is_temporary(name) and path.stat().st_ctime < stale_before:
                        path.unlink()
                        removed += 1
        return removed

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Objects whose key starts with `prefix` (a string prefix, as in S3)."""
        if prefix:
            check_key(prefix.rstrip("/") or ".")  # nothing outside the root
        base = self.root / prefix if prefix else self.root
        start = base if prefix.endswith("/") or not prefix else base.parent
        if not start.is_dir():
            return
        for dirpath, _dirs, files in os.walk(start):
            for name in sorted(files):
                if _is_temporary(name):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield StoredObject(key, path.stat().st_size)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.root} is not writable")


# --- S3 ------------------------------------------------------------------------------------------


class S3Store(ObjectStore):
    """Objects in one S3 bucket (MinIO, AWS, Ceph, SeaweedFS, moto…), through `minio`."""

    side_by_side = 8

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, region: str | None = None):
        from minio import Minio

        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                            secure=secure, region=region)
        self.bucket = bucket

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def _wrap(self, key: str, error: Exception) -> StoreError:
        from minio.error import S3Error

        if isinstance(error, StoreError):
            return error  # e.g. InvalidKey: ours already, and permanent
        if isinstance(error, S3Error) and error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return ObjectNotFound(key)
        return StoreError(f"S3 {key}: {error}")

    def put(self, key: str, data: BinaryIO, length: int | None = None, *,
            durable: bool = True) -> StoredObject:
        hashing = _Hashing(_FullReads(data))
        try:
            self.client.put_object(
                self.bucket, check_key(key), hashing,  # type: ignore[arg-type]
                length=-1 if length is None else length, part_size=part_size_for(length),
            )
        except Exception as e:  # wrapped at the adapter boundary
            if hashing.source_error is not None:
                raise hashing.source_error from None  # e.g. a broken archive: not a store fault
            raise self._wrap(key, e) from e
        return StoredObject(key, hashing.size, hashing.sha.hexdigest())

    def open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(self.bucket, check_key(key))
        except Exception as e:
            raise self._wrap(key, e) from e
        return _S3Body(response)  # type: ignore[return-value]

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            response = self.client.get_object(self.bucket, check_key(key), offset=offset,
                                              length=length)
        except Exception as e:
            from minio.error import S3Error

            if isinstance(e, S3Error) and e.code == "InvalidRange":
                return b""
            raise self._wrap(key, e) from e
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> StoredObject | None:
        try:
            info = self.client.stat_object(self.bucket, check_key(key))
        except Exception as e:
            error = self._wrap(key, e)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from e
        return StoredObject(key, info.size or 0)

    def copy(self, src: str, dst: str) -> None:
        from minio.commonconfig import ComposeSource, CopySource

        try:
            info = self.stat(src)
            if info is None:
                raise ObjectNotFound(src)
            if info.size <= MAX_COPY:
                self.client.copy_object(self.bucket, check_key(dst), CopySource(self.bucket, src))
            else:  # CopyObject stops at 5 GiB; compose from ranged parts instead
                part = MAX_COPY
                sources = [ComposeSource(self.bucket, src, offset=o, length=min(part, info.size - o))
                           for o in range(0, info.size, part)]
                self.client.compose_object(self.bucket, check_key(dst), sources)
        except StoreError:
            raise
        except Exception as e:
            raise self._wrap(src, e) from e

    def copy_all(self, copies: list[tuple[str, str, bool]]) -> None:
        """Several at once: each copy is a round trip that waits on the server."""
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            for _ in pool.map(self._copy_unless_there, copies):
                pass

    def concat(self, sources: list[str], dst: str) -> StoredObject:
        from minio.commonconfig import ComposeSource

        sizes = [self.stat(key) for key in sources]
        if (len(sources) > 1 and len(sources) <= 10_000 and all(sizes)
                and all(s.size >= MIN_PART for s in sizes[:-1])):  # type: ignore[union-attr]
            try:  # server-side: no byte passes through imgest
                self.client.compose_object(self.bucket, check_key(dst),
                                           [ComposeSource(self.bucket, k) for k in sources])
            except Exception as e:
                raise self._wrap(dst, e) from e
            return StoredObject(dst, sum(s.size for s in sizes))  # type: ignore[union-attr]
        return super().concat(sources, dst)

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, check_key(key))
        except Exception as e:
            error = self._wrap(key, e)
            if not isinstance(error, ObjectNotFound):
                raise error from e

    def list(self, prefix: str) -> Iterator[StoredObject]:
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                yield StoredObject(obj.object_name, obj.size or 0)
        except Exception as e:
            raise self._wrap(prefix, e) from e

    def ping(self) -> None:
        try:
            self.client.bucket_exists(self.bucket)
        except Exception as e:
            raise StoreError(f"S3 unreachable: {e}") from e


class _Chained(_Reader):
    """Several objects read as one stream."""

    def __init__(self, store: ObjectStore, keys: list[str]):
        self.store, self.keys, self.current = store, list(keys), None

    def readinto(self, b) -> int:  # type: ignore[override]
        while True:
            if self.current is None:
                if not self.keys:
                    return 0
                self.current = self.store.open(self.keys.pop(0))
            n = self.current.readinto(b)
            if n:
                return n
            self.current.close()
            self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        super().close()


class _S3Body(_Reader):
    def __init__(self, response):
        self.response = response

    def read(self, n: int = -1) -> bytes:
        return self.response.read(None if n < 0 else n)

    def close(self) -> None:
        if not self.closed:
            self.response.close()
            self.response.release_conn()
        super().close()


def open_store(settings: RuntimeSettings) -> ObjectStore:
    if settings.store == "s3":
        store = S3Store(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key,
                        settings.s3_bucket, settings.s3_secure, settings.s3_region)
        store.ensure_bucket()
        return store
    return LocalStore(settings.local_store_dir, direct_io=settings.store_direct_io)


class RangeFile(_Reader):
    """A seekable read-only file over an object, each read a ranged read: for readers that
    jump about (zipfile, TIFF directories). `bytes_read` counts what it fetched."""

    def __init__(self, store: ObjectStore, key: str, size: int):
        self.store, self.key, self.size, self.pos = store, key, size, 0
        self.bytes_read = 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.store.read_range(self.key, self.pos, len(b)) if self.pos < self.size else b""
        b[: len(data)] = data
        self.pos += len(data)
        self.bytes_read += len(data)
        return len(data)


# --- async bridge --------------------------------------------------------------------------------


class _QueueReader(_Reader):
    """A blocking reader fed from the event loop with lists of chunks (bounded, so memory stays
    flat). A read hands back one chunk as it came, or part of one: no bytes are copied on the
    way (at hundreds of MB/s, each copy costs the event loop's CPU)."""

    def __init__(self, maxsize: int = 8):
        # Chunks must be bytes (minio refuses anything else): they are handed on as they are.
        self.chunks: queue.Queue[list[bytes] | BaseException | None] = queue.Queue(maxsize)
        self.ready: deque[bytes] = deque()
        self.done = False

    @classmethod
    def holding(cls, chunks: list[bytes]) -> _QueueReader:
        """A reader of these chunks only, all already there."""
        reader = cls(maxsize=1)
        reader.ready.extend(c for c in chunks if c)
        reader.done = True
        return reader

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        if n == 0:
            return b""
        while not self.ready:
            if self.done:
                return b""
            item = self.chunks.get()
            if item is None:
                self.done = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self.ready.extend(c for c in item if c)
        chunk = self.ready.popleft()
        if n < len(chunk):
            self.ready.appendleft(chunk[n:])
            chunk = chunk[:n]
        return chunk


async def put_async(store: ObjectStore, key: str, chunks: AsyncIterator[bytes],
                    length: int | None = None, *, durable: bool = True,
                    digests: Sequence[Any] = ()) -> StoredObject:
    """Stream an async byte source into the store; the store's blocking writer runs in a thread
    (and updates `digests`, hashlib objects, with the bytes: off the event loop)."""
    return await _write_async(lambda reader: store.put(key, reader, length, durable=durable),
                              chunks, digests)


async def write_at_async(store: ObjectStore, key: str, offset: int,
                         chunks: AsyncIterator[bytes], *, durable: bool = True,
                         digests: Sequence[Any] = ()) -> StoredObject:
    """`store.write_at` from an async byte source."""
    return await _write_async(
        lambda reader: store.write_at(key, offset, reader, durable=durable), chunks, digests)


class _Digesting(_Reader):
    """Updates digests with what is read through it."""

    def __init__(self, raw: BinaryIO, digests: Sequence[Any]):
        self.raw, self.digests = raw, digests

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        for digest in self.digests:
            digest.update(data)
        return data


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


async def each_side_by_side(store: ObjectStore, work: Callable[[_Item], _Result],
                            items: Sequence[_Item], most: int | None = None) -> list[_Result]:
    """work(item) for each item (blocking small requests on the store: reading a head), in
    `store.side_by_side` threads (or `most`, if fewer) that each take a share, one item after
    another: a thread per item would cost each a hand-off, and on a local disk threads only
    take turns at the GIL. The results in the items' order."""
    n = min(store.side_by_side, most or store.side_by_side, len(items))
    if n == 0:
        return []
    shares = await asyncio.gather(*(asyncio.to_thread(lambda share: [work(i) for i in share],
                                                      items[k::n]) for k in range(n)))
    return [shares[i % n][i // n] for i in range(len(items))]


async def _hand_over(to: queue.Queue[Any], item: object, thread: asyncio.Future[Any]) -> None:
    """Hands an item to a thread's queue from the loop itself: no worker thread is taken for
    it (with the pool busy with writers, that could wait for ever). A full queue means the
    store is slower than the client: wait a moment, which slows the client."""
    pause = 0.001
    while not thread.done():  # a thread that already failed takes nothing more
        try:
            to.put_nowait(item)
            return
        except queue.Full:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)


class SmallObjects:
    """Small objects, each already whole in memory, written one after another by one thread
    (`store.side_by_side` of them on a store where each put waits on the network): a form of
    many files costs one hand-off to a thread, not one each (each hand-off costs the event loop
    a wake-up and both threads a turn at the GIL: a quarter of a form's time)."""

    def __init__(self, store: ObjectStore, *, durable: bool = True, depth: int = 8):
        self.store, self.durable = store, durable
        self.queue: queue.Queue[tuple[str, list[bytes]] | None] = queue.Queue(depth)
        self.closed = threading.Event()  # no more to come, even if the end marker never came
        self.threads: asyncio.Future[list[Any]] | None = None
        self.written: dict[str, StoredObject | StoreError | OSError] = {}  # by key

    def _write_all(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=1)
            except queue.Empty:
                if self.closed.is_set():  # abandoned (cancelled): end, never wait for ever
                    return
                continue
            if item is None:
                return
            key, chunks = item
            try:
                self.written[key] = self.store.put(key, _QueueReader.holding(chunks),
                                                   durable=self.durable)
            except (StoreError, OSError) as e:  # this object's outcome; the next ones are tried
                self.written[key] = e

    async def put(self, key: str, chunks: list[bytes]) -> None:
        if self.threads is None:
            self.threads = asyncio.gather(*(asyncio.to_thread(self._write_all)
                                            for _ in range(self.store.side_by_side)),
                                          return_exceptions=True)  # done once all are
        elif self.threads.done():  # the writers died (not of a store error): say so now
            await self.finish()
        await _hand_over(self.queue, (key, chunks), self.threads)

    async def finish(self) -> dict[str, StoredObject | StoreError | OSError]:
        """Waits for the writes handed over; each key's stored object or error. The writers go
        on if the caller is cancelled meanwhile: call it again to wait for them."""
        self.closed.set()
        if self.threads is not None:
            for _ in range(self.store.side_by_side):
                await _hand_over(self.queue, None, self.threads)
            for outcome in await asyncio.shield(self.threads):
                if isinstance(outcome, BaseException):
                    raise outcome
        return self.written


async def read_up_to(chunks: AsyncIterator[bytes], limit: int) -> tuple[list[bytes], bool]:
    """The first chunks, to just past `limit` bytes; and whether that was all of them (the
    rest, if not, is still to be read from `chunks`)."""
    head: list[bytes] = []
    size = 0
    async for chunk in chunks:
        head.append(chunk)
        size += len(chunk)
        if size > limit:
            return head, False
    return head, True


async def _write_async(write: Callable[[BinaryIO], StoredObject],
                       chunks: AsyncIterator[bytes], digests: Sequence[Any] = ()
                       ) -> StoredObject:
    chunks = aiter(chunks)
    batch, whole = await read_up_to(chunks, CHUNK)  # handed over by the ~1 MiB: few hand-offs
    if whole:  # a small object: written with one hand-off to a thread, not a stream of them
        held = _QueueReader.holding(batch)  # (not joined: a copy on the event loop's time)
        return await asyncio.to_thread(
            write, _Digesting(held, digests) if digests else held)  # type: ignore[arg-type]

    reader = _QueueReader()
    source = _Digesting(reader, digests) if digests else reader  # type: ignore[arg-type]
    writer = asyncio.ensure_future(asyncio.to_thread(write, source))  # type: ignore[arg-type]

    async def feed(item: list[bytes] | BaseException | None) -> None:
        await _hand_over(reader.chunks, item, writer)

    try:
        await feed(batch)
        batch, size = [], 0
        async for chunk in chunks:
            if writer.done():
                break
            batch.append(chunk)
            size += len(chunk)
            if size >= CHUNK:
                await feed(batch)
                batch, size = [], 0
        if batch:
            await feed(batch)
        await feed(None)
    except BaseException as e:
        # Tell the writer the stream broke, so it fails and leaves nothing half-written behind.
        await asyncio.shield(feed(StoreError(f"upload stream interrupted: {e!r}")))
        try:
            await writer
        except StoreError:
            pass
        raise
    return await writer


class IterReader(_Reader):
    """A blocking reader over an iterator of byte chunks (to stream a generator into `put`).
    `read` hands a chunk on as it came (a part of one is copied, the rest is not)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = iter(chunks)
        self.buffer = b""
        self.at = 0  # what of the buffer was read

    def _filled(self) -> bool:
        while self.at >= len(self.buffer):
            chunk = next(self.chunks, None)
            if chunk is None:
                return False
            self.buffer, self.at = chunk, 0  # an empty chunk is not the end: read on
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        if not self._filled():
            return b""
        if self.at == 0 and n >= len(self.buffer):
            self.at = len(self.buffer)
            return self.buffer
        chunk = self.buffer[self.at:self.at + n]
        self.at += len(chunk)
        return chunk

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self._filled():
            return 0
        n = min(len(b), len(self.buffer) - self.at)
        b[:n] = memoryview(self.buffer)[self.at:self.at + n]
        self.at += n
        return n
