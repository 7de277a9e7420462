"""The unpacker: object.stored → file.staged for each file (archive members unpacked: zip, tar,
tar.gz, tar.bz2, tar.xz, by content; archives inside them one level deep)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from imgest_contracts import (
    ArchiveProgress,
    ArchiveRejected,
    ArchiveUnpacked,
    CloudEvent,
    Fileset,
    FilesetFile,
    FileStaged,
    ObjectStored,
    Reason,
    Source,
)
from imgest_runtime.outbox import derived_id
from imgest_runtime.service import Service, create_app
from imgest_runtime.store import (
    CHUNK,
    DurableBatch,
    IterReader,
    ObjectNotFound,
    ObjectStore,
    StoredObject,
    each_side_by_side,
    fit_name,
)

from .archives import Span, entries, sniff, sniff_head, sniff_span, write_span
from .domain import (
    ArchiveError,
    Limits,
    Tally,
    file_id,
    listing_files,
    may_join_fileset,
    plan_filesets,
)
from .models import metadata
from .settings import Settings

NAME = "unpacker"
log = logging.getLogger("imgest.unpacker")


@dataclass
class Member:
    path: str
    key: str
    size: int
    sha256: str
    root: str = ""  # the path of the archive it came from inside the upload's archive, + "/"


@dataclass
class StagedFileset:
    format: str
    index: Member
    files: list[tuple[str, Member]]  # (path relative to the index's folder, member)


@dataclass
class Unpacked:
    members: list[Member]  # loose files
    skipped: int
    bytes: int
    filesets: list[StagedFileset] = field(default_factory=list)
    told: int = 0  # members told of while it unpacked (not among `members`)


LISTING_MAX = 1024 * 1024  # an index or Slidedat.ini larger than this is not a listing
OBJECT_MISSING = "store.object_missing"


def format_of(store: ObjectStore, key: str) -> str | None:
    """The archive format of a stored object, None for a file. An object already gone (its
    upload cancelled) goes on as a file: the metadata service refuses it at once."""
    try:
        return sniff(store, key)
    except ObjectNotFound:
        return None


def group_filesets(store: ObjectStore, members: list[Member]
                   ) -> tuple[list[StagedFileset], list[Member]]:
    """Multi-file slides among the members, per archive (the outer one, each inner one)."""
    filesets, loose = [], []
    for root in sorted({m.root for m in members}):
        here = {m.path[len(root):]: m for m in members if m.root == root}
        texts = {p: store.read_range(here[p].key, 0, LISTING_MAX).decode("utf-8", "replace")
                 for p in listing_files(list(here))}
        plans, rest = plan_filesets(list(here), texts)
        filesets += [StagedFileset(p.format, here[p.index], [(f, here[f]) for f in p.files])
                     for p in plans]
        loose += [here[p] for p in rest]
    return filesets, loose


Progress = Callable[[int, int | None, int], None]  # (files staged, files in all, bytes)

WHOLE_UP_TO = CHUNK  # a member up to this size is read whole and written by a writer
Tell = Callable[[list[Member]], None]
EARLY_MEMBERS = 100
EARLY_SECONDS = 0.5
TELL_TIMEOUT = 60  # seconds a group may take to be recorded before the unpacking gives up


class _Early:
    """Members told of while the archive still unpacks, so that checking them overlaps the
    unpacking instead of following it (scenario 1, a zip of 1,000 CT slices: the first file
    validated 0.9 s sooner, the whole 8-10 % sooner). Only members that cannot be part of a
    multi-file slide (which takes the whole listing to tell) go early, each group made durable
    first. A group goes once it holds EARLY_MEMBERS, or with the first member staged
    EARLY_SECONDS or more after the last group (so large members go about one by one). An
    archive refused later is refused whole all the same: its members are deleted, and the
    services drop the files of a refused archive."""

    def __init__(self, batch: DurableBatch, tell: Tell | None):
        self.batch, self.tell = batch, tell
        self.waiting: list[Member] = []
        self.told: set[str] = set()  # their keys
        self.since = time.monotonic()

    def staged(self, member: Member) -> None:
        if self.tell is None or may_join_fileset(member.path):
            return
        self.waiting.append(member)
        if (len(self.waiting) >= EARLY_MEMBERS
                or time.monotonic() - self.since >= EARLY_SECONDS):
            self.batch.make_durable([m.key for m in self.waiting])
            self.tell(self.waiting)
            self.told.update(m.key for m in self.waiting)
            self.waiting, self.since = [], time.monotonic()

    def stop(self) -> None:
        """No more goes early (what is left is told with the archive's outcome)."""
        self.tell = None


class _Writers:
    """Members written by other threads while the next ones are read from the archive: reading
    it (parsing, inflating) and writing them (hashing, the disk) overlap instead of taking
    turns (a zip of 1,000 CT slices unpacks in about 15 % less time). At most `ahead` members
    wait their turn (streamed ones whole, in memory). Members are recorded in `staged` in the
    archive's order.

    Members unpacked from where they lie in the archive (`write_span`) have two threads per
    core: that work is the kind that lets go of the GIL, and each thread waits on the disk
    for its reads and writes (by O_DIRECT on a local disk) while another computes (scenario 1:
    240-282 instances/s with four threads on two cores, against 225-242 with two). Streamed
    ones have the store's `side_by_side` (on a local disk, more threads would take turns at
    the GIL)."""

    def __init__(self, store: ObjectStore, staged: list[Member], on_staged: Callable[[], None]):
        self.store, self.staged, self.on_staged = store, staged, on_staged
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        self.ahead = max(8, 2 * cores) if store.reads_anywhere else 8
        self.pools = {  # (a pool starts its threads only as work comes)
            kind: ThreadPoolExecutor(threads, thread_name_prefix="imgest-members")
            for kind, threads in (("streamed", store.side_by_side),
                                  ("spans", max(store.side_by_side, 2 * cores)))}
        self.pending: deque[tuple[str, str, Future[StoredObject]]] = deque()

    def put(self, path: str, key: str, chunks: list[bytes], root: str) -> None:
        self._submit("streamed", path, root, self.store.put, key, IterReader(iter(chunks)),
                     durable=False)

    def unpack(self, path: str, key: str, span: Span, root: str) -> None:
        self._submit("spans", path, root, write_span, self.store, span, path, key)

    def _submit(self, kind: str, path: str, root: str, write: Callable[..., StoredObject],
                *args: object, **kwargs: object) -> None:
        self.pending.append((path, root, self.pools[kind].submit(write, *args, **kwargs)))
        self.settle(self.ahead)

    def settle(self, keep: int = 0) -> None:
        """Records written members, oldest first, until at most `keep` are on their way;
        raises a write's error."""
        while len(self.pending) > keep:
            path, root, written = self.pending.popleft()
            self.record(path, root, written.result())

    def record(self, path: str, root: str, stored: StoredObject) -> None:
        self.staged.append(Member(path, stored.key, stored.size, stored.sha256, root))
        self.on_staged()

    def close(self) -> None:
        """Waits for every write, so none lands after the caller's clean-up; records those
        written (a failure has already been raised, or the archive was refused)."""
        for path, root, written in self.pending:
            with contextlib.suppress(Exception):
                self.record(path, root, written.result())
        self.pending.clear()
        for pool in self.pools.values():
            pool.shutdown()


def unpack(store: ObjectStore, obj: ObjectStored, fmt: str, limits: Limits,
           progress: Progress | None = None, tell: Tell | None = None) -> Unpacked:
    """Unpacks the archive from the store into it, member by member (blocking; in a thread):
    streamed, or from where each member lies in the archive (`entries` says which). An
    archive inside it (one level deep) is unpacked in its place. Nothing large is held whole:
    a member over WHOLE_UP_TO flows chunk by chunk from the archive into its object.
    The members are made durable in groups (one flush of the disk each, not an fsync per
    member: those would take longer than the unpacking): those `tell` is given as they come
    (see _Early), the rest at the end. If the archive is refused, what was staged of it is
    deleted again (all or nothing); the original stays."""
    tally = Tally(limits, obj.size)
    staged: list[Member] = []
    told: set[str] = set()
    try:
        with store.durable_batch() as batch:  # opened before the first member is written
            early = _Early(batch, tell)
            told = early.told

            def on_staged() -> None:
                early.staged(staged[-1])
                if progress:
                    progress(len(staged), tally.expected, tally.unpacked)

            writers = _Writers(store, staged, on_staged)
            try:
                for inner in _stage(store, obj, obj.object_key, obj.size, fmt, tally, writers,
                                    ""):
                    # An archive inside gives way to its members (their archives stay files).
                    try:
                        for _ in _stage(store, obj, inner.key, inner.size, inner.fmt, tally,
                                        writers, inner.prefix):
                            pass
                        writers.settle()  # (its members may be copied out of it in place)
                    except BaseException:
                        with contextlib.suppress(Exception):  # (the first error is the one told)
                            store.delete(inner.key)
                        raise
                    store.delete(inner.key)
                writers.settle()
            finally:
                early.stop()  # (after a failure, nothing more is told)
                writers.close()
            if not staged:
                raise ArchiveError("archive.empty", "The archive holds no files" + (
                    f", only folders or system files ({tally.skipped} skipped)."
                    if tally.skipped else "."))
            filesets, loose = group_filesets(store, staged)
            # (before anyone is told of them)
            batch.make_durable([m.key for m in staged if m.key not in told])
    except (ArchiveError, ObjectNotFound) as e:
        # Refused, or gone from staging meanwhile (its upload was cancelled): what was staged
        # of it goes. (After any other failure the work is done again: the same keys are
        # written again, and the importer empties staging at the end.)
        for m in staged:
            store.delete(m.key)
        if isinstance(e, ObjectNotFound):  # retrying cannot bring it back
            raise ArchiveError(OBJECT_MISSING, (
                "The archive was removed before it could be unpacked (was its upload "
                "cancelled?).")) from e
        raise
    return Unpacked([m for m in loose if m.key not in told], tally.skipped, tally.unpacked,
                    filesets, len(told))


@dataclass
class _Inner:
    """An archive inside the upload's archive: stored, to be unpacked in its place."""
    key: str
    size: int
    fmt: str
    prefix: str  # its path and "/"


def _stage(store: ObjectStore, obj: ObjectStored, key: str, size: int, fmt: str, tally: Tally,
           writers: _Writers, prefix: str) -> Iterator[_Inner]:
    """Stages each file of the archive at `key`; yields each archive inside it when this is
    the upload's own archive (no `prefix`)."""
    for entry in entries(store, key, size, fmt, tally, prefix):
        path = prefix + entry.path
        fid = file_id(obj.upload_id, obj.object_key, path)
        # The file id before the name, not a folder per member (a directory per file costs
        # the disk about a seventh of a small file's write).
        member_key = f"staging/{obj.upload_id}/members/{fit_name(f'{fid}-{Path(path).name}')}"
        if (span := entry.span) is not None:  # where it lies in the archive: not streamed
            inner_fmt = None if prefix else sniff_span(store, span, path)
            if inner_fmt is None:
                writers.unpack(path, member_key, span, prefix)
                continue
            writers.settle()
            stored = write_span(store, span, path, member_key)
            yield _Inner(member_key, stored.size, inner_fmt, path + "/")
            continue
        head, whole = _read_up_to(entry.chunks, WHOLE_UP_TO)
        inner_fmt = None if prefix or not whole else sniff_head(_head_of(head))
        if whole and inner_fmt is None:
            writers.put(path, member_key, head, prefix)
            continue
        writers.settle()  # the members before it first: they are recorded in order
        stored = store.put(member_key, IterReader(itertools.chain(head, entry.chunks)),
                           durable=False)
        if not prefix and not whole:
            inner_fmt = sniff(store, member_key)
        if inner_fmt is None:
            writers.record(path, prefix, stored)
            continue
        yield _Inner(member_key, stored.size, inner_fmt, path + "/")


def _read_up_to(chunks: Iterator[bytes], limit: int) -> tuple[list[bytes], bool]:
    """The first chunks, to just past `limit` bytes; and whether that was all of them."""
    head: list[bytes] = []
    size = 0
    for chunk in chunks:
        head.append(chunk)
        size += len(chunk)
        if size > limit:
            return head, False
    return head, True


def _head_of(chunks: list[bytes]) -> Callable[[int], bytes]:
    def head(n: int) -> bytes:
        out, size = [], 0
        for chunk in chunks:
            if size >= n:
                break
            out.append(chunk)
            size += len(chunk)
        return b"".join(out)[:n]
    return head


def member_staged(event: CloudEvent[ObjectStored], m: Member, files_total: int | None
                  ) -> tuple[FileStaged, str]:
    """The file.staged of an archive's member (a file of its own), with its event id."""
    obj = event.data
    return FileStaged(
        upload_id=obj.upload_id, file_id=file_id(obj.upload_id, obj.object_key, m.path),
        object_key=m.key, path=f"{obj.filename}/{m.path}", size=m.size, sha256=m.sha256,
        source=Source(object_key=obj.object_key, member=m.path, files_total=files_total),
        project=obj.project, rules=obj.rules,
    ), derived_id(event.id, "staged", m.path)


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations")
    limits = Limits(settings.max_members, settings.max_unpacked_bytes, settings.max_ratio)
    svc.publishes(FileStaged, ArchiveProgress, ArchiveUnpacked, ArchiveRejected)

    async def report_progress(obj: ObjectStored, latest: list) -> None:
        """While an archive unpacks, says every few seconds how far it got (what the thread
        appended last; nothing if it did not move)."""
        sent = None
        while True:
            await asyncio.sleep(settings.progress_seconds)
            if latest[0] is None or latest[0] == sent:
                continue
            sent = latest[0]
            done, total, size = sent
            async with svc.db.session() as session:
                await svc.outbox.add(session, ArchiveProgress(
                    upload_id=obj.upload_id, object_key=obj.object_key, members_done=done,
                    members_total=total, bytes_done=size))

    @svc.on(ObjectStored, own_transaction=True, whole_batch=True)
    async def on_objects_stored(events: list[CloudEvent[ObjectStored]]) -> None:
        store = svc.store
        assert store is not None
        handled = await svc.handled(e.id for e in events)
        todo = list({e.id: e for e in events if e.id not in handled}.values())
        # What each is (side by side on S3, where each look waits on the network).
        formats = await each_side_by_side(store, lambda e: format_of(store, e.data.object_key),
                                           todo)
        singles: list[CloudEvent[ObjectStored]] = []
        for event, fmt in zip(todo, formats):  # in their order: the first of equal files wins
            if fmt is None:
                singles.append(event)
                continue
            await stage_singles(singles)
            singles = []
            await unpack_archive(event, fmt)
        await stage_singles(singles)

    async def stage_singles(events: list[CloudEvent[ObjectStored]]) -> None:
        """Objects that are not archives: each goes on as one file, all in one unit of work."""
        if not events:
            return
        async with svc.handling_many(events) as (session, fresh):
            await svc.outbox.add_many(session, [(FileStaged(
                upload_id=e.data.upload_id,
                file_id=file_id(e.data.upload_id, e.data.object_key, None),
                object_key=e.data.object_key, path=e.data.filename, size=e.data.size,
                sha256=e.data.sha256, source=Source(object_key=e.data.object_key, files_total=1),
                project=e.data.project, rules=e.data.rules,
            ), derived_id(e.id, "staged")) for e in fresh])

    async def unpack_archive(event: CloudEvent[ObjectStored], fmt: str) -> None:
        """Its own units of work: an archive may take minutes to unpack, and no transaction
        should stay open that long."""
        obj = event.data
        store = svc.store
        assert store is not None
        if await svc.handled_before(event):  # (sent again while the batch waited its turn)
            return
        latest: list[tuple[int, int | None, int] | None] = [None]  # set by the thread
        reporter = asyncio.create_task(report_progress(obj, latest))
        loop, abandoned = asyncio.get_running_loop(), threading.Event()

        async def told(members: list[Member]) -> None:
            async with svc.db.session() as session:  # (how many in all is not known yet)
                await svc.outbox.add_many(session, [member_staged(event, m, None)
                                                    for m in members])

        def tell(members: list[Member]) -> None:  # (in the unpacking thread)
            if abandoned.is_set():  # (this handler was cancelled: the service is stopping)
                raise RuntimeError("the unpacking was abandoned")
            asyncio.run_coroutine_threadsafe(told(members), loop).result(TELL_TIMEOUT)

        try:
            # Early only alone in its upload (see ObjectStored.only_object).
            result = await asyncio.to_thread(
                unpack, store, obj, fmt, limits, lambda *p: latest.__setitem__(0, p),
                tell if obj.only_object else None)
        except ArchiveError as e:
            log.warning("upload %s: %s refused: %s", obj.upload_id, obj.filename, e.message)
            async with svc.handling(event) as session:
                if session:
                    await svc.outbox.add(session, ArchiveRejected(
                        upload_id=obj.upload_id, object_key=obj.object_key, filename=obj.filename,
                        reason=Reason(code=e.code, message=e.message)),
                        event_id=derived_id(event.id, "rejected"))
            return
        finally:
            abandoned.set()
            reporter.cancel()  # and waited for: no progress is told after the outcome
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

        n = len(result.members) + len(result.filesets) + result.told
        staged = []
        for fs in result.filesets:  # one image: one event for the index and its files
            index = fs.index
            staged.append((FileStaged(
                upload_id=obj.upload_id,
                file_id=file_id(obj.upload_id, obj.object_key, index.path),
                object_key=index.key, path=f"{obj.filename}/{index.path}",
                size=index.size, sha256=index.sha256,
                source=Source(object_key=obj.object_key, member=index.path, files_total=n),
                project=obj.project, rules=obj.rules,
                fileset=Fileset(format=fs.format, files=[  # type: ignore[arg-type]
                    FilesetFile(path=p, object_key=m.key, size=m.size, sha256=m.sha256)
                    for p, m in fs.files]),
            ), derived_id(event.id, "staged", index.path)))
        staged += [member_staged(event, m, n) for m in result.members]
        staged.append((ArchiveUnpacked(
            upload_id=obj.upload_id, object_key=obj.object_key, filename=obj.filename,
            format=fmt, members_staged=n, members_skipped=result.skipped,
            bytes_unpacked=result.bytes), derived_id(event.id, "unpacked")))
        async with svc.handling(event) as session:
            if not session:
                return
            await svc.outbox.add_many(session, staged)
        log.info("upload %s: %s unpacked: %d files (%d told of while it unpacked), %d skipped, "
                 "%d bytes", obj.upload_id, obj.filename, n, result.told, result.skipped,
                 result.bytes)

    return svc


def build_app(settings: Settings) -> FastAPI:
    return create_app(bootstrap(settings))
