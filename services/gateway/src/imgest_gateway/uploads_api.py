"""Upload sessions, the flow of a slide or photo repository: create an upload for a project with
its fields, add files (one request each, or many in one multipart request), submit it, follow
it live (Server-Sent Events), cancel it while open, retry its failed files.

Files are streamed into the store as they arrive; their SHA-256 is computed on the way, so a
duplicate (the same content twice in the upload, or already archived in the project) is found
as it is added, skipped, and reported.
"""


import asyncio
import contextlib
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any, Literal, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from imgest_contracts import (
    ImportOptions,
    ObjectStored,
    ProjectRules,
    ProjectSettings,
    UploadCancelled,
    Uploader,
    UploadSubmitted,
)
from imgest_contracts.events import FIELD_NAME
from imgest_runtime.broker import PIPELINE_FAILED
from imgest_runtime.db import Statement, any_of, unnested
from imgest_runtime.service import Service, problem, problem_responses
from imgest_runtime.store import (
    CHUNK,
    SmallObjects,
    StoredObject,
    StoreError,
    fit_name,
    put_async,
    read_up_to,
)
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    cast,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    null,
    or_,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException

from .auth import CallerDep, forbidden
from .domain import Arrival, BadFilename, Verdict, safe_filename, sort_arrivals
from .form_parts import BadForm, FilePart, file_parts
from .identity import ALLOWED, PROJECT_ID, Action, Caller
from .models import (
    Membership,
    PrearchiveEntry,
    Project,
    Upload,
    UploadFile,
    UploadObject,
    User,
)
from .settings import Settings
from .views import SHOWN, TOPIC_OF_TYPE, event_json, json_response, upload_status

OPEN, PROCESSING, CANCELLING, CANCELLED = "open", "processing", "cancelling", "cancelled"


@dataclass(frozen=True, slots=True)
class AddingTo:
    """What adding files needs of an upload: its row as a plain value (building an ORM object
    of it cost each file added 35 µs more of the gateway's CPU)."""

    id: str
    state: str
    project: str | None
    uploader: str


_U = TypeVar("_U", Upload, AddingTo)

TERMINAL = {"archived", "prearchived", "partial", "failed", CANCELLED}
LABEL = r"^[A-Za-z0-9_-]{1,64}$"
UploadState = Literal["open", "processing", "cancelling", "archived", "prearchived", "partial",
                      "failed", "cancelled"]
MAX_FIELDS = 100  # of an upload: with their values, ~100 KB at most
FieldValue = Annotated[str, Field(max_length=1000, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$")]


UploadId = Annotated[str, PathParam(max_length=64, description="The upload's id.")]


class Refused(Exception):
    """A request refused with a problem document (the app's handler answers with it)."""

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail

    @property
    def response(self) -> JSONResponse:
        return problem(self.status, self.title, self.detail)


class NewUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fields: dict[str, FieldValue] = Field(
        # (bounded: they travel in upload.submitted, which the broker must take whole)
        default_factory=dict, max_length=MAX_FIELDS, description="Free fields (e.g. view_name, "
        f"capture_date), at most {MAX_FIELDS}; the project says which are required.",
        json_schema_extra={
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


WHOLE_UP_TO = CHUNK  # a form's file up to this size is read whole, then written


def too_large(limit: int) -> Refused:
    return Refused(413, "Content Too Large", f"A file may be at most {limit} bytes.")


def size_refusal(limit: int, size: int) -> Refused | None:
    """Why a file of this size is refused, if it is."""
    if size > limit:
        return too_large(limit)
    if size == 0:
        return Refused(400, "Empty file", "The file was empty; nothing to import.")
    return None


async def _chained(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def store_failure(error: StoreError | OSError, what: str = "The file") -> Refused:
    """A 503 saying why the store failed (for a local disk, its error, not its paths)."""
    why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return Refused(503, "Store unavailable", f"{what} could not be stored: {why}")


class _TooLarge(Exception):
    """The body went past the size limit (raised inside the stream, answered as a 413)."""


async def stream_to_store(svc: Service, settings: Settings, key: str,
                          chunks: AsyncIterator[bytes], length: int | None,
                          durable: bool = True) -> StoredObject:
    """Streams chunks into the store under `key`, refusing a body past the size limit (also
    when no length was announced) and an empty one. With `durable=False`, the caller makes it
    durable (a `durable_batch` opened before) before recording it."""
    limit = settings.max_upload_bytes
    if length is not None and length > limit:
        raise too_large(limit)

    async def limited() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise _TooLarge()
            yield chunk

    try:
        stored = await put_async(svc.store, key, limited(), length,  # type: ignore[arg-type]
                                 durable=durable)
    except _TooLarge:
        await asyncio.to_thread(svc.store.delete, key)
        raise too_large(limit) from None
    except (StoreError, OSError) as e:
        raise store_failure(e) from e
    if refused := size_refusal(limit, stored.size):  # empty
        await asyncio.to_thread(svc.store.delete, key)
        raise refused
    return stored


def is_form(content_type: str) -> bool:
    """Whether a body is multipart/form-data (a media type's name is case-insensitive)."""
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


async def store_one_file(svc: Service, settings: Settings, request: Request,
                         key: Callable[[str | None], str]) -> tuple[StoredObject, str | None]:
    """Stores the one file a request carries, under `key(its name in the form, if any)`: the
    raw body, or a form's single file part (what `curl -F file=@x` sends). Returns it with its
    content type. A form of no file, or of several, is refused, nothing of it kept."""
    content_type = request.headers.get("content-type", "")
    if not is_form(content_type):
        length = request.headers.get("content-length", "")
        stored = await stream_to_store(svc, settings, key(None), request.stream(),
                                       int(length) if length.isdigit() else None)
        return stored, content_type or None
    stored, part_type = None, None
    try:
        async for part in file_parts(content_type, request.stream()):
            if stored is not None:
                raise Refused(400, "One file only", "The form must hold exactly one file; "
                              "send several to an upload session.")
            stored = await stream_to_store(svc, settings, key(part.filename), part.chunks, None)
            part_type = part.content_type
    except BaseException as e:
        if stored is not None:  # (shielded: a client gone leaves nothing behind either)
            await asyncio.shield(delete_objects(svc, [stored.key]))
        if isinstance(e, BadForm):
            raise Refused(400, "Bad form", str(e)) from e
        raise
    if stored is None:
        raise Refused(400, "No file", "The form must hold exactly one file; it holds none.")
    return stored, part_type


async def submit_one_file(svc: Service, settings: Settings, request: Request, upload_id: str,
                          caller: Caller, project: str | None, options: dict[str, Any],
                          key: Callable[[str | None], str]) -> tuple[Upload, UploadObject]:
    """The one file a request carries (`store_one_file`) as a new upload, submitted at once;
    returns both. Refused or not recorded (the database away, the client gone), nothing of it
    is kept: neither the file nor the upload's folder."""
    try:
        stored, content_type = await store_one_file(svc, settings, request, key)
        async with svc.db.session() as session:
            upload = Upload(id=upload_id, state="processing", project=project,
                            uploader=caller.username, email=caller.email, options=options,
                            created_at=datetime.now(UTC))
            obj = UploadObject(object_key=stored.key, upload_id=upload_id,
                               filename=stored.key.rsplit("/", 1)[-1], size=stored.size,
                               sha256=stored.sha256 or "", state="stored",
                               content_type=content_type)
            session.add(upload)
            await submit(svc, session, upload, [obj])
    except BaseException:  # (shielded: a client gone leaves nothing behind either)
        await asyncio.shield(asyncio.to_thread(svc.store.delete_prefix,
                                               f"staging/{upload_id}/"))
        raise
    return upload, obj


def object_stored(upload: Upload, obj: UploadObject, rules: ProjectRules | None,
                  only_object: bool) -> ObjectStored:
    return ObjectStored(upload_id=upload.id, project=upload.project, object_key=obj.object_key,
                        filename=obj.filename, size=obj.size, sha256=obj.sha256,
                        content_type=obj.content_type, rules=rules, only_object=only_object)


async def project_rules(session: AsyncSession, project_id: str | None) -> ProjectRules | None:
    """The project's rules as they are now, carried with the upload's files: the metadata
    service checks them even before project.updated reaches it."""
    project = await session.get(Project, project_id) if project_id else None
    if project is None:
        return None
    return ProjectRules.of(project.id, ProjectSettings.model_validate(project.settings),
                           project.updated_at)


async def uploader(session: AsyncSession, upload: Upload) -> Uploader:
    """Who sent the upload, with the projects they may send into (DICOM headers may name
    another: that session goes to Unassigned)."""
    user = await session.get(User, upload.uploader)
    projects = None
    if user is None or not user.admin:
        projects = sorted((await session.exec(select(Membership.project).where(
            Membership.username == upload.uploader,
            col(Membership.role).in_([r.value for r, allowed in ALLOWED.items()
                                      if Action.upload in allowed])))).all())
    return Uploader(username=upload.uploader, email=upload.email, projects=projects,
                    success_emails=user is None or user.success_emails)


async def submit(svc: Service, session: AsyncSession, upload: Upload,
                 objects: list[UploadObject]) -> None:
    """Hands the upload to the pipeline: each object's object.stored, then upload.submitted
    naming them all (the importer completes the upload once every one has an outcome). Each
    object is stored, with its event (a re-drive sends it again): those of an open upload in
    one statement (through the ORM, 1,000 cost a fifth of a second of CPU), a new one as it is
    added."""
    rules = await project_rules(session, upload.project)
    events = await svc.outbox.add_many(  # one statement for all, not a round trip each
        session, [(object_stored(upload, obj, rules, len(objects) == 1), None)
                  for obj in objects])
    recorded = []
    for obj, event in zip(objects, events):
        if inspect(obj).persistent:
            recorded.append((obj, event))
        else:
            obj.state, obj.event = "stored", event_json(event)
            session.add(obj)
    if recorded:
        await session.execute(_OBJECTS_STORED, {
            "of_upload": upload.id, "object_keys": [obj.object_key for obj, _ in recorded],
            "events": [event.model_dump_json(exclude_none=True) for _, event in recorded]})
        for obj, _ in recorded:  # as the rows are now (the event unloaded: not read again)
            set_committed_value(obj, "state", "stored")
            session.expire(obj, ["event"])
    upload.state = PROCESSING
    upload.submission = event_json(await svc.outbox.add(session, UploadSubmitted(
        upload_id=upload.id, uploader=await uploader(session, upload),
        options=ImportOptions.model_validate({  # (the gateway keeps more, e.g. a listener id)
            "project": upload.project,
            **{k: v for k, v in upload.options.items() if k in ImportOptions.model_fields}}),
        object_keys=[o.object_key for o in objects], submitted_at=datetime.now(UTC),
        rules=rules)))
    session.add(upload)


async def project_settings(session: AsyncSession, project_id: str) -> ProjectSettings:
    project = await session.get(Project, project_id)
    if project is None:
        raise Refused(404, "Not Found", f"No project {project_id!r}.")
    return ProjectSettings.model_validate(project.settings)


def uploads_router(svc: Service, settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["upload sessions"],
                    responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 503))

    def visible_to(caller: Caller, upload_id: str, upload: _U | None) -> _U:
        if upload is None:
            raise HTTPException(404, f"No upload {upload_id!r}.")
        if not caller.may_see_upload(upload.uploader, upload.project):
            raise forbidden(f"Upload {upload_id!r} is neither yours nor in a project you may "
                            "view.")
        return upload

    async def own_upload(session: AsyncSession, caller: Caller, upload_id: str,
                         lock: bool = False) -> Upload:
        return visible_to(caller, upload_id, await session.get(
            Upload, upload_id, with_for_update=lock))

    async def view(upload_id: str, status: int = 200, **extra: Any) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await session.get(Upload, upload_id)
            assert upload is not None
            shown = await upload_status(session, upload)
        return json_response({**shown, **extra}, status, Location=f"/api/v1/uploads/{upload_id}")

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

    async def discard(small: SmallObjects, streamed: list[str]) -> None:
        """Deletes what a form wrote: its small files once their writers are done, and the
        streamed ones."""
        with contextlib.suppress(Exception):  # (a writer that died: what it wrote is known)
            await small.finish()
        await delete_objects(svc, [key for key, obj in small.written.items()
                                   if isinstance(obj, StoredObject)] + streamed)

    async def receive_form(upload: Upload, rules: ProjectSettings, content_type: str,
                           body: AsyncIterator[bytes]) -> list[Verdict]:
        """Streams each file part into the store as it arrives. A small part is read whole and
        handed to the form's writer thread, which writes them one after another while the next
        parts are read; a larger one streams on its own. Then makes them all durable at once
        (one flush of the disk, not one per file) and records them in one transaction."""
        small = SmallObjects(svc.store, durable=False)
        batch = svc.store.durable_batch()  # before the first file is written
        # Per file: its verdict (refused on its own), or (part, name, key, stored object; None
        # while the writer thread has it).
        received: list[tuple[FilePart, str, str, StoredObject | None] | Verdict] = []
        try:
            async for part in file_parts(content_type, body):
                if len(received) >= rules.max_files_per_upload:
                    raise Refused(409, "Too many files", (
                        f"A request may add at most {rules.max_files_per_upload} files to an "
                        f"upload of project {upload.project} (max_files_per_upload)."))
                try:
                    key, name = staging_key(upload.id, part.filename)
                except Refused as e:
                    received.append(refusal(part.filename, e))
                    continue  # (its bytes are skipped by file_parts)
                head, whole = await read_up_to(part.chunks, WHOLE_UP_TO)
                if whole:
                    size = sum(len(chunk) for chunk in head)
                    if refused := size_refusal(settings.max_upload_bytes, size):
                        received.append(refusal(part.filename, refused))
                    else:
                        await small.put(key, head)
                        received.append((part, name, key, None))
                    continue
                try:
                    stored = await stream_to_store(svc, settings, key,
                                                   _chained(head, part.chunks), None,
                                                   durable=False)
                except Refused as e:  # too large, store down: this file only
                    received.append(refusal(part.filename, e))
                    continue
                received.append((part, name, key, stored))
            if not received:
                raise Refused(422, "No files", "The form holds no file parts.")
            written = await small.finish()
            try:
                await asyncio.to_thread(batch.make_durable, [
                    r[2] for r in received if not isinstance(r, Verdict)
                    and isinstance(r[3] or written[r[2]], StoredObject)])
            except OSError as e:
                raise store_failure(e, "The files") from e
        except BaseException as e:
            # Shielded: a cancelled request (a client gone, a stop) leaves nothing behind either.
            await asyncio.shield(discard(small, [
                r[3].key for r in received if not isinstance(r, Verdict) and r[3] is not None]))
            if isinstance(e, BadForm):
                raise Refused(400, "Bad form", str(e)) from e
            raise
        finally:
            batch.close()
        arrivals, verdicts = [], []
        for r in received:
            if isinstance(r, Verdict):
                verdicts.append(r)
                continue
            part, name, key, obj = r
            outcome = obj or written[key]
            if not isinstance(outcome, StoredObject):
                verdicts.append(refusal(part.filename, store_failure(outcome)))
                continue
            arrival = Arrival(outcome.key, name, outcome.size, outcome.sha256 or "",
                              part.content_type)
            arrivals.append(arrival)
            verdicts.append(Verdict(arrival, "pending"))
        recorded = iter(await record_arrivals(svc, upload, rules, arrivals))
        return [next(recorded) if v.state == "pending" else v for v in verdicts]

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
        async with svc.db.connection() as conn:  # the upload and its project's rules at once
            found = await conn.fetchrow(_UPLOAD_AND_RULES, upload_id=upload_id)
        upload = visible_to(caller, upload_id, AddingTo(
            found["id"], found["state"], found["project"], found["uploader"]) if found else None)
        if not caller.may(Action.upload, upload.project):
            raise forbidden(f"You may not upload into project {upload.project!r}.")
        rules = ProjectSettings.model_validate(found["project_settings"] or {})
        if upload.state != OPEN:
            raise Refused(409, "Upload not open", f"Upload {upload_id} is {upload.state}; "
                          "files are added to an open upload only.")
        content_type = request.headers.get("content-type", "")
        length = request.headers.get("content-length", "")
        if is_form(content_type):
            if length.isdigit() and int(length) > settings.max_upload_bytes:
                raise Refused(413, "Content Too Large", "A request may be at most "
                              f"{settings.max_upload_bytes} bytes.")
            verdicts = await receive_form(upload, rules, content_type, request.stream())
        else:
            if not filename:
                raise Refused(422, "File name missing", "Name the file: ?filename=…")
            key, name = staging_key(upload.id, filename)
            try:
                stored = await stream_to_store(svc, settings, key, request.stream(),
                                               int(length) if length.isdigit() else None)
            except Refused as refused:
                if refused.status != 503:
                    raise
                # Cancelled while the bytes came, the upload's folder went from under them:
                # that is the answer, not a store to retry.
                async with svc.db.connection() as conn:
                    now = await conn.fetchrow(_UPLOAD_AND_RULES, upload_id=upload_id)
                if now is None or now["state"] != OPEN:
                    raise Refused(409, "Upload not open", f"Upload {upload_id} is "
                                  f"{now['state'] if now else 'gone'}; files are added to an "
                                  "open upload only.") from refused
                raise
            verdicts = await record_arrivals(svc, upload, rules, [Arrival(
                key, name, stored.size, stored.sha256 or "", content_type or None)])
        return verdicts_response(verdicts)

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
            await submit(svc, session, upload, objects)
        return await view(upload_id)

    @api.post("/uploads/{upload_id}/cancel", operation_id="cancel_upload",
              summary="Cancel an upload: an open one at once (its files are deleted); one being "
              "processed as soon as the importer hears of it (202; nothing not yet placed is "
              "placed, and its files are deleted)",
              responses={202: {"description": "Being cancelled (state `cancelling`); follow it "
                               "until it is `cancelled` (or finished, if it was too late)."}})
    async def cancel_upload(upload_id: UploadId, caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            upload = await own_upload(session, caller, upload_id, lock=True)
            if upload.state in TERMINAL - {CANCELLED}:
                raise Refused(409, "Already finished", (
                    f"Upload {upload_id} is {upload.state}: it finished before it could be "
                    "cancelled."))
            status = 200
            if upload.state == PROCESSING:
                upload.state, status = CANCELLING, 202
                upload.cancellation = event_json(await svc.outbox.add(session, UploadCancelled(
                    upload_id=upload_id, username=caller.username,
                    cancelled_at=datetime.now(UTC))))
            elif upload.state == OPEN:
                upload.state, upload.completed_at = CANCELLED, datetime.now(UTC)
            session.add(upload)
            state = upload.state
        if state == CANCELLED:
            await asyncio.to_thread(svc.store.delete_prefix, f"staging/{upload_id}/")
        return await view(upload_id, 202 if state == CANCELLING else status)

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
                col(UploadFile.event).is_not(None), SHOWN))).all()
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
                .where(col(UploadFile.upload_id).in_(ids), SHOWN)
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
                        UploadFile.upload_id == upload_id, SHOWN).group_by(UploadFile.state)
                    )).all())
                unpacking = (await session.exec(select(
                    UploadObject.filename, UploadObject.progress).where(
                    UploadObject.upload_id == upload_id, UploadObject.state == "stored",
                    col(UploadObject.progress).is_not(None)))).all()
            assert upload is not None
            progress = {"id": upload_id, "state": upload.state, "files": by_state,
                        "unpacking": {name: p for name, p in unpacking},
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


def staging_key(upload_id: str, name: str, token: str | None = None) -> tuple[str, str]:
    """Where a file of an open upload is kept, and the name it keeps. A token (random unless
    given) before the name makes two files of the same name two objects; it is not a folder
    of its own, which would cost the disk a directory per file (about a seventh of a small
    file's write)."""
    try:
        safe = safe_filename(name)
    except BadFilename as e:
        raise Refused(400, "Bad file name", str(e)) from e
    token = token or os.urandom(6).hex()
    return f"staging/{upload_id}/{fit_name(f'{token}-{safe}')}", safe


def refusal(filename: str, refused: Refused) -> Verdict:
    """A file of a form refused on its own (the others may be added)."""
    code = "upload." + re.sub(r"\W+", "_", refused.title.lower()).strip("_")
    return Verdict(Arrival("", filename, 0, ""), "refused",
                   {"code": code, "message": refused.detail}, refused.status)


def verdict_view(v: Verdict) -> dict[str, Any]:
    a = v.arrival
    if v.state == "added":
        return {"filename": a.filename, "object_key": a.object_key, "size": a.size,
                "sha256": a.sha256, "state": "added"}
    return {"filename": a.filename, "state": v.state, "reason": v.reason}


def verdicts_response(verdicts: list[Verdict]) -> JSONResponse:
    """201 when a file was added; 200 when all were duplicates; when none was added and some
    were refused, the first refusal's problem (with every file's verdict)."""
    files = [verdict_view(v) for v in verdicts]
    added = sum(v.state == "added" for v in verdicts)
    duplicates = sum(v.state == "duplicate" for v in verdicts)
    refused = [v for v in verdicts if v.state == "refused"]
    if not added and refused:
        first = refused[0]
        return problem(first.status, HTTPStatus(first.status).phrase,
                       first.reason["message"] if first.reason else "", files=files)
    return json_response({"added": added, "duplicates": duplicates, "refused": len(refused),
                          "files": files}, 201 if added else 200)


async def delete_objects(svc: Service, keys: list[str]) -> None:
    if keys:
        await asyncio.to_thread(lambda: [svc.store.delete(k) for k in keys])


# The statements of adding a file, compiled once for the driver itself: they run for every
# file added, and through a session they cost three times the CPU.
_UPLOAD_AND_RULES = Statement(select(
    Upload.id, Upload.state, Upload.project, Upload.uploader,
    Project.settings.label("project_settings")).join(
    Project, col(Project.id) == Upload.project, isouter=True).where(
    Upload.id == bindparam("upload_id")))
_LOCK_UPLOAD = Statement(select(Upload.state, Upload.files_added).where(
    col(Upload.id) == bindparam("upload_id")).with_for_update())
_SHAS = bindparam("shas")
# The same content archived in the project, or waiting in its prearchive (not once the entry
# was deleted).
_ARCHIVED_IN_PROJECT = (
    select(UploadFile.sha256, UploadFile.path, Upload.id)
    .join(Upload, col(Upload.id) == UploadFile.upload_id)
    .where(Upload.project == bindparam("project"), any_of(col(UploadFile.sha256), _SHAS),
           or_(UploadFile.state == literal_column("'archived'"),
               and_(UploadFile.state == literal_column("'prearchived'"),
                    exists().where(col(PrearchiveEntry.uri) == UploadFile.session)))))


def _in_upload(*columns: Any) -> Any:
    """The same content already in this upload."""
    return select(*columns).where(
        UploadObject.upload_id == bindparam("upload_id"),
        UploadObject.state == literal_column("'added'"),  # (the partial index's own words)
        any_of(col(UploadObject.sha256), _SHAS))


_KNOWN_CONTENT = Statement(union_all(
    _in_upload(UploadObject.sha256, UploadObject.filename, cast(null(), String)),
    _ARCHIVED_IN_PROJECT))
_ARRIVED = {"object_key": String, "filename": String, "size": BigInteger, "sha256": String,
            "content_type": String}


def _record_objects() -> Statement:
    """The objects of one request, and the count of those added, in one statement: a column
    an array each (`unnest`), whatever their number."""
    fields = {**_ARRIVED, "state": String, "reason": Text}
    arrived = unnested("arrived", **fields)
    table, upload = UploadObject.__table__, Upload.__table__  # type: ignore[attr-defined]
    objects = insert(table).from_select(
        ["upload_id", *fields], select(bindparam("upload_id", type_=String), *[
            cast(arrived.c[name], JSONB) if name == "reason" else arrived.c[name]
            for name in fields])).cte("objects")
    return Statement(update(upload).where(upload.c.id == bindparam("upload_id")).values(
        files_added=upload.c.files_added + bindparam("added")).add_cte(objects))


def _add_all() -> Statement:
    """The common case in one statement, without a transaction of its own: every object of a
    request (none of them twice: `_added_all` sees to that) added to the open upload, if there
    is room for all and each is new (not in the upload, not archived in the project);
    otherwise nothing (0), and `record_arrivals` sorts them out. The upload's row is locked by
    the update, so the cap and the state hold as with `_LOCK_UPLOAD`. The same content added
    meanwhile by another client (this statement's snapshot is older than its lock) fails it on
    the unique index `upload_object_added_once`: only that race logs an error in PostgreSQL,
    not every duplicate."""
    arrived = unnested("arrived", **_ARRIVED)
    table, upload = UploadObject.__table__, Upload.__table__  # type: ignore[attr-defined]
    added = bindparam("added", type_=Integer)
    room = update(upload).where(
        upload.c.id == bindparam("upload_id"), upload.c.state == literal_column(f"'{OPEN}'"),
        upload.c.files_added + added <= bindparam("cap", type_=Integer),
        ~exists(_in_upload(UploadObject.sha256)), ~exists(_ARCHIVED_IN_PROJECT)).values(
        files_added=upload.c.files_added + added).returning(upload.c.id).cte("room")
    objects = insert(table).from_select(
        ["upload_id", *_ARRIVED, "state"],
        select(room.c.id, *[arrived.c[name] for name in _ARRIVED],
               literal_column("'added'")).select_from(room).join(arrived, true())
    ).returning(table.c.object_key).cte("objects")
    return Statement(select(func.count()).select_from(objects))


_RECORD_OBJECTS = _record_objects()
_ADD_ALL = _add_all()


def _objects_stored() -> Any:
    table = UploadObject.__table__  # type: ignore[attr-defined]
    moved = unnested("moved", object_key=String, event=Text)
    return update(table).where(
        table.c.object_key == moved.c.object_key, table.c.upload_id == bindparam("of_upload"),
        table.c.state == literal_column("'added'")).values(
        state="stored", event=cast(moved.c.event, JSONB))


_OBJECTS_STORED = _objects_stored()


async def record_arrivals(svc: Service, upload: Upload | AddingTo, rules: ProjectSettings,
                          arrivals: list[Arrival]) -> list[Verdict]:
    """Records files just stored in an open upload, all or none: duplicates (in the upload,
    or already archived in the project) are recorded as skipped and their objects deleted;
    files past the project's cap are refused and deleted; the rest are added."""
    if not arrivals:
        return []
    try:
        if await _added_all(svc, upload, rules, arrivals):
            return [Verdict(a, "added") for a in arrivals]
        async with svc.db.connection(transaction=True) as conn:
            # The upload's row is locked while deciding: with many clients adding at once,
            # "already in the upload" and the cap stay true.
            row = await conn.fetchrow(_LOCK_UPLOAD, upload_id=upload.id)
            if row is None or row["state"] != OPEN:
                raise Refused(409, "Upload not open", f"Upload {upload.id} is "
                              f"{row['state'] if row else 'gone'}; files are added to an open "
                              "upload only.")
            # After the lock, so it sees what the last holder added.
            known = await conn.fetch(_KNOWN_CONTENT, upload_id=upload.id, project=upload.project,
                                     shas=list({a.sha256 for a in arrivals}))
            in_upload = {sha: name for sha, name, earlier in known if earlier is None}
            archived = {sha: (path, earlier) for sha, path, earlier in known if earlier}
            verdicts = sort_arrivals(
                arrivals, upload_id=upload.id, project=upload.project, in_upload=in_upload,
                archived=archived, room=rules.max_files_per_upload - row["files_added"],
                cap=rules.max_files_per_upload)
            kept = [v for v in verdicts if v.state != "refused"]
            if kept:
                await conn.execute(
                    _RECORD_OBJECTS, upload_id=upload.id,
                    added=sum(v.state == "added" for v in verdicts),
                    object_keys=[v.arrival.object_key for v in kept],
                    filenames=[v.arrival.filename for v in kept],
                    sizes=[v.arrival.size for v in kept],
                    sha256s=[v.arrival.sha256 for v in kept],
                    content_types=[v.arrival.content_type for v in kept],
                    states=[v.state for v in kept],
                    reasons=[json.dumps(v.reason) if v.reason is not None else None
                             for v in kept])
    except BaseException:
        await delete_objects(svc, [a.object_key for a in arrivals])
        raise
    await delete_objects(svc, [v.arrival.object_key for v in verdicts if v.state != "added"])
    return verdicts


async def _added_all(svc: Service, upload: Upload | AddingTo, rules: ProjectSettings,
                     arrivals: list[Arrival]) -> bool:
    """Whether `_ADD_ALL` added every arrival: one round trip to the database where the locked
    transaction takes five (4 clients adding files: 11-16 % less of the gateway's CPU per
    file, 0.3-0.4 ms, and a fifth less of PostgreSQL's)."""
    if len({a.sha256 for a in arrivals}) < len(arrivals):
        return False  # (the same content twice in one request)
    try:
        async with svc.db.connection() as conn:
            row = await conn.fetchrow(
                _ADD_ALL, upload_id=upload.id, project=upload.project, added=len(arrivals),
                cap=rules.max_files_per_upload, shas=[a.sha256 for a in arrivals],
                **{f"{name}s": [getattr(a, name) for a in arrivals] for name in _ARRIVED})
    except asyncpg.UniqueViolationError:  # the same content again: sorted out under the lock
        return False
    return bool(row[0])
