"""The unpacker: object.stored → file.staged for each file (archive members unpacked)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import stream_unzip
from fastapi import FastAPI
from imgest_contracts import (
    ArchiveRejected,
    ArchiveUnpacked,
    CloudEvent,
    FileStaged,
    ObjectStored,
    Reason,
    Source,
)
from imgest_runtime.outbox import derived_id
from imgest_runtime.service import Service, create_app
from imgest_runtime.store import IterReader, ObjectStore, fit_name

from .domain import ArchiveError, Limits, archive_format, check_growth, file_id, member_path
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


@dataclass
class Unpacked:
    members: list[Member]
    skipped: int
    bytes: int


def unpack_zip(store: ObjectStore, obj: ObjectStored, limits: Limits) -> Unpacked:
    """Streams the archive from the store and each member back into it (blocking; in a thread).

    Nothing is buffered whole: a member flows chunk by chunk from the archive into its object.
    """
    members: list[Member] = []
    skipped = 0
    total = 0

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal total
        for chunk in chunks:
            total += len(chunk)
            check_growth(total, obj.size, len(members) + 1, limits)
            yield chunk

    try:
        for raw_name, _size, chunks in stream_unzip.stream_unzip(store.iter_chunks(obj.object_key)):
            # Per member too, not only per chunk: empty members carry no chunk to count.
            check_growth(total, obj.size, len(members) + skipped + 1, limits)
            path = member_path(raw_name)
            if path is None:
                for _ in chunks:  # stream-unzip needs each member read before the next
                    pass
                skipped += 1
                continue
            fid = file_id(obj.upload_id, obj.object_key, path)
            key = f"staging/{obj.upload_id}/members/{fid}/{fit_name(Path(path).name)}"
            stored = store.put(key, IterReader(counted(chunks)))  # type: ignore[arg-type]
            members.append(Member(path, key, stored.size, stored.sha256))
    except stream_unzip.UnzipError as e:
        raise ArchiveError("archive.corrupt",
                           f"The zip archive cannot be read ({type(e).__name__}); "
                           "it may be truncated or damaged.") from e
    return Unpacked(members, skipped, total)


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations")
    limits = Limits(settings.max_members, settings.max_unpacked_bytes, settings.max_ratio)
    svc.publishes(FileStaged, ArchiveUnpacked, ArchiveRejected)

    # Its own transactions: an archive may take minutes to unpack, and no transaction should
    # stay open that long.
    @svc.on(ObjectStored, own_transaction=True)
    async def on_object_stored(event: CloudEvent[ObjectStored]) -> None:
        obj = event.data
        store = svc.store
        assert store is not None
        if await svc.handled_before(event):
            return
        head = await asyncio.to_thread(store.read_range, obj.object_key, 0, 8)
        fmt = archive_format(head)
        if fmt is None:
            async with svc.handling(event) as session:
                if session:
                    await svc.outbox.add(session, FileStaged(
                        upload_id=obj.upload_id,
                        file_id=file_id(obj.upload_id, obj.object_key, None),
                        object_key=obj.object_key, path=obj.filename, size=obj.size,
                        sha256=obj.sha256, source=Source(object_key=obj.object_key, files_total=1),
                    ), event_id=derived_id(event.id, "staged"))
            return

        try:
            result = await asyncio.to_thread(unpack_zip, store, obj, limits)
        except ArchiveError as e:
            log.warning("upload %s: %s refused: %s", obj.upload_id, obj.filename, e.message)
            await asyncio.to_thread(store.delete_prefix, f"staging/{obj.upload_id}/members/")
            async with svc.handling(event) as session:
                if session:
                    await svc.outbox.add(session, ArchiveRejected(
                        upload_id=obj.upload_id, object_key=obj.object_key, filename=obj.filename,
                        reason=Reason(code=e.code, message=e.message)),
                        event_id=derived_id(event.id, "rejected"))
            return

        n = len(result.members)
        async with svc.handling(event) as session:
            if not session:
                return
            for m in result.members:
                await svc.outbox.add(session, FileStaged(
                    upload_id=obj.upload_id, file_id=file_id(obj.upload_id, obj.object_key, m.path),
                    object_key=m.key, path=f"{obj.filename}/{m.path}", size=m.size,
                    sha256=m.sha256,
                    source=Source(object_key=obj.object_key, member=m.path, files_total=n),
                ), event_id=derived_id(event.id, "staged", m.path))
            await svc.outbox.add(session, ArchiveUnpacked(
                upload_id=obj.upload_id, object_key=obj.object_key, filename=obj.filename,
                format=fmt, members_staged=n, members_skipped=result.skipped,
                bytes_unpacked=result.bytes), event_id=derived_id(event.id, "unpacked"))
        log.info("upload %s: %s unpacked: %d files, %d skipped, %d bytes", obj.upload_id,
                 obj.filename, n, result.skipped, result.bytes)

    return svc


def build_app(settings: Settings) -> FastAPI:
    return create_app(bootstrap(settings))
