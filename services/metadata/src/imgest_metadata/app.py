"""The metadata service: file.staged → file.validated or file.rejected.

Each file is identified by its content, its headers read with as few bytes as they need
(ranged reads from the store), checked against its project's rules and against what its upload
already holds (the same content, or the same DICOM instance, is skipped as a duplicate).
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from imgest_contracts import (
    CloudEvent,
    FileKind,
    FileRejected,
    FileStaged,
    FileValidated,
    ProjectRules,
    ProjectUpdated,
    Reason,
    UploadCompleted,
)
from imgest_runtime.outbox import derived_id
from imgest_runtime.service import Service, Tx, create_app
from imgest_runtime.store import ObjectNotFound, ObjectStore, RangeFile, each_side_by_side
from sqlalchemy import delete, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import col, select

from .domain import (
    HEAD_BYTES,
    KIND_OF,
    TAIL_BYTES,
    Claim,
    CsvCheck,
    FileKeys,
    Identified,
    NeedMore,
    check_rules,
    encapsulated_cut,
    fileset,
    first_claims,
    identify,
    is_slide,
    newest,
    photo_cut,
    read_exif,
    refused,
    slide_metadata,
    sniff,
    tiff_cut,
)
from .models import ProjectRulesRow, SeenFile, metadata
from .settings import Settings

NAME = "metadata"
log = logging.getLogger("imgest.metadata")
CHUNK = 1024 * 1024


class HeadersTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"The headers run past {limit} bytes; refusing to read further.")


class _GuardedRange(RangeFile):
    """Ranged reads that remember a failure of the store: parsers swallow errors, and a store
    outage must be retried, never blamed on the file."""

    failed: BaseException | None = None

    def readinto(self, b) -> int:  # type: ignore[override]
        try:
            return super().readinto(b)
        except Exception as e:
            self.failed = e
            raise


class _Budget(io.BufferedReader):
    """A buffered ranged reader that stops a reader wandering through more than `limit`
    bytes of an object (a TIFF whose directories point all over a huge file)."""

    def __init__(self, raw: _GuardedRange, limit: int):
        super().__init__(raw, 64 * 1024)
        self.range, self.limit = raw, limit

    def read(self, size: int | None = -1) -> bytes:
        if self.range.bytes_read > self.limit:
            raise HeadersTooLarge(self.limit)
        return super().read(size)


# The tags tifffile takes byte counts from: TileByteCounts, StripByteCounts,
# JPEGInterchangeFormatLength. Without one, it estimates them.
BYTE_COUNT_TAGS = (325, 279, 514)


def _read_tiff(store: ObjectStore, staged: FileStaged, fmt: str, limit: int) -> Identified:
    """A TIFF or BigTIFF, through tiffslide over ranged reads: a slide (pyramid or vendor
    format) with its vendor, size, levels, microns per pixel and objective power; otherwise a
    photo with its EXIF."""
    import tiffslide

    raw = _GuardedRange(store, staged.object_key, staged.size)
    kind = FileKind.slide if fmt == "bigtiff" else FileKind.photo
    try:
        with warnings.catch_warnings():  # tifffile warns on every odd tag; the verdict says it
            warnings.simplefilter("ignore")
            with _Budget(raw, limit) as f, tiffslide.TiffSlide(f) as slide:
                properties = dict(slide.properties)
                page = slide.ts_tifffile.pages.first
                tiled = bool(page.is_tiled)
                width, height = page.imagewidth, page.imagelength
                if fmt == "bigtiff" or is_slide(properties, tiled):
                    found = Identified(FileKind.slide, slide_metadata(properties, fmt))
                else:
                    f.seek(0)
                    found = Identified(FileKind.photo, {
                        "format": "tiff", "width": width, "height": height, **read_exif(f)})
                cut = tiff_cut(((d.dataoffsets, d.databytecounts,
                                 any(tag in d.tags for tag in BYTE_COUNT_TAGS))
                                for d in _directories(slide.ts_tifffile.pages)), staged.size)
                if cut:
                    found = Identified(found.kind, reason=cut)
    except HeadersTooLarge as e:
        found = refused(kind, "file.headers_too_large", str(e))
    except Exception as e:  # noqa: BLE001 - tifffile, tiffslide, exifread: many kinds, all the file's fault
        found = refused(kind, "tiff.malformed", f"The TIFF's directories cannot be read: "
                        f"{type(e).__name__}: {e}")
    if raw.failed is not None:
        raise raw.failed
    return found


def _directories(pages: Any) -> Iterator[Any]:
    """Every directory of a TIFF, those in SubIFDs too (a generic pyramid's levels): only
    their tables are read, never their image data."""
    import tifffile

    for page in pages:
        yield page
        if page.subifds:
            yield from _directories(tifffile.TiffPages(page))


def _read_csv(store: ObjectStore, staged: FileStaged, head: bytes, limit: int) -> Identified:
    """A CSV is read whole (its row count needs every line), streamed a chunk at a time."""
    if staged.size > limit:
        return refused(FileKind.csv, "csv.too_large",
                       f"The CSV is {staged.size} bytes; at most {limit} are read.")
    check = CsvCheck(head)
    with store.open(staged.object_key) as f:
        while (chunk := f.read(CHUNK)) and not check.reason:
            check.feed(chunk)
    return check.result()


WINDOW = 256 * 1024  # what a read past the head fetches


class _Reader:
    """read(offset, n): the file's bytes, from its head if they are there, else from a window
    of the store's bytes from `offset` on, the last one kept. Walking compressed pixel data's
    items reads an 8-byte header per fragment (thousands in a multi-frame file): a window
    serves many of them with one request (on S3, a GET). Not larger: a file of large fragments
    needs a request per fragment anyway, and would be fetched nearly whole."""

    def __init__(self, store: ObjectStore, staged: FileStaged, head: bytes):
        self.store, self.staged, self.head = store, staged, head
        self.at, self.window = 0, b""

    def __call__(self, offset: int, n: int) -> bytes:
        if offset + n <= len(self.head):
            return self.head[offset:offset + n]
        if not self.at <= offset <= offset + n <= self.at + len(self.window):
            self.at, self.window = offset, self.store.read_range(
                self.staged.object_key, offset, min(max(n, WINDOW), self.staged.size - offset))
        return self.window[offset - self.at:offset - self.at + n]


def read_headers(store: ObjectStore, staged: FileStaged, limit: int,
                 csv_limit: int = 256 * 1024**2) -> Identified:
    """Identifies the file and reads its headers (blocking). DICOM, JPEG and PNG from the
    head: 64 KiB first, more only if the headers go on; TIFFs by ranged reads; CSVs whole.
    A file gone from staging is refused at once: retrying cannot bring it back, and each
    retry would hold up the files behind it (a cancelled upload's staging is emptied)."""
    try:
        return _read_headers(store, staged, limit, csv_limit)
    except ObjectNotFound:
        return refused(FileKind.unknown, "store.object_missing", (
            "The file was removed before it could be checked (was its upload cancelled?)."))


def _read_headers(store: ObjectStore, staged: FileStaged, limit: int, csv_limit: int
                  ) -> Identified:
    length = HEAD_BYTES
    while True:
        head = store.read_range(staged.object_key, 0, min(length, staged.size))
        try:
            found = identify(head, staged.size, staged.path)
        except NeedMore:
            if length >= limit:
                return refused(KIND_OF[sniff(head, staged.path)], "file.headers_too_large",
                               f"The headers run past {limit} bytes; refusing to read further.")
            length = min(length * 4, limit)
            continue
        if found.pixel_items_at is not None:
            cut = encapsulated_cut(_Reader(store, staged, head), found.pixel_items_at,
                                   staged.size)
            return Identified(FileKind.dicom, reason=cut) if cut else found
        if found.reason or "format" not in found.metadata:
            return found
        fmt = found.metadata["format"]
        if fmt in ("jpeg", "png"):
            start = max(0, staged.size - TAIL_BYTES)
            cut = photo_cut(fmt, head, _Reader(store, staged, head)(start, staged.size - start),
                            staged.size)
            return Identified(FileKind.photo, reason=cut) if cut else found
        if fmt in ("tiff", "bigtiff"):
            return _read_tiff(store, staged, fmt, limit)
        if fmt == "csv":
            return _read_csv(store, staged, head, csv_limit)
        return found


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations")
    svc.publishes(FileValidated, FileRejected)

    @svc.on(ProjectUpdated)
    async def on_project_updated(event: CloudEvent[ProjectUpdated], tx: Tx) -> None:
        p = event.data
        rules = ProjectRules.of(p.project, p.settings, p.updated_at)
        row = {"project": p.project, "rules": rules.model_dump(mode="json"),
               "updated_at": p.updated_at}
        insert = pg_insert(ProjectRulesRow).values(**row)
        await tx.session.execute(insert.on_conflict_do_update(
            index_elements=["project"], set_={"rules": insert.excluded.rules,
                                              "updated_at": insert.excluded.updated_at},
            where=col(ProjectRulesRow.updated_at) < insert.excluded.updated_at))

    async def rules_of(tx: Tx, projects: set[str]) -> dict[str, ProjectRules]:
        """The copies kept from project.updated of these projects' rules."""
        rows = (await tx.session.exec(select(ProjectRulesRow).where(
            col(ProjectRulesRow.project).in_(projects)))).all() if projects else []
        return {r.project: ProjectRules.model_validate(r.rules) for r in rows}

    def rules_for(staged: FileStaged, found: Identified, kept: dict[str, ProjectRules]
                  ) -> ProjectRules | None:
        """The newest of the rules the file came with and the copy kept from project.updated;
        a file with no project of its upload's goes by the project its DICOM names."""
        project = staged.project or found.hints.project
        if not project:
            return None
        return newest(staged.rules if staged.rules and staged.rules.project == project
                      else None, kept.get(project))

    async def duplicates_of(tx: Tx, files: list[FileKeys]) -> dict[str, Claim]:
        """Which files are duplicates of a file before them in their upload (one select and
        one insert for the whole batch); the others' keys are recorded as theirs."""
        if not files:
            return {}
        wanted = [(f.upload_id, key) for f in files for key in f.keys]
        rows = (await tx.session.exec(select(SeenFile).where(
            tuple_(col(SeenFile.upload_id), col(SeenFile.key)).in_(wanted)))).all()
        known = {(r.upload_id, r.key): Claim(r.file_id, r.path, r.key) for r in rows}
        duplicates, new = first_claims(files, known)
        if new:
            inserted = await tx.session.execute(
                pg_insert(SeenFile).on_conflict_do_nothing().returning(col(SeenFile.key)),
                [{"upload_id": upload_id, "key": key, "file_id": c.file_id, "path": c.path}
                 for (upload_id, key), c in new.items()])
            if len(inserted.all()) < len(new):
                # Another consumer of the same upload (a rebalance) claimed a key meanwhile:
                # the batch is retried, and then finds its claim.
                raise RuntimeError("a key was claimed concurrently; the batch is retried")
        return duplicates

    def identify_file(store: ObjectStore, staged: FileStaged) -> Identified:
        if staged.fileset is not None:
            return fileset(staged.path, staged.size, staged.fileset)
        return read_headers(store, staged, settings.max_header_bytes, settings.max_csv_bytes)

    @svc.on(FileStaged, whole_batch=True)
    async def on_files_staged(events: list[CloudEvent[FileStaged]], tx: Tx) -> None:
        # Inside the batch's transaction, after the inbox: a replayed event is dropped before
        # the store is touched. Only headers are read, so the transaction stays short; the
        # batch is shared among a few threads on S3 (each read waits on the network), read
        # by one on a local store (there threads would only take turns at the GIL).
        store = svc.store
        assert store is not None
        identified = await each_side_by_side(
            store, functools.partial(identify_file, store), [e.data for e in events],
            settings.header_readers)
        kept = await rules_of(tx, {p for e, found in zip(events, identified)
                                   if (p := e.data.project or found.hints.project)})
        reasons: list[Reason | None] = []
        for event, found in zip(events, identified):
            reasons.append(found.reason or check_rules(
                found.kind, found.metadata, rules_for(event.data, found, kept)))
        duplicates = await duplicates_of(tx, [
            FileKeys(e.data.upload_id, e.data.file_id, e.data.path,
                     (f"sha256:{e.data.sha256}",) + ((f"sop:{found.hints.sop_instance_uid}",)
                                                     if found.hints.sop_instance_uid else ()))
            for e, found, reason in zip(events, identified, reasons) if reason is None])
        for event, found, reason in zip(events, identified, reasons):
            staged = event.data
            first = duplicates.get(staged.file_id)
            if first is not None:
                reason = (Reason(code="file.duplicate", message=(
                    f"The same content as {first.path} in this upload; skipped."))
                    if first.key.startswith("sha256:") else Reason(
                    code="dicom.duplicate_instance", message=(
                        f"The same DICOM instance (SOP Instance UID "
                        f"{found.hints.sop_instance_uid}) as {first.path} in this upload; "
                        "skipped.")))
            common: dict[str, Any] = {
                "upload_id": staged.upload_id, "file_id": staged.file_id,
                "object_key": staged.object_key, "path": staged.path, "source": staged.source,
                "kind": found.kind}
            if reason:
                log.info("upload %s: %s %s: %s", staged.upload_id, staged.path,
                         "skipped" if first else "rejected", reason.message)
                tx.publish(FileRejected(**common, reason=reason,
                                        duplicate_of=first.path if first else None),
                           event_id=derived_id(event.id, "rejected"))
            else:
                tx.publish(FileValidated(
                    **common, size=staged.size, sha256=staged.sha256, metadata=found.metadata,
                    hints=found.hints, fileset=staged.fileset),
                    event_id=derived_id(event.id, "validated"))

    @svc.on(UploadCompleted)
    async def on_upload_completed(event: CloudEvent[UploadCompleted], tx: Tx) -> None:
        # What a finished upload held no longer decides anything.
        await tx.session.execute(delete(SeenFile).where(
            col(SeenFile.upload_id) == event.data.upload_id))

    return svc


def build_app(settings: Settings) -> FastAPI:
    return create_app(bootstrap(settings))
