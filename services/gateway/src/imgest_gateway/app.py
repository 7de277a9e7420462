"""The gateway: streams uploads into the object store and keeps the status users read."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from imgest_contracts import (
    ArchiveRejected,
    ArchiveUnpacked,
    CloudEvent,
    FileRejected,
    FileStaged,
    FileValidated,
    ImportOptions,
    ObjectStored,
    Reason,
    UploadCompleted,
    Uploader,
    UploadSubmitted,
    topic_of,
)
from imgest_runtime.service import (
    Periodic,
    Service,
    Tx,
    create_app,
    problem,
    problem_responses,
)
from imgest_runtime.store import StoreError, put_async
from sqlalchemy import func, or_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .domain import UNFINISHED, BadFilename, advances, safe_filename, upload_state
from .models import Upload, UploadFile, UploadObject, metadata
from .settings import Settings

NAME = "gateway"
log = logging.getLogger("imgest.gateway")


class TooLarge(Exception):
    pass


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations")
    register_handlers(svc)
    # Not at the very start: the status must first catch up with events sent while it was down.
    svc.periodic.append(Periodic("redrive", max(1.0, settings.redrive_idle_seconds / 3),
                                 lambda: redrive(svc, settings), at_start=False))
    svc.publishes(ObjectStored, UploadSubmitted)
    return svc


# --- status kept up to date from the pipeline's events ------------------------------------------


async def _track_file(session: AsyncSession, *, upload_id: str, file_id: str, state: str,
                      object_key: str = "", path: str = "", kind: str | None = None,
                      reason: dict | None = None, session_uri: str | None = None,
                      staged: dict | None = None) -> None:
    """Merges what one event says about a file; events of different topics come in any order,
    so the state only moves forward and missing details are filled in whenever they arrive."""
    row = await session.get(UploadFile, file_id, with_for_update=True)
    now = datetime.now(UTC)
    if row is None:
        session.add(UploadFile(file_id=file_id, upload_id=upload_id, object_key=object_key,
                               path=path, kind=kind, state=state, reason=reason,
                               session=session_uri, staged=staged, updated_at=now))
        return
    if advances(row.state, state):
        row.state = state
    row.object_key = row.object_key or object_key
    row.path = row.path or path
    row.kind = row.kind or kind
    row.reason = row.reason or (reason if advances(row.state, state) else None)
    row.session = row.session or session_uri
    row.staged = row.staged or staged
    row.updated_at = now
    session.add(row)


def register_handlers(svc: Service) -> None:

    @svc.on(FileStaged)
    async def on_file_staged(event: CloudEvent[FileStaged], tx: Tx) -> None:
        f = event.data
        await _track_file(tx.session, upload_id=f.upload_id, file_id=f.file_id,
                          object_key=f.object_key, path=f.path, state="staged",
                          staged=event.model_dump(mode="json", exclude_none=True))

    @svc.on(FileValidated)
    async def on_file_validated(event: CloudEvent[FileValidated], tx: Tx) -> None:
        f = event.data
        await _track_file(tx.session, upload_id=f.upload_id, file_id=f.file_id,
                          object_key=f.object_key, path=f.path, state="validated",
                          kind=f.kind.value)

    @svc.on(FileRejected)
    async def on_file_rejected(event: CloudEvent[FileRejected], tx: Tx) -> None:
        f = event.data
        await _track_file(tx.session, upload_id=f.upload_id, file_id=f.file_id,
                          object_key=f.object_key, path=f.path, state="rejected",
                          kind=f.kind.value, reason=f.reason.model_dump())

    async def _object_state(tx: Tx, object_key: str, state: str, reason: dict | None) -> None:
        row = await tx.session.get(UploadObject, object_key, with_for_update=True)
        if row is not None:
            row.state, row.reason = state, reason
            tx.session.add(row)

    @svc.on(ArchiveUnpacked)
    async def on_archive_unpacked(event: CloudEvent[ArchiveUnpacked], tx: Tx) -> None:
        await _object_state(tx, event.data.object_key, "unpacked", None)

    @svc.on(ArchiveRejected)
    async def on_archive_rejected(event: CloudEvent[ArchiveRejected], tx: Tx) -> None:
        await _object_state(tx, event.data.object_key, "rejected",
                            event.data.reason.model_dump())

    # Dead letters: the file did not get through; say so in the status, with the reason.
    @svc.on(ObjectStored, dead_letters=True)
    async def on_object_dead(event: CloudEvent[ObjectStored], tx: Tx, reason: Reason) -> None:
        await _object_state(tx, event.data.object_key, "failed", reason.model_dump())

    @svc.on(FileStaged, dead_letters=True)
    async def on_file_dead(event: CloudEvent[FileStaged], tx: Tx, reason: Reason) -> None:
        f = event.data
        await _track_file(tx.session, upload_id=f.upload_id, file_id=f.file_id,
                          object_key=f.object_key, path=f.path, state="failed",
                          kind="unknown", reason=reason.model_dump())

    @svc.on(UploadCompleted)
    async def on_upload_completed(event: CloudEvent[UploadCompleted], tx: Tx) -> None:
        done = event.data
        session = tx.session
        for outcome in done.sessions:
            state = {"archived": "archived", "prearchived": "prearchived"}.get(
                outcome.state, "failed")
            for file_id in outcome.file_ids:
                await _track_file(session, upload_id=done.upload_id, file_id=file_id,
                                  state=state, session_uri=outcome.uri)
        for failure in done.failures:
            if failure.file_id:
                await _track_file(session, upload_id=done.upload_id, file_id=failure.file_id,
                                  state="rejected", path=failure.path,
                                  reason=failure.reason.model_dump())
        upload = await session.get(Upload, done.upload_id, with_for_update=True)
        if upload is not None:
            upload.state = upload_state(done.counts)
            upload.completed_at = done.completed_at
            upload.summary = done.model_dump(mode="json", include={
                "outcome", "counts", "sessions", "failures"})
            session.add(upload)


# --- re-drive ------------------------------------------------------------------------------------


async def redrive(svc: Service, settings: Settings) -> None:
    """Uploads with no progress for `redrive_idle_seconds` have their unfinished work sent again:
    the upload's own events (object.stored, upload.submitted) and the file.staged event of each
    file not yet placed, each under its original id. A stage that did the work drops it (its
    inbox); a stage that never got it (an event lost, an offset skipped) does it now."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.redrive_idle_seconds)
    last_change = func.coalesce(func.max(UploadFile.updated_at), Upload.created_at)
    async with svc.db.session() as session:
        stuck = (await session.exec(
            select(Upload.id).join(UploadFile, col(UploadFile.upload_id) == Upload.id,
                                   isouter=True)
            .where(Upload.state == "processing", col(Upload.created_at) < cutoff,
                   col(Upload.redrives) < settings.redrive_max,
                   or_(col(Upload.redriven_at).is_(None), col(Upload.redriven_at) < cutoff))
            .group_by(Upload.id).having(last_change < cutoff))).all()
    for upload_id in stuck:
        async with svc.db.session() as session:
            upload = await session.get(Upload, upload_id, with_for_update=True)
            if upload is None or upload.state != "processing":
                continue
            upload.redrives += 1
            upload.redriven_at = now
            session.add(upload)
            files = (await session.exec(select(UploadFile).where(
                UploadFile.upload_id == upload_id, col(UploadFile.state).in_(UNFINISHED),
                col(UploadFile.staged).is_not(None)))).all()
            for f in files:
                await svc.outbox.resend(session, topic_of(FileStaged), upload_id, f.staged)
            own = await svc.outbox.resend_key(session, upload_id)
        log.warning("upload %s: no progress for %.0fs; sending again its %d event(s) and %d "
                    "unfinished file(s) (re-drive %d of at most %d)", upload_id,
                    settings.redrive_idle_seconds, own, len(files), upload.redrives,
                    settings.redrive_max)


# --- HTTP API ------------------------------------------------------------------------------------


def upload_view(upload: Upload, objects: list[UploadObject], files: list[UploadFile]
                ) -> dict[str, Any]:
    summary = upload.summary or {}
    by_state: dict[str, int] = {}
    for f in files:
        by_state[f.state] = by_state.get(f.state, 0) + 1
    return {
        "id": upload.id,
        "state": upload.state,
        "project": upload.project,
        "uploader": upload.uploader,
        "options": upload.options,
        "created_at": upload.created_at,
        "completed_at": upload.completed_at,
        "outcome": summary.get("outcome"),
        "counts": summary.get("counts") or {"files": len(files), **by_state},
        "sessions": summary.get("sessions", []),
        "objects": [{"object_key": o.object_key, "filename": o.filename, "size": o.size,
                     "sha256": o.sha256, "state": o.state, "reason": o.reason} for o in objects],
        "files": [{"file_id": f.file_id, "path": f.path, "kind": f.kind, "state": f.state,
                   "reason": f.reason, "session": f.session} for f in files],
    }


Project = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                      description="Project to import into (its ID).")]
Label = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                    description="Subject or session label (XNAT's characters).")]


def build_app(settings: Settings) -> FastAPI:
    svc = bootstrap(settings)
    app = create_app(svc, description="Uploads into imgest, and what became of them.")
    api = APIRouter(prefix="/api/v1", tags=["uploads"],
                    responses=problem_responses(400, 404, 413, 422, 503))
    public_url = settings.public_url.rstrip("/")

    async def receive(request: Request, filename: str, options: ImportOptions) -> JSONResponse:
        try:
            name = safe_filename(filename)
        except BadFilename as e:
            return problem(400, "Bad file name", str(e))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_upload_bytes):
            return problem(413, "Content Too Large",
                           f"An upload may be at most {settings.max_upload_bytes} bytes.")
        upload_id = uuid.uuid4().hex
        key = f"staging/{upload_id}/{name}"
        limit = settings.max_upload_bytes

        async def body():
            """The request body as it streams in, refused once past the limit (a chunked
            request announces no length to check up front)."""
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise TooLarge()
                yield chunk

        try:
            stored = await put_async(svc.store, key, body(),  # type: ignore[arg-type]
                                     int(length) if length else None)
        except TooLarge:
            return problem(413, "Content Too Large", f"An upload may be at most {limit} bytes.")
        except StoreError as e:
            return problem(503, "Store unavailable", f"The file could not be stored: {e}")
        if stored.size == 0:
            await asyncio.to_thread(svc.store.delete, key)
            return problem(400, "Empty upload", "The request body was empty; nothing to import.")
        uploader = Uploader(username=settings.admin_user, email=settings.admin_email)
        now = datetime.now(UTC)
        async with svc.db.session() as session:
            upload = Upload(id=upload_id, state="processing", project=options.project,
                            uploader=uploader.username, email=uploader.email,
                            options=options.model_dump(mode="json", exclude_defaults=True),
                            created_at=now)
            obj = UploadObject(object_key=key, upload_id=upload_id, filename=name,
                               size=stored.size, sha256=stored.sha256, state="stored")
            session.add(upload)
            session.add(obj)
            await svc.outbox.add(session, ObjectStored(
                upload_id=upload_id, project=options.project, object_key=key, filename=name,
                size=stored.size, sha256=stored.sha256,
                content_type=request.headers.get("content-type")))
            await svc.outbox.add(session, UploadSubmitted(
                upload_id=upload_id, uploader=uploader, options=options, object_keys=[key],
                submitted_at=now))
        location = f"/api/v1/uploads/{upload_id}"
        body = upload_view(upload, [obj], [])
        body["status_url"] = public_url + location
        return JSONResponse(jsonable(body), status_code=201, headers={"Location": location})

    @api.post("/uploads", status_code=201, summary="Upload one file (raw request body)",
              responses={201: {"description": "Stored; processing has begun."}})
    async def post_upload(request: Request, filename: Annotated[str, Query(max_length=1024)],
                          project: Project = None, subject: Label = None,
                          session: Label = None) -> JSONResponse:
        options = ImportOptions(project=project, subject=subject, session=session)
        return await receive(request, filename, options)

    @api.put("/uploads/{filename}", status_code=201,
             summary="Upload one file by name (what `curl -T file URL/` sends)")
    async def put_upload(request: Request, filename: str, project: Project = None,
                         subject: Label = None, session: Label = None) -> JSONResponse:
        options = ImportOptions(project=project, subject=subject, session=session)
        return await receive(request, filename, options)

    @api.get("/uploads/{upload_id}", summary="An upload's state, file by file")
    async def get_upload(upload_id: str) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await session.get(Upload, upload_id)
            if upload is None:
                return problem(404, "Not Found", f"No upload {upload_id!r}.")
            objects = (await session.exec(select(UploadObject).where(
                UploadObject.upload_id == upload_id))).all()
            files = (await session.exec(select(UploadFile).where(
                UploadFile.upload_id == upload_id).order_by(col(UploadFile.path)))).all()
        return JSONResponse(jsonable(upload_view(upload, list(objects), list(files))))

    @api.get("/uploads", summary="Recent uploads, newest first")
    async def list_uploads(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JSONResponse:
        async with svc.db.session() as session:
            rows = (await session.exec(select(Upload).order_by(
                col(Upload.created_at).desc()).limit(limit))).all()
        return JSONResponse(jsonable([{"id": u.id, "state": u.state, "project": u.project,
                                       "created_at": u.created_at,
                                       "completed_at": u.completed_at} for u in rows]))

    app.include_router(api)
    return app


def jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)
