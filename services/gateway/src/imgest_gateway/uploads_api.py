"""Upload sessions, the flow of a slide or photo repository: create an upload for a project with
its fields, add files (one request each, or many in one multipart request), submit it, follow
it live (Server-Sent Events), cancel it while open, retry its failed files.

Files are streamed into the store as they arrive; their SHA-256 is computed on the way, so a
duplicate (the same content twice in the upload, or already archived in the project) is found
as it is added, skipped, and reported.
"""


import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from imgest_contracts import ImportOptions, ObjectStored, ProjectSettings, Uploader, UploadSubmitted
from imgest_contracts.events import FIELD_NAME
from imgest_runtime.broker import PIPELINE_FAILED
from imgest_runtime.service import Service, problem, problem_responses
from imgest_runtime.store import StoredObject, StoreError, put_async
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from sqlalchemy import func, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException

from .auth import CallerDep, forbidden
from .domain import BadFilename, safe_filename
from .identity import PROJECT_ID, Action, Caller
from .models import Project, Upload, UploadFile, UploadObject
from .settings import Settings
from .views import TOPIC_OF_TYPE, event_json, json_response, upload_view

OPEN, PROCESSING, CANCELLED = "open", "processing", "cancelled"
TERMINAL = {"archived", "prearchived", "partial", "failed", CANCELLED}
LABEL = r"^[A-Za-z0-9_-]{1,64}$"
UploadState = Literal["open", "processing", "archived", "prearchived", "partial", "failed",
                      "cancelled"]
FieldValue = Annotated[str, Field(max_length=1000, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$")]


UploadId = Annotated[str, PathParam(max_length=64, description="The upload's id.")]


class Refused(Exception):
    """A request refused with a problem document (the app's handler answers with it)."""

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.response = problem(status, title, detail)


class NewUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fields: dict[str, FieldValue] = Field(
        default_factory=dict, description="Free fields (e.g. view_name, capture_date); the "
        "project says which are required.", json_schema_extra={
            "propertyNames": {"pattern": FIELD_NAME}})
    subject: str | None = Field(None, pattern=LABEL)
    session: str | None = Field(None, pattern=LABEL)
    overwrite: Literal["none", "append", "delete"] = "none"
    quarantine: StrictBool | None = None
    auto_archive: StrictBool | None = None

    @field_validator("fields")
    @classmethod
    def _field_names(cls, fields: dict[str, str]) -> dict[str, str]:
        for name in fields:
            if not re.fullmatch(FIELD_NAME, name):
                raise ValueError(f"a field name is a letter, then letters, digits, _ . - "
                                 f"(got {name!r})")
        return fields


async def stream_to_store(svc: Service, settings: Settings, key: str,
                          chunks: AsyncIterator[bytes], length: int | None) -> StoredObject:
    """Streams chunks into the store under `key`, refusing a body past the size limit (also
    when no length was announced) and an empty one."""
    limit = settings.max_upload_bytes
    if length is not None and length > limit:
        raise Refused(413, "Content Too Large", f"A file may be at most {limit} bytes.")

    class TooLarge(Exception):
        pass

    async def limited() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise TooLarge()
            yield chunk

    try:
        stored = await put_async(svc.store, key, limited(), length)  # type: ignore[arg-type]
    except TooLarge:
        await asyncio.to_thread(svc.store.delete, key)
        raise Refused(413, "Content Too Large", f"A file may be at most {limit} bytes.") from None
    except StoreError as e:
        raise Refused(503, "Store unavailable", f"The file could not be stored: {e}") from e
    if stored.size == 0:
        await asyncio.to_thread(svc.store.delete, key)
        raise Refused(400, "Empty file", "The file was empty; nothing to import.")
    return stored


def object_stored(upload: Upload, obj: UploadObject) -> ObjectStored:
    return ObjectStored(upload_id=upload.id, project=upload.project, object_key=obj.object_key,
                        filename=obj.filename, size=obj.size, sha256=obj.sha256,
                        content_type=obj.content_type)


async def submit(svc: Service, session: AsyncSession, upload: Upload,
                 objects: list[UploadObject]) -> None:
    """Hands the upload to the pipeline: each object's object.stored, then upload.submitted
    naming them all (the importer completes the upload once every one has an outcome)."""
    for obj in objects:
        obj.event = event_json(await svc.outbox.add(session, object_stored(upload, obj)))
        session.add(obj)
    upload.state = PROCESSING
    session.add(upload)
    await svc.outbox.add(session, UploadSubmitted(
        upload_id=upload.id, uploader=Uploader(username=upload.uploader, email=upload.email),
        options=ImportOptions.model_validate({  # (the gateway keeps more, e.g. a listener id)
            "project": upload.project,
            **{k: v for k, v in upload.options.items() if k in ImportOptions.model_fields}}),
        object_keys=[o.object_key for o in objects], submitted_at=datetime.now(UTC)))


async def project_settings(session: AsyncSession, project_id: str) -> ProjectSettings:
    project = await session.get(Project, project_id)
    if project is None:
        raise Refused(404, "Not Found", f"No project {project_id!r}.")
    return ProjectSettings.model_validate(project.settings)


def uploads_router(svc: Service, settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["upload sessions"],
                    responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 503))

    async def own_upload(session: AsyncSession, caller: Caller, upload_id: str,
                         lock: bool = False) -> Upload:
        upload = await session.get(Upload, upload_id, with_for_update=lock)
        if upload is None:
            raise HTTPException(404, f"No upload {upload_id!r}.")
        if not caller.may_see_upload(upload.uploader, upload.project):
            raise forbidden(f"Upload {upload_id!r} is neither yours nor in a project you may "
                            "view.")
        return upload

    async def view(upload_id: str, status: int = 200, **extra: Any) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await session.get(Upload, upload_id)
            objects = (await session.exec(select(UploadObject).where(
                UploadObject.upload_id == upload_id))).all()
            files = (await session.exec(select(UploadFile).where(
                UploadFile.upload_id == upload_id).order_by(col(UploadFile.path)))).all()
        assert upload is not None
        return json_response({**upload_view(upload, list(objects), list(files)), **extra},
                             status, Location=f"/api/v1/uploads/{upload_id}")

    @api.post("/projects/{project_id}/uploads", status_code=201,
              summary="Create an upload session for a project (then add files, then submit)",
              responses={201: {"description": "The upload, open for files.", "links": {
                  op: {"operationId": op, "parameters": {"upload_id": "$response.body#/id"}}
                  for op in ("add_files", "submit_upload", "cancel_upload", "retry_upload",
                             "upload_events")}}})
    async def create_upload(project_id: Annotated[str, PathParam(pattern=PROJECT_ID)],
                            body: NewUpload, caller: CallerDep) -> JSONResponse:
        if not caller.may(Action.upload, project_id):
            raise forbidden(f"You may not upload into project {project_id!r} (no role in it, "
                            "or no such project).")
        async with svc.db.session() as session:
            rules = await project_settings(session, project_id)
            missing = [f for f in rules.required_fields if not body.fields.get(f)]
            if missing:
                return problem(422, "Missing required field", (
                    f"Project {project_id!r} requires the field(s) {', '.join(missing)}."),
                    errors=[{"loc": ["body", "fields", f], "msg": "Field required"}
                            for f in missing])
            options = ImportOptions(project=project_id, **body.model_dump(
                exclude_defaults=True))
            upload = Upload(id=uuid.uuid4().hex, state=OPEN, project=project_id,
                            uploader=caller.username, email=caller.email,
                            options=options.model_dump(mode="json", exclude_defaults=True,
                                                       exclude={"project"}),
                            created_at=datetime.now(UTC))
            session.add(upload)
        return await view(upload.id, 201)

    async def add_one(upload: Upload, rules: ProjectSettings, name: str,
                      chunks: AsyncIterator[bytes], length: int | None,
                      content_type: str | None) -> dict[str, Any]:
        """Stores one file of an open upload; a duplicate is stored no longer than it takes to
        know its hash, and reported."""
        try:
            safe = safe_filename(name)
        except BadFilename as e:
            raise Refused(400, "Bad file name", str(e)) from e
        key = f"staging/{upload.id}/{uuid.uuid4().hex[:12]}/{safe}"
        stored = await stream_to_store(svc, settings, key, chunks, length)
        return await record_object(svc, upload, rules, key, safe, stored, content_type)

    @api.post("/uploads/{upload_id}/files", status_code=201, operation_id="add_files",
              summary="Add files to an open upload: the raw body (with ?filename=) or many "
              "files as multipart/form-data",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                          "minLength": 1}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "array", "items": {"type": "string",
                                                          "format": "binary"}}}}}}}})
    async def add_files(request: Request, upload_id: UploadId, caller: CallerDep,
                        filename: Annotated[str | None, Query(
                            max_length=1024, description="The file's name (raw body).")] = None
                        ) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await own_upload(session, caller, upload_id)
            if not caller.may(Action.upload, upload.project):
                raise forbidden(f"You may not upload into project {upload.project!r}.")
            rules = await project_settings(session, upload.project or "")
        if upload.state != OPEN:
            raise Refused(409, "Upload not open", f"Upload {upload_id} is {upload.state}; "
                          "files are added to an open upload only.")
        results = []
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > settings.max_upload_bytes:
                raise Refused(413, "Content Too Large", "A request may be at most "
                              f"{settings.max_upload_bytes} bytes.")
            # Parts are spooled by Starlette (memory up to 1 MB each, then a temporary
            # file), then streamed into the store one by one.
            async with request.form(max_files=rules.max_files_per_upload + 1,
                                    max_part_size=1024 * 1024) as form:
                parts = [p for _, p in form.multi_items() if hasattr(p, "read")]
                if not parts:
                    raise Refused(422, "No files", "The form holds no file parts.")
                for part in parts:
                    results.append(await add_one(
                        upload, rules, part.filename or "file", _chunks(part), part.size,
                        part.content_type))
        else:
            if not filename:
                raise Refused(422, "File name missing", "Name the file: ?filename=…")
            length = request.headers.get("content-length")
            results.append(await add_one(
                upload, rules, filename, request.stream(),
                int(length) if length and length.isdigit() else None,
                content_type or None))
        added = [r for r in results if r["state"] == "added"]
        duplicates = [r for r in results if r["state"] == "duplicate"]
        return json_response({"added": len(added), "duplicates": len(duplicates),
                              "files": results}, 201 if added else 200)

    @api.post("/uploads/{upload_id}/submit", operation_id="submit_upload", summary="Submit an open upload for processing")
    async def submit_upload(upload_id: UploadId, caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await own_upload(session, caller, upload_id, lock=True)
            if upload.state != OPEN:
                if upload.state == CANCELLED:
                    raise Refused(409, "Upload cancelled", f"Upload {upload_id} was "
                                  "cancelled.")
                return await view(upload_id)  # submitted before: the same answer again
            objects = list((await session.exec(select(UploadObject).where(
                UploadObject.upload_id == upload_id, UploadObject.state == "added"))).all())
            if not objects:
                raise Refused(409, "No files", f"Upload {upload_id} has no files to "
                              "process; add some first.")
            for obj in objects:
                obj.state = "stored"
            await submit(svc, session, upload, objects)
        return await view(upload_id)

    @api.post("/uploads/{upload_id}/cancel", operation_id="cancel_upload",
              summary="Cancel an open upload: its files are deleted, nothing is processed")
    async def cancel_upload(upload_id: UploadId, caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await own_upload(session, caller, upload_id, lock=True)
            if upload.state not in (OPEN, CANCELLED):
                raise Refused(409, "Already submitted", (
                    f"Upload {upload_id} is {upload.state}: once submitted, its files are "
                    "processed to the end."))
            upload.state, upload.completed_at = CANCELLED, datetime.now(UTC)
            session.add(upload)
        await asyncio.to_thread(svc.store.delete_prefix, f"staging/{upload_id}/")
        return await view(upload_id)

    @api.post("/uploads/{upload_id}/retry", operation_id="retry_upload",
              summary="Process the upload's failed files again (those the pipeline gave up on)")
    async def retry_upload(upload_id: UploadId, caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await own_upload(session, caller, upload_id, lock=True)
            if upload.state not in ("partial", "failed"):
                raise Refused(409, "Nothing to retry", (
                    f"Upload {upload_id} is {upload.state}; only a partial or failed "
                    "upload has failed files to retry."))
            failed = (await session.exec(select(UploadFile).where(
                UploadFile.upload_id == upload_id,
                col(UploadFile.state).in_(["failed", "rejected"]),
                col(UploadFile.reason)["code"].astext == PIPELINE_FAILED,
                col(UploadFile.event).is_not(None)))).all()
            if not failed:
                raise Refused(409, "Nothing to retry", (
                    "No file of this upload failed in the pipeline; rejected files were "
                    "refused for their content and need a new upload."))
            for row in failed:
                # The event that brought it to the stage that gave up, under its own id: that
                # stage never recorded it as handled, so it does the work now.
                await svc.outbox.resend(session, TOPIC_OF_TYPE[row.event["type"]],
                                        upload_id, row.event)
                row.state, row.reason = "staged", None
                session.add(row)
            upload.state = PROCESSING
            session.add(upload)
        return await view(upload_id, retried=len(failed))

    @api.get("/projects/{project_id}/uploads",
             summary="A project's uploads (default: those in progress), with counts by state")
    async def project_uploads(project_id: Annotated[str, PathParam(pattern=PROJECT_ID)],
                              caller: CallerDep,
                              state: Annotated[list[UploadState] | None, Query(
                                  description="open, processing, archived, prearchived, "
                                  "partial, failed, cancelled (repeat; default: open and "
                                  "processing)")] = None,
                              limit: Annotated[int, Query(ge=1, le=1000)] = 100
                              ) -> JSONResponse:
        if not (caller.may(Action.view, project_id) or caller.may(Action.upload, project_id)):
            raise forbidden(f"You have no role in project {project_id!r}.")
        states = state or [OPEN, PROCESSING]
        query = select(Upload).where(Upload.project == project_id,
                                     col(Upload.state).in_(states))
        if not caller.may(Action.view, project_id):
            query = query.where(Upload.uploader == caller.username)  # an uploader's own
        async with svc.db.session() as session:
            uploads = (await session.exec(query.order_by(col(Upload.created_at).desc())
                                          .limit(limit))).all()
            ids = [u.id for u in uploads]
            by_file = (await session.exec(
                select(UploadFile.upload_id, UploadFile.state, func.count())
                .where(col(UploadFile.upload_id).in_(ids))
                .group_by(UploadFile.upload_id, UploadFile.state))).all()
            by_object = (await session.exec(
                select(UploadObject.upload_id, UploadObject.state, func.count())
                .where(col(UploadObject.upload_id).in_(ids))
                .group_by(UploadObject.upload_id, UploadObject.state))).all()
        counts: dict[str, dict[str, dict[str, int]]] = {
            i: {"files": {}, "objects": {}} for i in ids}
        for upload_id, file_state, n in by_file:
            counts[upload_id]["files"][file_state] = n
        for upload_id, object_state, n in by_object:
            counts[upload_id]["objects"][object_state] = n
        return json_response([{
            "id": u.id, "state": u.state, "uploader": u.uploader, "created_at": u.created_at,
            "fields": (u.options or {}).get("fields", {}), **counts[u.id]} for u in uploads])

    async def visible(upload_id: UploadId, caller: CallerDep) -> str:
        """Checked before a stream starts: its errors are still HTTP ones."""
        async with svc.db.session() as session:
            return (await own_upload(session, caller, upload_id)).id

    @api.get("/uploads/{upload_id}/events", response_class=EventSourceResponse,
             operation_id="upload_events",
             summary="Live progress of an upload (Server-Sent Events), until it ends")
    async def upload_events(upload_id: Annotated[str, Depends(visible)], request: Request
                            ) -> AsyncIterator[ServerSentEvent]:
        last: Any = None
        sequence = 0
        while not await request.is_disconnected():
            async with svc.db.session() as session:
                upload = await session.get(Upload, upload_id)
                by_state = dict((await session.exec(
                    select(UploadFile.state, func.count()).where(
                        UploadFile.upload_id == upload_id).group_by(UploadFile.state))).all())
            assert upload is not None
            progress = {"id": upload_id, "state": upload.state, "files": by_state,
                        "outcome": (upload.summary or {}).get("outcome")}
            if progress != last:
                sequence += 1
                last = progress
                yield ServerSentEvent(event="progress", id=str(sequence), data=progress)
            if upload.state in TERMINAL:
                yield ServerSentEvent(event="done", id=str(sequence + 1), data=progress)
                return
            await asyncio.sleep(0.5)

    return api


async def record_object(svc: Service, upload: Upload, rules: ProjectSettings, key: str,
                        name: str, stored: StoredObject, content_type: str | None
                        ) -> dict[str, Any]:
    """Adds a stored file to an open upload, unless it is a duplicate (the same content in this
    upload, or already archived in the project): then it is deleted, recorded as skipped, and
    reported. Past the project's cap, the file is deleted and refused."""
    # No lock on the upload while looking: the unique index finds a duplicate within the
    # upload, and the counter (updated last, so its row lock lasts only until the commit)
    # keeps the cap however many clients add at once.
    async with svc.db.session() as session:
        state = (await session.exec(select(Upload.state).where(Upload.id == upload.id))).first()
        if state != OPEN:
            await asyncio.to_thread(svc.store.delete, key)
            raise Refused(409, "Upload not open", f"Upload {upload.id} is {state or 'gone'}; "
                          "files are added to an open upload only.")
        archived = (await session.exec(
            select(UploadFile.path, Upload.id).join(Upload, col(Upload.id) == UploadFile.upload_id)
            .where(Upload.project == upload.project, UploadFile.sha256 == stored.sha256,
                   col(UploadFile.state).in_(["archived", "prearchived"])).limit(1))).first()
        added = None if archived else (await session.execute(
            pg_insert(UploadObject).values(
                object_key=key, upload_id=upload.id, filename=name, size=stored.size,
                sha256=stored.sha256 or "", state="added", content_type=content_type)
            .on_conflict_do_nothing(index_elements=["upload_id", "sha256"],
                                    index_where=text("state = 'added'"))
            .returning(col(UploadObject.object_key)))).first()
        if added is None:
            same = None if archived else (await session.exec(select(UploadObject.filename).where(
                UploadObject.upload_id == upload.id, UploadObject.sha256 == stored.sha256,
                UploadObject.state == "added"))).first()
            reason = ({"code": "upload.duplicate", "message": (
                f"The same content as {same!r}, already in this upload; skipped.")}
                if not archived else {"code": "upload.already_archived", "message": (
                    f"The same content as {archived[0]!r} (upload {archived[1]}), already "
                    f"in project {upload.project}; skipped.")})
            session.add(UploadObject(object_key=key, upload_id=upload.id, filename=name,
                                     size=stored.size, sha256=stored.sha256 or "",
                                     state="duplicate", reason=reason))
            await asyncio.to_thread(svc.store.delete, key)
            return {"filename": name, "state": "duplicate", "reason": reason}
        counted = (await session.execute(
            update(Upload).where(col(Upload.id) == upload.id,
                                 col(Upload.files_added) < rules.max_files_per_upload)
            .values(files_added=col(Upload.files_added) + 1)
            .returning(col(Upload.files_added)))).first()
        if counted is None:
            await session.rollback()
            await asyncio.to_thread(svc.store.delete, key)
            raise Refused(409, "Too many files", (
                f"Upload {upload.id} holds {rules.max_files_per_upload} files, the most project "
                f"{upload.project} allows in one upload (max_files_per_upload); submit it "
                "and start another."))
    return {"filename": name, "object_key": key, "size": stored.size,
            "sha256": stored.sha256, "state": "added"}


async def _chunks(part: Any, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    while chunk := await part.read(size):
        yield chunk
