"""The metadata service: file.staged → file.validated or file.rejected."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI
from imgest_contracts import (
    CloudEvent,
    FileKind,
    FileRejected,
    FileStaged,
    FileValidated,
    Reason,
)
from imgest_runtime.outbox import derived_id
from imgest_runtime.service import Service, Tx, create_app
from imgest_runtime.store import ObjectStore

from .domain import HEAD_BYTES, Identified, NeedMore, identify, sniff
from .models import metadata
from .settings import Settings

NAME = "metadata"
log = logging.getLogger("imgest.metadata")


def read_headers(store: ObjectStore, staged: FileStaged, limit: int) -> Identified:
    """Reads as little as the headers need: 64 KiB first, more only if they go on (blocking)."""
    length = HEAD_BYTES
    while True:
        head = store.read_range(staged.object_key, 0, min(length, staged.size))
        try:
            return identify(head, staged.size, staged.path)
        except NeedMore:
            if length >= limit:
                return Identified(sniff(head, staged.path), reason=Reason(
                    code="file.headers_too_large",
                    message=f"The headers run past {limit} bytes; refusing to read further."))
            length = min(length * 4, limit)


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations")
    svc.publishes(FileValidated, FileRejected)

    @svc.on(FileStaged)
    async def on_file_staged(event: CloudEvent[FileStaged], tx: Tx) -> None:
        # Inside the batch's transaction, after the inbox: a replayed event is dropped before
        # the store is touched. Only headers are read, so the transaction stays short.
        staged = event.data
        assert svc.store is not None
        if staged.fileset is not None:  # a multi-file slide, checked whole by the unpacker
            found = Identified(FileKind.slide, {
                "format": staged.fileset.format, "files": len(staged.fileset.files) + 1,
                "bytes": staged.size + sum(f.size for f in staged.fileset.files)})
        else:
            found = await asyncio.to_thread(read_headers, svc.store, staged,
                                            settings.max_header_bytes)
        common = {"upload_id": staged.upload_id, "file_id": staged.file_id,
                  "object_key": staged.object_key, "path": staged.path, "source": staged.source,
                  "kind": found.kind}
        if found.reason:
            log.info("upload %s: %s rejected: %s", staged.upload_id, staged.path,
                     found.reason.message)
            tx.publish(FileRejected(**common, reason=found.reason),
                       event_id=derived_id(event.id, "rejected"))
        else:
            tx.publish(FileValidated(
                **common, size=staged.size, sha256=staged.sha256, metadata=found.metadata,
                hints=found.hints, fileset=staged.fileset),
                event_id=derived_id(event.id, "validated"))

    return svc


def build_app(settings: Settings) -> FastAPI:
    return create_app(bootstrap(settings))
