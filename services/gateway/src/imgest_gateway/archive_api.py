"""Archiving a prearchive entry (XNAT's commit): `POST /api/v1/prearchive/archive` and XNAT's
`POST /data/services/archive?src=…`. The gateway publishes archive.requested and waits, within
a bound, for the importer's archive.finished."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from imgest_contracts import ArchiveRequested
from imgest_runtime.service import Service, problem, problem_responses
from pydantic import BaseModel, ConfigDict, Field

from .auth import CallerDep, forbidden
from .identity import Action, Caller
from .models import ArchiveRequest
from .settings import Settings
from .views import json_response

ENTRY = re.compile(r"^(?:/data)?/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>\d{8}_\d{9})"
                   r"/(?P<label>[^/]+)/?$")


class ArchiveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entry: str = Field(..., max_length=1024, description="The entry's address, "
                       "/data/prearchive/projects/P/yyyyMMdd_HHmmssSSS/SESSION.")
    overwrite: Literal["none", "append", "delete"] = "none"
    quarantine: bool | None = None
    trigger_pipelines: bool = True


class NotAllowed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


async def archive_entry(svc: Service, settings: Settings, caller: Caller, body: ArchiveBody
                        ) -> ArchiveRequest:
    """Publishes the request and waits for its answer (state `pending` past the bound)."""
    found = ENTRY.match(body.entry)
    if not found:
        raise NotAllowed(400, f"Not a prearchive entry: {body.entry!r} (expected "
                         "/data/prearchive/projects/P/yyyyMMdd_HHmmssSSS/SESSION).")
    project = found["project"]
    if not (caller.may(Action.upload, project) and caller.may(Action.view, project)):
        raise NotAllowed(403, f"You may not archive sessions of project {project!r}.")
    now = datetime.now(UTC)
    request = ArchiveRequest(id=uuid.uuid4().hex, project=project, username=caller.username,
                             session_key=f"prearchive/{project}/{found['timestamp']}/"
                             f"{found['label']}", state="pending", created_at=now, updated_at=now)
    async with svc.db.session() as session:
        session.add(request)
        await svc.outbox.add(session, ArchiveRequested(
            request_id=request.id, session_key=request.session_key, username=caller.username,
            overwrite=body.overwrite, quarantine=body.quarantine,
            trigger_pipelines=body.trigger_pipelines, requested_at=now))
    deadline = asyncio.get_running_loop().time() + settings.xnat_import_wait_seconds
    while True:
        async with svc.db.session() as session:
            row = await session.get(ArchiveRequest, request.id)
        assert row is not None
        if row.state != "pending" or asyncio.get_running_loop().time() > deadline:
            return row
        await asyncio.sleep(0.2)


def archive_router(svc: Service, settings: Settings) -> APIRouter:
    api = APIRouter()

    @api.post("/api/v1/prearchive/archive", tags=["prearchive"], operation_id="archive_entry",
              summary="Archive a prearchive entry (with overwrite rules); waits for the result",
              responses=problem_responses(400, 401, 403, 404, 409, 422))
    async def archive(body: ArchiveBody, caller: CallerDep) -> JSONResponse:
        try:
            row = await archive_entry(svc, settings, caller, body)
        except NotAllowed as e:
            if e.status == 403:
                raise forbidden(e.message) from e
            return problem(e.status, "Bad entry", e.message)
        view = {"request": row.id, "entry": body.entry, "state": row.state, "uri": row.uri,
                "reason": row.reason}
        if row.state == "archived":
            return json_response(view)
        if row.state == "pending":
            return json_response(view, 202)
        status = 409 if row.state == "conflict" else 404 if (row.reason or {}).get(
            "code") == "prearchive.not_found" else 409
        return problem(status, "Not archived", (row.reason or {}).get("message", ""), **view)

    @api.post("/data/services/archive", tags=["xnat"], response_class=PlainTextResponse,
              summary="XNAT's archive service: commit a prearchive entry named by src")
    async def xnat_archive(request: Request, caller: CallerDep) -> Response:
        params = {k.lower(): v for k, v in request.query_params.items()}
        flag = {"true": True, "false": False}
        try:
            row = await archive_entry(svc, settings, caller, ArchiveBody(
                entry=params.get("src", ""), overwrite=params.get("overwrite", "none"),
                quarantine=flag.get(params.get("quarantine", "").lower()),
                trigger_pipelines=params.get("triggerpipelines", "true").lower() != "false"))
        except NotAllowed as e:
            return PlainTextResponse(e.message + "\n", status_code=e.status)
        except ValueError as e:  # a bad overwrite value
            return PlainTextResponse(f"{e}\n", status_code=400)
        if row.state == "archived":
            return PlainTextResponse(f"{row.uri}\n")
        message = (row.reason or {}).get("message", "Still archiving.")
        status = {"pending": 504, "conflict": 409}.get(row.state, 404 if (
            row.reason or {}).get("code") == "prearchive.not_found" else 409)
        return PlainTextResponse(f"{message}\n", status_code=status)

    return api
