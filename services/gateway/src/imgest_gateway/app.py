"""The gateway: streams uploads into the object store and keeps the status users read."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from imgest_contracts import (
    ArchiveProgress,
    ArchiveRejected,
    ArchiveUnpacked,
    CloudEvent,
    FileRejected,
    FileStaged,
    FileValidated,
    ImportOptions,
    ObjectStored,
    PrearchiveAnswered,
    PrearchiveRequested,
    ProjectUpdated,
    Reason,
    ReleaseRequested,
    SessionArchived,
    SessionConflicted,
    SessionPrearchived,
    SessionReleased,
    UploadCancelled,
    UploadCompleted,
    UploadSubmitted,
    topic_of,
)
from imgest_runtime.db import any_of
from imgest_runtime.service import (
    Periodic,
    Service,
    Tx,
    create_app,
    problem,
    problem_responses,
)
from sqlalchemy import and_, case, func, literal_column, or_, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .archive_api import archive_router
from .auth import CallerDep, Callers, ensure_first_admin, forbidden, sweep_login_sessions
from .catalogue_api import catalogue_router
from .domain import FILE_STATE_RANK, UNPLACED, BadFilename, safe_filename, upload_state
from .identity import Action, Caller, hash_password
from .identity_api import identity_router
from .models import (
    ArchivedSession,
    ArchiveRequest,
    PrearchiveEntry,
    Project,
    Upload,
    UploadFile,
    UploadObject,
    metadata,
)
from .settings import Settings
from .tus_api import TusProtocol, tus_router
from .uploads_api import Refused, submit_one_file, uploads_router
from .views import SHOWN, TOPIC_OF_TYPE, event_json, json_response, upload_status, upload_view
from .waiting import Waiters, announce
from .xnat_api import XnatIds, plain_http_errors, xnat_router

NAME = "gateway"
log = logging.getLogger("imgest.gateway")
# A file being written is touched by every write: one untouched this long lost its writer.
STALE_TEMPORARY_SECONDS = 6 * 3600


async def sweep_temporaries(svc: Service) -> None:
    """The files writers killed mid-write were writing (in any folder of the store) go."""
    assert svc.store is not None
    removed = await asyncio.to_thread(svc.store.remove_stale_temporaries,
                                      STALE_TEMPORARY_SECONDS)
    if removed:
        log.info("store: removed %d temporary file(s) of writers killed mid-write", removed)


def bootstrap(settings: Settings, waiters: Waiters | None = None) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations",
                  uses_statements=True)
    register_handlers(svc)
    following = waiters or Waiters()
    svc.background.append(lambda: following.follow(svc.db))  # news from every worker
    # Not at the very start: the status must first catch up with events sent while it was down.
    svc.periodic.append(Periodic("redrive", max(1.0, settings.redrive_idle_seconds / 3),
                                 lambda: redrive(svc, settings), at_start=False))
    svc.periodic.append(Periodic("login-sessions", 3600, lambda: sweep_login_sessions(svc.db)))
    # (Not at start: it walks the whole store, and only what is hours old goes.)
    svc.periodic.append(Periodic("store-temporaries", 3600, lambda: sweep_temporaries(svc),
                                 at_start=False))
    svc.publishes(ObjectStored, UploadSubmitted, UploadCancelled, ProjectUpdated,
                  PrearchiveRequested, ReleaseRequested)
    svc.startup.append(lambda: ensure_first_admin(
        svc.db, settings.admin_user, settings.admin_email, settings.admin_token_file,
        token=settings.admin_token.get_secret_value() if settings.admin_token else None,
        password_hash=(hash_password(settings.admin_password.get_secret_value())
                       if settings.admin_password else None)))
    return svc


# --- status kept up to date from the pipeline's events ------------------------------------------


@dataclass
class FileNote:
    """What one event says about a file."""

    upload_id: str
    file_id: str
    state: str
    event: CloudEvent | None = None
    object_key: str = ""
    path: str = ""
    kind: str | None = None
    reason: dict | None = None
    session_uri: str | None = None
    sha256: str | None = None
    source_key: str | None = None


def _rank(state: Any) -> Any:
    """domain.FILE_STATE_RANK in SQL, written into the statement (our own words: no binds)."""
    return case(*[(state == literal_column(f"'{name}'"), literal_column(str(rank)))
                  for name, rank in FILE_STATE_RANK.items()], else_=literal_column("0"))


def _either(kept: Any, told: Any) -> Any:
    """What the row has, else what the event says ('' and JSON null count as nothing)."""
    nothing = literal_column("'null'::jsonb" if isinstance(kept.type, JSONB) else "''")
    return func.coalesce(func.nullif(kept, nothing), told)


_FILE = UploadFile.__table__  # type: ignore[attr-defined]
_TOLD = pg_insert(_FILE).excluded
_ADVANCES = _rank(_TOLD.state) >= _rank(_FILE.c.state)  # domain.advances, in SQL
# One statement per event, sent as one batch: a file unknown here is inserted; a known one
# moves forward only (events of different topics come in any order), its missing details
# filled in whenever they arrive, and the event that moved it kept (a re-drive sends it again).
_TRACK = pg_insert(_FILE).on_conflict_do_update(index_elements=[_FILE.c.file_id], set_={
    "state": case((_ADVANCES, _TOLD.state), else_=_FILE.c.state),
    "event": case((and_(_ADVANCES, _TOLD.event.is_not(None)), _TOLD.event),
                  else_=_FILE.c.event),
    # A late failure does not mark an archived file.
    "reason": case((_ADVANCES, _either(_FILE.c.reason, _TOLD.reason)), else_=_FILE.c.reason),
    **{name: _either(_FILE.c[name], _TOLD[name])
       for name in ("object_key", "path", "kind", "sha256", "session", "source_key")},
    "updated_at": _TOLD.updated_at})


async def _track_files(session: AsyncSession, notes: list[FileNote]) -> None:
    """Merges what events say about files, in one batch of upserts (in file order, so two
    transactions lock shared rows in the same order; in event order for one file)."""
    if not notes:
        return
    now = datetime.now(UTC)
    await session.execute(_TRACK, [{
        "file_id": n.file_id, "upload_id": n.upload_id, "object_key": n.object_key,
        "path": n.path, "kind": n.kind, "state": n.state, "reason": n.reason,
        "session": n.session_uri, "event": n.event and event_json(n.event),
        "sha256": n.sha256, "source_key": n.source_key, "updated_at": now}
        for n in sorted(notes, key=lambda n: n.file_id)])  # (stable: one file's in order)


def register_handlers(svc: Service) -> None:

    @svc.on(FileStaged, whole_batch=True)
    async def on_files_staged(events: list[CloudEvent[FileStaged]], tx: Tx) -> None:
        await _track_files(tx.session, [FileNote(
            f.upload_id, f.file_id, "staged", event, f.object_key, f.path, sha256=f.sha256,
            source_key=f.source.object_key) for event in events for f in [event.data]])
        # An object that is not an archive went on itself, as one file.
        singles = {e.data.source.object_key for e in events if e.data.source.member is None}
        if singles:
            for row in (await tx.session.exec(select(UploadObject).where(
                    any_of(col(UploadObject.object_key), singles))
                    .order_by(col(UploadObject.object_key)).with_for_update())).all():
                if row.state == "stored":
                    row.state = "staged"
                    tx.session.add(row)

    @svc.on(FileValidated, whole_batch=True)
    async def on_files_validated(events: list[CloudEvent[FileValidated]], tx: Tx) -> None:
        await _track_files(tx.session, [FileNote(
            f.upload_id, f.file_id, "validated", event, f.object_key, f.path, f.kind.value,
            sha256=f.sha256, source_key=f.source.object_key)
            for event in events for f in [event.data]])

    @svc.on(FileRejected, whole_batch=True)
    async def on_files_rejected(events: list[CloudEvent[FileRejected]], tx: Tx) -> None:
        await _track_files(tx.session, [FileNote(
            f.upload_id, f.file_id, "duplicate" if f.duplicate_of else "rejected", event,
            f.object_key, f.path, f.kind.value, f.reason.model_dump(),
            source_key=f.source.object_key) for event in events for f in [event.data]])

    async def _object_state(tx: Tx, event: CloudEvent, state: str, reason: dict | None,
                            keep_event: bool = True) -> None:
        row = await tx.session.get(UploadObject, event.data.object_key, with_for_update=True)
        if row is not None:
            row.state, row.reason = state, reason
            if isinstance(event.data, ArchiveUnpacked):
                row.progress = {"members_done": event.data.members_staged,
                                "members_total": event.data.members_staged,
                                "bytes_done": event.data.bytes_unpacked}
            row.event = event_json(event) if keep_event else None
            tx.session.add(row)

    @svc.on(ArchiveProgress)
    async def on_archive_progress(event: CloudEvent[ArchiveProgress], tx: Tx) -> None:
        p = event.data
        row = await tx.session.get(UploadObject, p.object_key, with_for_update=True)
        if row is not None and row.state == "stored":  # (a late one changes nothing after)
            row.progress = p.model_dump(include={"members_done", "members_total",
                                                 "bytes_done"})
            tx.session.add(row)

    @svc.on(ArchiveUnpacked)
    async def on_archive_unpacked(event: CloudEvent[ArchiveUnpacked], tx: Tx) -> None:
        await _object_state(tx, event, "unpacked", None)

    @svc.on(ArchiveRejected)
    async def on_archive_rejected(event: CloudEvent[ArchiveRejected], tx: Tx) -> None:
        await _object_state(tx, event, "rejected", event.data.reason.model_dump())

    # Dead letters: the file did not get through; say so in the status, with the reason.
    @svc.on(ObjectStored, dead_letters_of="unpacker")
    async def on_object_dead(event: CloudEvent[ObjectStored], tx: Tx, reason: Reason) -> None:
        # A dead letter is never sent again by a re-drive: that is the operator's replay.
        await _object_state(tx, event, "failed", reason.model_dump(), keep_event=False)

    @svc.on(FileStaged, dead_letters_of="metadata")
    async def on_file_dead(event: CloudEvent[FileStaged], tx: Tx, reason: Reason) -> None:
        f = event.data
        await _track_files(tx.session, [FileNote(
            f.upload_id, f.file_id, "failed", None, f.object_key, f.path, "unknown",
            reason.model_dump(), source_key=f.source.object_key)])

    # The prearchive as the importer tells it: entries, their states, the answers to commands.
    @svc.on(SessionPrearchived)
    async def on_session_prearchived(event: CloudEvent[SessionPrearchived], tx: Tx) -> None:
        p = event.data
        row = await tx.session.get(PrearchiveEntry, p.session_key, with_for_update=True)
        if row is None and p.state in ("BUILDING", "ARCHIVING"):
            return  # work on an entry this view no longer has (archived meanwhile)
        if row is None:
            row = PrearchiveEntry(session_key=p.session_key, project=p.session.project,
                                  timestamp=p.timestamp, label=p.session.session,
                                  subject=p.session.subject, uri=p.session.uri, state=p.state,
                                  updated_at=event.time)
        row.uploads = sorted(set(row.uploads or []) | set(p.upload_ids))
        if event.time >= row.updated_at:  # (an older state, redelivered, changes nothing)
            row.state, row.files = p.state, p.files
            row.reason = p.reason.model_dump() if p.reason else None
            row.updated_at = event.time
        tx.session.add(row)
        for upload_id in p.upload_ids:  # an XNAT import may be waiting to see its entry
            tx.before_commit(("news", upload_id), lambda u=upload_id: announce(tx.session, u))

    # The archive's sessions, and their quarantine.
    @svc.on(SessionArchived)
    async def on_session_archived(event: CloudEvent[SessionArchived], tx: Tx) -> None:
        a = event.data
        if a.entry_key:  # archived from the prearchive: the entry is gone
            await _entry_gone(tx, a.entry_key, archived_as=a.session.uri)
        row = await tx.session.get(ArchivedSession, a.session_key, with_for_update=True)
        if row is None:
            row = ArchivedSession(session_key=a.session_key, project=a.session.project,
                                  subject=a.session.subject, label=a.session.session,
                                  uri=a.session.uri, archived_at=a.archived_at,
                                  updated_at=event.time)
        elif event.time < row.updated_at:
            return  # an older fact than the one kept (a release may have come since)
        row.study_uid, row.modalities = a.study_uid, a.modalities
        row.quarantined, row.updated_at = a.quarantined, event.time
        tx.session.add(row)

    @svc.on(SessionReleased)
    async def on_session_released(event: CloudEvent[SessionReleased], tx: Tx) -> None:
        row = await tx.session.get(ArchivedSession, event.data.session_key, with_for_update=True)
        if row is not None and event.time >= row.updated_at:
            row.quarantined, row.updated_at = False, event.time
            tx.session.add(row)

    @svc.on(SessionConflicted)
    async def on_session_conflicted(event: CloudEvent[SessionConflicted], tx: Tx) -> None:
        row = await tx.session.get(PrearchiveEntry, event.data.session_key, with_for_update=True)
        if row is not None:
            row.state, row.reason = "CONFLICT", event.data.reason.model_dump()
            tx.session.add(row)

    @svc.on(PrearchiveAnswered)
    async def on_prearchive_answered(event: CloudEvent[PrearchiveAnswered], tx: Tx) -> None:
        done = event.data
        row = await tx.session.get(ArchiveRequest, done.request_id, with_for_update=True)
        if row is not None and row.state == "pending":
            row.state, row.uri = done.state, done.uri
            row.reason = done.reason.model_dump() if done.reason else None
            row.updated_at = datetime.now(UTC)
            tx.session.add(row)
        if done.state in ("archived", "moved", "deleted"):
            await _entry_gone(tx, done.session_key,
                              archived_as=done.uri if done.state == "archived" else None)

    @svc.on(UploadCompleted)
    async def on_upload_completed(event: CloudEvent[UploadCompleted], tx: Tx) -> None:
        done = event.data
        session = tx.session
        notes = []
        for outcome in done.sessions:
            # A conflict waits in the prearchive (with its reason) until someone archives it.
            state = {"archived": "archived", "prearchived": "prearchived",
                     "receiving": "prearchived", "conflict": "prearchived"}.get(
                outcome.state, "failed")
            reason = outcome.reason.model_dump() if outcome.reason else None
            notes += [FileNote(done.upload_id, file_id, state, reason=reason,
                               session_uri=outcome.uri) for file_id in outcome.file_ids]
        notes += [FileNote(done.upload_id, failure.file_id, state, path=failure.path,
                           reason=failure.reason.model_dump())
                  for failure, state in [(f, "rejected") for f in done.failures]
                  + [(f, "duplicate") for f in done.skipped] if failure.file_id]
        await _track_files(session, notes)
        if done.outcome == "cancelled":  # what had not reached an outcome never will
            await session.execute(update(UploadFile).where(
                col(UploadFile.upload_id) == done.upload_id,
                col(UploadFile.state).in_(["staged", "validated"])).values(
                state="cancelled", reason={"code": "upload.cancelled", "message": (
                    "The upload was cancelled before this file was placed.")}))
        await _upload_finished(tx, done)

    @svc.on(UploadCompleted, dead_letters_of="gateway")
    async def on_upload_completed_dead(event: CloudEvent[UploadCompleted], tx: Tx,
                                       reason: Reason) -> None:
        """Its files' outcomes could not be recorded (a fault of ours): the upload still ends,
        so that its status and a waiting XNAT import do not wait for ever."""
        log.error("upload %s: completed, but its files' outcomes could not be recorded (%s); "
                  "their states stay as they were", event.data.upload_id, reason.message)
        await _upload_finished(tx, event.data)


async def _upload_finished(tx: Tx, done: UploadCompleted) -> None:
    """The upload's own row: its outcome, as its status and a waiting XNAT import read it."""
    upload = await tx.session.get(Upload, done.upload_id, with_for_update=True)
    if upload is None:
        return
    tx.before_commit(("news", done.upload_id), lambda: announce(tx.session, done.upload_id))
    upload.state = "cancelled" if done.outcome == "cancelled" else upload_state(done.counts)
    upload.completed_at = done.completed_at
    upload.summary = done.model_dump(mode="json", include={
        "outcome", "counts", "sessions", "failures", "failures_omitted"})
    tx.session.add(upload)


async def _entry_gone(tx: Tx, session_key: str, archived_as: str | None) -> None:
    """A prearchive entry left (told by the answer or by session.archived, whichever comes
    first). Archived: its files are in the archive now, as the status says and the check for
    known content counts them; deleted or moved: they are no longer in it."""
    entry = await tx.session.get(PrearchiveEntry, session_key, with_for_update=True)
    if entry is None:
        return
    if archived_as is not None:
        await tx.session.execute(update(UploadFile).where(
            col(UploadFile.session) == entry.uri, col(UploadFile.state) == "prearchived")
            .values(state="archived", session=archived_as))
    await tx.session.delete(entry)


# --- re-drive ------------------------------------------------------------------------------------


async def redrive(svc: Service, settings: Settings) -> None:
    """Uploads with no progress for `redrive_idle_seconds` have their unfinished work sent again:
    the last event each object and each unplaced file got (object.stored, archive.unpacked or
    .rejected; file.staged, .validated or .rejected) and the upload's upload.submitted, each
    under its original id. A stage that already handled one drops it (its inbox); a stage that
    never saw it (an event lost, an offset skipped) does its work now. Dead letters are not sent
    again: replaying them is the operator's call (`imgest dlq replay`)."""
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.redrive_idle_seconds)
    async with svc.db.session() as session:
        stuck = (await session.exec(
            select(Upload.id).join(UploadFile, col(UploadFile.upload_id) == Upload.id,
                                   isouter=True)
            .where(col(Upload.state).in_(["processing", "cancelling"]),
                   col(Upload.created_at) < cutoff,
                   col(Upload.redrives) < settings.redrive_max,
                   or_(col(Upload.redriven_at).is_(None), col(Upload.redriven_at) < cutoff))
            .group_by(Upload.id)
            .having(func.coalesce(func.max(UploadFile.updated_at), Upload.created_at) < cutoff)
        )).all()
    for upload_id in stuck:
        try:
            await _redrive_upload(svc, settings, upload_id, cutoff)
        except Exception:  # one upload's trouble does not stop the others'
            log.exception("upload %s: re-drive failed; trying again on the next pass", upload_id)


async def _redrive_upload(svc: Service, settings: Settings, upload_id: str,
                          cutoff: datetime) -> None:
    async with svc.db.session() as session:
        upload = await session.get(Upload, upload_id, with_for_update=True)
        # Looked at again under the lock: another gateway replica may have just done it.
        if upload is None or upload.state not in ("processing", "cancelling") or (
                upload.redriven_at is not None and upload.redriven_at >= cutoff):
            return
        upload.redrives += 1
        upload.redriven_at = datetime.now(UTC)
        session.add(upload)
        objects = (await session.exec(select(UploadObject).where(
            UploadObject.upload_id == upload_id))).all()
        files = (await session.exec(select(UploadFile).where(
            UploadFile.upload_id == upload_id, col(UploadFile.state).in_(UNPLACED), SHOWN))).all()
        events = [row.event for row in (*objects, *files) if row.event]
        for event in events:
            await svc.outbox.resend(session, TOPIC_OF_TYPE[event["type"]], upload_id, event)
        for kind, event, due in [(UploadSubmitted, upload.submission, True), (
                UploadCancelled, upload.cancellation, upload.state == "cancelling")]:
            if due and event is not None:
                await svc.outbox.resend(session, topic_of(kind), upload_id, event)
            elif due:  # (an upload handed on before its row kept the event: the outbox has it)
                await svc.outbox.resend_key(session, upload_id, topic_of(kind))
    log.warning("upload %s: no progress for %.0fs; sent again the last event of %d object(s) "
                "and file(s) and its submission (re-drive %d of at most %d)", upload_id,
                settings.redrive_idle_seconds, len(events), upload.redrives,
                settings.redrive_max)


# --- HTTP API ------------------------------------------------------------------------------------


FILENAME = ("The client's name for the file. Only its last path component is kept; control "
            "characters become `_` and a name over 255 bytes is shortened, keeping its extension.")
# The body is read as a stream (never parsed by FastAPI), so the document says what it is.
FILE_BODY = {"requestBody": {"required": True, "description": "The file's bytes, as they are.",
                             "content": {"application/octet-stream": {"schema": {
                                 "type": "string", "format": "binary", "minLength": 1}}}}}
ProjectParam = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                      description="Project to import into (its ID).")]
Label = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                    description="Subject or session label (XNAT's characters).")]


def build_app(settings: Settings) -> FastAPI:
    waiters = Waiters()
    svc = bootstrap(settings, waiters)
    app = create_app(svc, description="Uploads into imgest, and what became of them.")
    app.state.callers = callers = Callers()  # who each token is, kept while told of changes
    svc.background.append(lambda: callers.follow(svc.db))
    callers.forget_at_own_commits()
    api = APIRouter(prefix="/api/v1", tags=["uploads"],
                    responses=problem_responses(400, 401, 403, 404, 413, 422, 503))
    public_url = settings.public_url.rstrip("/")

    async def receive(request: Request, caller: Caller, filename: str, options: ImportOptions
                      ) -> JSONResponse:
        if refused := await may_upload(svc, caller, options.project):
            return refused
        try:
            name = safe_filename(filename)
        except BadFilename as e:
            return problem(400, "Bad file name", str(e))
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return problem(400, "Bad Content-Length", "Content-Length is not a number.")
        upload_id = uuid.uuid4().hex
        key = f"staging/{upload_id}/{name}"  # (named by the URL, also when a form carries it)
        upload, obj = await submit_one_file(
            svc, settings, request, upload_id, caller, options.project, options.model_dump(
                mode="json", exclude_defaults=True, exclude={"project"}), lambda _: key)
        location = f"/api/v1/uploads/{upload_id}"
        body = upload_view(upload, [obj], [])
        body["status_url"] = public_url + location
        return json_response(body, 201, Location=location)

    @api.post("/uploads", status_code=201, summary="Upload one file (raw request body)",
              responses={201: {"description": "Stored; processing has begun."}},
              openapi_extra=FILE_BODY)
    async def post_upload(request: Request, filename: Annotated[str, Query(
                              min_length=1, max_length=1024, description=FILENAME)],
                          caller: CallerDep, project: ProjectParam = None,
                          subject: Label = None, session: Label = None) -> JSONResponse:
        options = ImportOptions(project=project, subject=subject, session=session)
        return await receive(request, caller, filename, options)

    # One path, two meanings, as `curl -T file URL/` needs: PUT names a new file, GET an
    # existing upload. One template keeps the document (and Allow) true to the URL space.
    @api.put("/uploads/{upload}", status_code=201,
             summary="Upload one file by name (what `curl -T file URL/` sends)",
             openapi_extra=FILE_BODY)
    async def put_upload(request: Request,
                         upload: Annotated[str, PathParam(description=FILENAME)],
                         caller: CallerDep, project: ProjectParam = None,
                         subject: Label = None, session: Label = None) -> JSONResponse:
        options = ImportOptions(project=project, subject=subject, session=session)
        return await receive(request, caller, upload, options)

    @api.get("/uploads/{upload}", summary="An upload's state, file by file")
    async def get_upload(upload: Annotated[str, PathParam(
                             description="The upload's id (as `POST`/`PUT` returned it).")],
                         caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            row = await session.get(Upload, upload)
            if row is None:
                return problem(404, "Not Found", f"No upload {upload!r}.")
            if not caller.may_see_upload(row.uploader, row.project):
                raise forbidden(f"Upload {upload!r} is neither yours nor in a project you "
                                "may view.")
            shown = await upload_status(session, row)
        return json_response(shown)

    @api.get("/uploads", summary="Recent uploads, newest first")
    async def list_uploads(caller: CallerDep,
                           limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JSONResponse:
        query = select(Upload).order_by(col(Upload.created_at).desc()).limit(limit)
        if not caller.admin:
            viewable = [p for p in caller.roles if caller.may(Action.view, p)]
            query = query.where(or_(Upload.uploader == caller.username,
                                    col(Upload.project).in_(viewable)))
        async with svc.db.session() as session:
            rows = (await session.exec(query)).all()
        return json_response([{"id": u.id, "state": u.state, "project": u.project,
                                       "created_at": u.created_at,
                                       "completed_at": u.completed_at} for u in rows])

    app.include_router(api)
    app.include_router(identity_router(svc))
    app.include_router(uploads_router(svc, settings))
    app.include_router(tus_router(svc, settings))
    app.add_middleware(TusProtocol)
    app.include_router(xnat_router(svc, settings, waiters))
    app.add_middleware(XnatIds)
    app.include_router(archive_router(svc, settings))
    app.include_router(catalogue_router(svc, settings))
    plain_http_errors(app)

    async def refused(_request: Request, error: Exception) -> Response:
        return error.response  # type: ignore[attr-defined]  # a problem document, made at raise

    app.add_exception_handler(Refused, refused)
    return app


async def may_upload(svc: Service, caller: Caller, project: str | None) -> JSONResponse | None:
    """Why the caller may not upload into the project (a problem), or None if they may."""
    if project is None:
        if caller.admin:
            return None
        return problem(403, "Forbidden", "Name a project (?project=…): uploads without one go "
                       "to Unassigned, which only administrators use.")
    if not caller.may(Action.upload, project):
        return problem(403, "Forbidden", f"You may not upload into project {project!r} (no "
                       "role in it, or no such project).")
    async with svc.db.session() as session:
        if await session.get(Project, project) is None:
            return problem(404, "Not Found", f"No project {project!r}.")
    return None

