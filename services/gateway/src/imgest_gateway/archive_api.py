"""Archiving a prearchive entry (XNAT's commit): `POST /api/v1/prearchive/archive` and XNAT's
`POST /data/services/archive?src=…`. The gateway publishes prearchive.requested and waits, within
a bound, for the importer's prearchive.answered."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from imgest_contracts import PrearchiveRequested, ReleaseRequested
from imgest_runtime.service import Service, problem, problem_responses
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select

from .auth import CallerDep, forbidden
from .identity import PROJECT_ID, Action, Caller
from .models import ArchivedSession, ArchiveRequest, PrearchiveEntry, Project
from .settings import Settings
from .views import json_response

ENTRY_PATTERN = (r"^(?:/data)?/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>\d{8}_\d{9})"
                 r"/(?P<label>[^/]+)/?$")
ENTRY = re.compile(ENTRY_PATTERN)
ENTRY_SCHEMA = r"^(?:/data)?/prearchive/projects/[^/]+/\d{8}_\d{9}/[^/]+/?$"  # (for OpenAPI)
TIMESTAMP = r"^\d{8}_\d{9}$"
PLAIN = {"content": {"text/plain": {"schema": {"type": "string"}}}}


class ArchiveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entry: str = Field(..., max_length=1024, pattern=ENTRY_SCHEMA,
                       description="The entry's address, "
                       "/data/prearchive/projects/P/yyyyMMdd_HHmmssSSS/SESSION.")
    overwrite: Literal["none", "append", "delete"] = "none"
    quarantine: bool | None = None
    trigger_pipelines: bool = True
    subject: str | None = Field(None, pattern=PROJECT_ID, description="Archive it under this "
                                "subject (the entry's own if absent).")
    session: str | None = Field(None, pattern=PROJECT_ID, description="Archive it with this "
                                "session label (the entry's own if absent).")


class NotAllowed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class EntryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entry: str = Field(..., max_length=1024, pattern=ENTRY_SCHEMA,
                       description="The entry's address.")


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entry: str = Field(..., max_length=1024, pattern=ENTRY_SCHEMA,
                       description="The entry's address.")
    project: str = Field(..., pattern=PROJECT_ID, description="The project it moves to.")


async def entry_command(svc: Service, settings: Settings, caller: Caller, body: ArchiveBody,
                        action: Literal["archive", "delete", "move", "rebuild"] = "archive",
                        to_project: str | None = None) -> ArchiveRequest:
    """Publishes a command on a prearchive entry and waits for its answer (state `pending`
    past the bound)."""
    found = ENTRY.match(body.entry)
    if not found:
        raise NotAllowed(400, f"Not a prearchive entry: {body.entry!r} (expected "
                         "/data/prearchive/projects/P/yyyyMMdd_HHmmssSSS/SESSION).")
    project = found["project"]
    if not re.fullmatch(PROJECT_ID, project) or len(found["label"]) > 64:
        raise NotAllowed(404, f"No prearchive entry {body.entry!r}.")  # (none could be named so)
    if not (caller.may(Action.upload, project) and caller.may(Action.view, project)):
        raise NotAllowed(403, f"You may not {action} sessions of project {project!r}.")
    if to_project is not None:
        if not caller.may(Action.upload, to_project):
            raise NotAllowed(403, f"You may not move sessions into project {to_project!r}.")
        async with svc.db.session() as session:
            if await session.get(Project, to_project) is None:
                raise NotAllowed(404, f"No project {to_project!r}.")
    now = datetime.now(UTC)
    request = ArchiveRequest(id=uuid.uuid4().hex, project=project, username=caller.username,
                             session_key=f"prearchive/{project}/{found['timestamp']}/"
                             f"{found['label']}", state="pending", created_at=now, updated_at=now)
    async with svc.db.session() as session:
        session.add(request)
        await svc.outbox.add(session, PrearchiveRequested(
            request_id=request.id, session_key=request.session_key, action=action,
            to_project=to_project, username=caller.username, overwrite=body.overwrite,
            quarantine=body.quarantine, trigger_pipelines=body.trigger_pipelines,
            subject=body.subject, label=body.session, requested_at=now))
    deadline = asyncio.get_running_loop().time() + settings.xnat_import_wait_seconds
    while True:
        async with svc.db.session() as session:
            row = await session.get(ArchiveRequest, request.id)
        assert row is not None
        if row.state != "pending" or asyncio.get_running_loop().time() > deadline:
            return row
        await asyncio.sleep(0.2)


def xnat_entry_url(uri: str) -> str:
    """An entry's `url` as XNAT's prearchive listings give it: without the leading /data (its
    clients put it back; xnatpy's PrearchiveSession does)."""
    return uri.removeprefix("/data")


def archive_router(svc: Service, settings: Settings) -> APIRouter:
    api = APIRouter()

    async def command(caller: Caller, body: ArchiveBody, action: Literal[
            "archive", "delete", "move", "rebuild"] = "archive", to_project: str | None = None,
            ) -> ArchiveRequest | NotAllowed:
        try:
            return await entry_command(svc, settings, caller, body, action, to_project)
        except NotAllowed as e:
            return e

    def failed(row: ArchiveRequest) -> tuple[int, str]:
        reason = row.reason or {}
        return 404 if reason.get("code") == "prearchive.not_found" else 409, reason.get(
            "message", "")

    def as_json(row: ArchiveRequest | NotAllowed, entry: str, done: tuple[str, ...],
                title: str) -> JSONResponse:
        """A command's answer in the JSON API: 200 once done, 202 while pending, else why."""
        if isinstance(row, NotAllowed):
            if row.status == 403:
                raise forbidden(row.message)
            return problem(row.status, "Not Found" if row.status == 404 else "Bad entry",
                           row.message)
        view = {"request": row.id, "entry": entry, "state": row.state, "uri": row.uri,
                "reason": row.reason}
        if row.state in done or row.state == "pending":
            return json_response(view, 202 if row.state == "pending" else 200)
        status, message = failed(row)
        return problem(status, title, message, **view)

    def as_text(row: ArchiveRequest | NotAllowed, done: tuple[str, ...], pending: str
                ) -> Response:
        """XNAT's answer: the session's address once done, else a status and why, as text."""
        if isinstance(row, NotAllowed):
            return PlainTextResponse(row.message + "\n", status_code=row.status)
        if row.state in done:
            return PlainTextResponse(f"{row.uri}\n")
        if row.state == "pending":
            return PlainTextResponse(f"{pending}\n", status_code=504)
        status, message = failed(row)
        return PlainTextResponse(f"{message}\n", status_code=status)

    @api.post("/api/v1/prearchive/archive", tags=["prearchive"], operation_id="archive_entry",
              summary="Archive a prearchive entry (with overwrite rules); waits for the result",
              responses=problem_responses(400, 401, 403, 404, 409, 422))
    async def archive(body: ArchiveBody, caller: CallerDep) -> JSONResponse:
        return as_json(await command(caller, body), body.entry, ("archived",), "Not archived")

    @api.post("/data/services/archive", tags=["xnat"], response_class=PlainTextResponse,
              summary="XNAT's archive service: commit a prearchive entry named by src",
              responses={code: {"description": what, **PLAIN} for code, what in (
                  (200, "The archived session's URI."), (400, "Not a prearchive entry."),
                  (401, "Not logged in."), (403, "Not allowed in that project."),
                  (404, "No such entry."), (409, "A conflict: the entry stays, with why."),
                  (504, "Still archiving."))})
    async def xnat_archive(
            caller: CallerDep,
            src: Annotated[str, Query(max_length=1024, pattern=ENTRY_SCHEMA,
                                      description="The entry, /prearchive/projects/P/TS/S.")],
            overwrite: Literal["none", "append", "delete"] = "none",
            quarantine: Literal["true", "false"] | None = None,
            trigger: Annotated[Literal["true", "false"], Query(alias="triggerPipelines")] = "true",
            project: Annotated[str | None, Query(pattern=PROJECT_ID, description=(
                "The entry's own project (archiving into another is a move first)."))] = None,
            subject: Annotated[str | None, Query(pattern=PROJECT_ID, description=(
                "Archive it under this subject."))] = None,
            session: Annotated[str | None, Query(pattern=PROJECT_ID, description=(
                "Archive it with this session label."))] = None,
    ) -> Response:
        found = ENTRY.match(src)
        if project is not None and found is not None and project != found["project"]:
            return PlainTextResponse(
                f"The entry is in project {found['project']}; move it to {project} first "
                "(/data/services/prearchive/move), then archive it.\n", status_code=400)
        row = await command(caller, ArchiveBody(
            entry=src, overwrite=overwrite,
            quarantine=None if quarantine is None else quarantine == "true",
            trigger_pipelines=trigger == "true", subject=subject, session=session))
        return as_text(row, ("archived",), "Still archiving.")

    @api.post("/data/services/prearchive/delete", tags=["xnat"],
              response_class=PlainTextResponse, summary="XNAT: delete a prearchive entry",
              responses={code: {"description": what, **PLAIN} for code, what in (
                  (200, "Deleted."), (400, "Bad parameters."), (401, "Not logged in."),
                  (403, "Not allowed there."), (404, "No such entry."),
                  (409, "Not deleted, with why."), (504, "Still deleting."))})
    async def xnat_delete_service(
            caller: CallerDep,
            src: Annotated[str, Query(max_length=1024, pattern=ENTRY_SCHEMA)],
    ) -> Response:
        found = ENTRY.match(src)
        if found is None:
            return PlainTextResponse(f"Not a prearchive entry: {src!r}.\n", status_code=400)
        return await xnat_delete(found["project"], found["timestamp"], found["label"], caller)

    @api.post("/api/v1/prearchive/move", tags=["prearchive"], operation_id="move_entry",
              summary="Move a prearchive entry to another project (out of Unassigned)",
              responses=problem_responses(400, 401, 403, 404, 409, 422))
    async def move(body: MoveBody, caller: CallerDep) -> JSONResponse:
        row = await command(caller, ArchiveBody(entry=body.entry), "move", body.project)
        return as_json(row, body.entry, ("moved",), "Not moved")

    @api.post("/data/services/prearchive/move", tags=["xnat"], response_class=PlainTextResponse,
              summary="XNAT: move a prearchive entry to another project",
              responses={code: {"description": what, **PLAIN} for code, what in (
                  (200, "The entry's new address."), (400, "Bad parameters."),
                  (401, "Not logged in."), (403, "Not allowed there."),
                  (404, "No such entry or project."), (409, "Not moved."),
                  (504, "Still moving."))})
    async def xnat_move(
            caller: CallerDep,
            src: Annotated[str, Query(max_length=1024, pattern=ENTRY_SCHEMA)],
            new_project: Annotated[str, Query(alias="newProject", pattern=PROJECT_ID)],
    ) -> Response:
        row = await command(caller, ArchiveBody(entry=src), "move", new_project)
        return as_text(row, ("moved",), "Still moving.")

    @api.post("/api/v1/prearchive/rebuild", tags=["prearchive"], operation_id="rebuild_entry",
              summary="Rebuild a prearchive entry: build a receiving one now (archived if its "
              "project auto-archives), look again at one in CONFLICT or ERROR",
              responses=problem_responses(400, 401, 403, 404, 409, 422))
    async def rebuild(body: EntryBody, caller: CallerDep) -> JSONResponse:
        row = await command(caller, ArchiveBody(entry=body.entry), "rebuild")
        return as_json(row, body.entry, ("rebuilt", "archived"), "Not rebuilt")

    @api.post("/data/services/prearchive/rebuild", tags=["xnat"],
              response_class=PlainTextResponse, summary="XNAT: rebuild a prearchive entry",
              responses={code: {"description": what, **PLAIN} for code, what in (
                  (200, "Where the session is now."), (400, "Bad parameters."),
                  (401, "Not logged in."), (403, "Not allowed there."),
                  (404, "No such entry."), (409, "In CONFLICT or ERROR, with why."),
                  (504, "Still building."))})
    async def xnat_rebuild(
            caller: CallerDep,
            src: Annotated[str, Query(max_length=1024, pattern=ENTRY_SCHEMA)],
    ) -> Response:
        row = await command(caller, ArchiveBody(entry=src), "rebuild")
        return as_text(row, ("rebuilt", "archived"), "Still building.")

    # --- the archive: sessions, quarantine ---------------------------------------------------

    def session_view(r: ArchivedSession) -> dict:
        return {"uri": r.uri, "project": r.project, "subject": r.subject, "session": r.label,
                "study_uid": r.study_uid, "modalities": r.modalities or [],
                "quarantined": r.quarantined, "archived_at": r.archived_at.isoformat()}

    @api.get("/api/v1/projects/{project}/sessions", tags=["archive"],
             operation_id="list_sessions",
             summary="The project's archived sessions (quarantined ones say so)",
             responses=problem_responses(401, 403, 422))
    async def list_sessions(project: str, caller: CallerDep) -> JSONResponse:
        visible(caller, project)
        async with svc.db.session() as session:
            rows = (await session.exec(select(ArchivedSession).where(
                ArchivedSession.project == project).order_by(
                col(ArchivedSession.subject), col(ArchivedSession.label)))).all()
        return json_response([session_view(r) for r in rows])

    @api.post("/api/v1/projects/{project}/subjects/{subject}/sessions/{session}/release",
              tags=["archive"], operation_id="release_session",
              summary="Lift a session's quarantine (project owners)",
              responses=problem_responses(401, 403, 404, 422))
    async def release(project: str, subject: str, session: str, caller: CallerDep
                      ) -> JSONResponse:
        if not caller.may(Action.manage, project):
            raise forbidden(f"Only an owner of project {project!r} releases its sessions.")
        key = f"{project}/{subject}/{session}"
        async with svc.db.session() as db:
            row = await db.get(ArchivedSession, key)
            if row is None:
                return problem(404, "Not Found", f"No archived session {key}.")
            if row.quarantined:
                await svc.outbox.add(db, ReleaseRequested(
                    request_id=uuid.uuid4().hex, session_key=key, username=caller.username,
                    requested_at=datetime.now(UTC)))
        deadline = asyncio.get_running_loop().time() + settings.xnat_import_wait_seconds
        while row is not None and row.quarantined:
            if asyncio.get_running_loop().time() > deadline:
                return json_response(session_view(row), 202)
            await asyncio.sleep(0.2)
            async with svc.db.session() as db:
                row = await db.get(ArchivedSession, key)
        assert row is not None
        return json_response(session_view(row))

    async def delete_command(caller: Caller, project: str, timestamp: str, session: str
                             ) -> ArchiveRequest:
        try:
            body = ArchiveBody(entry=f"/data/prearchive/projects/{project}/{timestamp}/{session}")
        except ValueError as e:  # a name no entry can have
            raise NotAllowed(404, f"No prearchive entry {project}/{timestamp}/{session}.") from e
        return await entry_command(svc, settings, caller, body, "delete")

    def visible(caller: Caller, project: str | None) -> None:
        if project is not None and not caller.may(Action.view, project):
            raise forbidden(f"You may not see project {project!r}.")

    async def entries(caller: Caller, project: str | None) -> list[PrearchiveEntry]:
        async with svc.db.session() as session:
            query = select(PrearchiveEntry).order_by(col(PrearchiveEntry.project),
                                                     col(PrearchiveEntry.timestamp))
            if project is not None:
                query = query.where(PrearchiveEntry.project == project)
            rows = (await session.exec(query)).all()
        return [r for r in rows if caller.may(Action.view, r.project)]

    def entry_view(r: PrearchiveEntry) -> dict:
        return {"entry": r.uri, "project": r.project, "timestamp": r.timestamp,
                "subject": r.subject, "session": r.label, "state": r.state,
                "reason": r.reason, "files": r.files, "uploads": r.uploads,
                "updated_at": r.updated_at.isoformat()}

    @api.get("/api/v1/projects/{project}/prearchive", tags=["prearchive"],
             operation_id="list_prearchive", summary="The project's prearchive entries",
             responses=problem_responses(401, 403, 422))
    async def list_entries(project: str, caller: CallerDep) -> JSONResponse:
        visible(caller, project)
        return json_response([entry_view(r) for r in await entries(caller, project)])

    @api.delete("/api/v1/projects/{project}/prearchive/{timestamp}/{session}",
                tags=["prearchive"], operation_id="delete_prearchive_entry",
                summary="Delete a prearchive entry (its files go too)",
                responses=problem_responses(401, 403, 404, 422))
    async def delete_entry(project: str, timestamp: Annotated[str, Path(pattern=TIMESTAMP)],
                           session: str, caller: CallerDep) -> Response:
        try:
            row = await delete_command(caller, project, timestamp, session)
        except NotAllowed as e:
            if e.status == 403:
                raise forbidden(e.message) from e
            return problem(e.status, "Not Found", e.message)
        if row.state == "deleted":
            return Response(status_code=204)
        if row.state == "pending":
            return json_response({"request": row.id, "state": row.state}, 202)
        return problem(404, "Not Found", (row.reason or {}).get("message", "No such entry."))

    # XNAT's prearchive listing (a ResultSet, as its clients read it) and deletion.
    @api.get("/data/prearchive/projects", tags=["xnat"],
             summary="XNAT: every prearchive entry the caller may see",
             responses={401: {"description": "Not logged in.", **PLAIN}})
    @api.get("/data/prearchive/projects/{project}", tags=["xnat"],
             summary="XNAT: a project's prearchive entries",
             responses={401: {"description": "Not logged in.", **PLAIN},
                        403: {"description": "Not allowed to see the project.", **PLAIN}})
    async def xnat_entries(caller: CallerDep, project: str | None = None) -> JSONResponse:
        visible(caller, project)
        rows = [{"project": r.project, "timestamp": r.timestamp, "subject": r.subject,
                 "folderName": r.label, "name": r.label, "status": r.state,
                 "url": xnat_entry_url(r.uri),
                 "lastmod": r.updated_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                 "uploaded": r.updated_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                 "reason": (r.reason or {}).get("message", "")}
                for r in await entries(caller, project)]
        return JSONResponse({"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})

    @api.delete("/data/prearchive/projects/{project}/{timestamp}/{session}", tags=["xnat"],
                response_class=PlainTextResponse, summary="XNAT: delete a prearchive entry",
                responses={code: {"description": what, **PLAIN} for code, what in (
                    (200, "Deleted."), (400, "Not an entry's address."), (401, "Not logged in."),
                    (403, "Not allowed there."), (404, "No such entry."),
                    (504, "Still deleting."))})
    async def xnat_delete(project: str, timestamp: Annotated[str, Path(pattern=TIMESTAMP)],
                          session: str, caller: CallerDep) -> Response:
        try:
            row = await delete_command(caller, project, timestamp, session)
        except NotAllowed as e:
            return PlainTextResponse(e.message + "\n", status_code=e.status)
        if row.state == "deleted":
            return PlainTextResponse("", status_code=200)
        if row.state == "pending":
            return PlainTextResponse("Still deleting.\n", status_code=504)
        return PlainTextResponse((row.reason or {}).get("message", "No such entry.") + "\n",
                                 status_code=404)

    return api
