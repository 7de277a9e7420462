"""XNAT's import service and login endpoints, so tools written for XNAT work unchanged.

`POST /data/services/import` stores the body (raw, or one file of a multipart form), hands it
to the pipeline like any upload, and waits (within `xnat_import_wait_seconds`) for the
importer's outcome: 200 with the `/data/prearchive/…` or `/data/archive/…` URI of each session,
one per line. Errors are plain text with XNAT's status codes, not problem+json.
"""

import asyncio
import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from imgest_contracts import ImportOptions
from imgest_runtime.db import any_of
from imgest_runtime.service import Service, allowed_methods
from pydantic import ValidationError
from sqlmodel import col, select
from starlette.exceptions import HTTPException

from .auth import SESSION_COOKIE, CallerDep, close_login_session, credentials, open_login_session
from .domain import BadFilename, safe_filename
from .identity import PROJECT_ID, UNASSIGNED, Action, Caller
from .models import PrearchiveEntry, Project, Upload, UploadObject
from .settings import Settings
from .uploads_api import OPEN, TERMINAL, Refused, submit, submit_one_file
from .waiting import Waiters
from .xnat_model import SCHEMAS

XNAT_VERSION = "1.8.10"  # the API generation imgest answers like (clients check it)
HANDLERS = {"si": "SI", "dicom-zip": "DICOM-zip", "gradual-dicom": "gradual-DICOM"}
_DEST = re.compile(
    r"^(?:/data)?/(?P<where>prearchive|archive)"
    r"(?:/projects/(?P<project>[^/]+)"
    r"(?:/(?P<timestamp>\d{8}_\d{6,9})/(?P<entry>[^/]+)"
    r"|/subjects/(?P<subject>[^/]+)(?:/experiments/(?P<session>[^/]+))?)?)?/?$")
_TRUE = {"true", "1", "yes", "y", "on"}
_ID = PROJECT_ID.strip("^$")  # a project's ID, a subject's or session's label (unanchored)


class XnatError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


def text(status: int, body: str, **headers: str) -> PlainTextResponse:
    return PlainTextResponse(body + ("\n" if body and not body.endswith("\n") else ""),
                             status_code=status, headers=headers)


def first(params: dict[str, str], *names: str) -> str | None:
    """XNAT accepts several spellings of a parameter (PROJECT_ID, project); case-insensitive."""
    lowered = {k.lower(): v for k, v in params.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value not in (None, ""):
            return value
    return None


def flag(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() in _TRUE


def import_options(params: dict[str, str]) -> tuple[ImportOptions, str, bool]:
    """XNAT's query parameters → (the upload's options, its import handler, Ignore-Unparsable).
    Pure: raises XnatError for what XNAT refuses."""
    handler_name = first(params, "import-handler", "import_handler") or "DICOM-zip"
    handler = HANDLERS.get(handler_name.lower())
    if handler is None:
        raise XnatError(404, f"Unknown import handler {handler_name!r}; imgest has "
                        f"{', '.join(HANDLERS.values())}.")
    project = first(params, "PROJECT_ID", "project")
    subject = first(params, "SUBJECT_ID", "subject")
    session = first(params, "EXPT_LABEL", "session", "expt_label")
    dest = first(params, "dest")
    if dest is not None:
        match = _DEST.match(dest)
        if match is None:
            raise XnatError(400, f"Bad dest {dest!r}: /prearchive[/projects/P[/TIMESTAMP/"
                            "SESSION]] or /archive[/projects/P[/subjects/S[/experiments/E]]]")
        project = project or match["project"]
        subject = subject or match["subject"]
        session = session or match["session"] or match["entry"]
    for name, value in (("project", project), ("subject", subject), ("session", session)):
        if value is not None and not re.fullmatch(PROJECT_ID, value):
            raise XnatError(400, f"Bad {name} label {value!r}: letters, digits, _ and - only.")
    if project == UNASSIGNED:
        project = None
    overwrite = (first(params, "overwrite") or "none").lower()
    if overwrite not in ("none", "append", "delete"):
        raise XnatError(400, f"overwrite is none, append or delete (got {overwrite!r}).")
    auto_archive = flag(first(params, "AA", "auto-archive", "autoArchive"))
    if dest is not None and dest.lstrip("/").removeprefix("data/").startswith("archive"):
        auto_archive = True if auto_archive is None else auto_archive
    try:
        options = ImportOptions(
            project=project, subject=subject, session=session,
            dest=dest if dest is None else "/" + dest.lstrip("/").removeprefix("data/"),
            overwrite=overwrite,  # type: ignore[arg-type]
            quarantine=True if flag(first(params, "quarantine")) else None,
            auto_archive=auto_archive,
            trigger_pipelines=flag(first(params, "triggerPipelines", "tiggerPipelines")) is not False,
            import_handler=handler)
    except ValidationError as e:
        raise XnatError(400, f"Bad import parameters: {e}") from e
    return options, handler, bool(flag(first(params, "Ignore-Unparsable", "ignore-unparsable")))


def outcome_response(upload: Upload, handler: str, ignore_unparsable: bool) -> PlainTextResponse:
    """What XNAT answers for a finished import: the sessions' URIs, or its error codes."""
    summary = upload.summary or {}
    sessions = summary.get("sessions") or []
    failures = summary.get("failures") or []
    conflicts = [s for s in sessions if s.get("state") == "conflict"]
    placed = [s["uri"] for s in sessions
              if s.get("state") in ("archived", "prearchived", "receiving")]
    reasons = "\n".join(f"{f['path']}: {f['reason']['message']}" for f in failures)
    if conflicts:
        return text(409, "\n".join(
            f"{(s.get('reason') or {}).get('message', 'Session exists')} Waiting in the "
            f"prearchive as CONFLICT: {s['uri']}" for s in conflicts)
            + ("\n" + reasons if reasons else ""))
    if not placed:
        return text(400, "Nothing could be imported.\n" + reasons)
    if handler == "SI" and len(placed) > 1:
        return text(400, f"The SI handler takes one session; this upload made {len(placed)}:\n"
                    + "\n".join(placed))
    if failures and not ignore_unparsable:
        return text(400, "Some files could not be imported (Ignore-Unparsable=true skips "
                    "them); these sessions were:\n" + "\n".join(placed) + "\n" + reasons)
    if len(placed) == 1:
        return text(200, placed[0])
    return PlainTextResponse("\r\n".join(placed) + "\r\n", media_type="text/uri-list")

# How long an answer waits for the prearchive to list the entries the importer named.
ENTRY_SHOWN_SECONDS = 3.0


def xnat_router(svc: Service, settings: Settings, waiters: Waiters) -> APIRouter:
    api = APIRouter(tags=["XNAT compatibility"], responses={
        status: {"description": phrase, "content": {"text/plain": {}}}
        for status, phrase in ((400, "Bad Request"), (401, "Unauthorized"),
                               (403, "Forbidden"), (404, "Not Found"), (409, "Conflict"),
                               (413, "Content Too Large"), (503, "Store unavailable"),
                               (504, "Still processing"))})

    # --- logging in ------------------------------------------------------------------------------

    async def login(username: str, password: str) -> Response:
        if not username or not password:
            return text(401, "Login attempt failed. Please try again.")
        caller = await credentials(svc.db, username, password)
        if caller is None:
            return text(401, "Login attempt failed. Please try again.")
        session_id = await open_login_session(svc.db, caller.username)
        response = PlainTextResponse(session_id)  # bare, as XNAT sends it: clients use it as is
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="lax")
        return response

    @api.put("/data/services/auth", summary="Log in (form username, password): a session id",
             response_class=PlainTextResponse)
    async def services_auth(username: Annotated[str, Form(max_length=64)] = "",
                            password: Annotated[str, Form(max_length=1024)] = "") -> Response:
        return await login(username, password)

    @api.post("/data/services/auth", summary="Log in (the same, as POST)",
              response_class=PlainTextResponse)
    async def services_auth_post(username: Annotated[str, Form(max_length=64)] = "",
                                 password: Annotated[str, Form(max_length=1024)] = ""
                                 ) -> Response:
        return await login(username, password)

    @api.get("/data/auth", summary="Who is logged in", response_class=PlainTextResponse)
    async def data_auth(caller: CallerDep) -> Response:
        return text(200, f"User '{caller.username}' is logged in")

    @api.get("/data/JSESSION", summary="A session id for the caller (Basic auth → cookie)",
             response_class=PlainTextResponse)
    async def get_jsession(request: Request, caller: CallerDep) -> Response:
        existing = request.cookies.get(SESSION_COOKIE)
        if existing and not request.headers.get("authorization"):
            return PlainTextResponse(existing)  # the session the caller came with
        session_id = await open_login_session(svc.db, caller.username)
        response = PlainTextResponse(session_id)  # bare, as XNAT sends it: clients use it as is
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="lax")
        return response

    @api.delete("/data/JSESSION", summary="Log out (ends the session)",
                response_class=PlainTextResponse)
    async def delete_jsession(request: Request) -> Response:
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            await close_login_session(svc.db, session_id)
        response = text(200, "")
        response.delete_cookie(SESSION_COOKIE)
        return response

    @api.get("/data/version", summary="The XNAT API version imgest answers like",
             response_class=PlainTextResponse)
    async def version() -> Response:
        return text(200, XNAT_VERSION)

    @api.get("/xapi/schemas", summary="The data-model schemas XNAT clients build their objects "
             "from")
    async def schemas(_caller: CallerDep) -> list[str]:
        return list(SCHEMAS)

    @api.get("/xapi/schemas/{schema}", summary="One schema (XML Schema)",
             response_class=Response, responses={200: {"content": {"application/xml": {}}},
                                                 404: {"description": "No such schema."}})
    async def schema(schema: str, _caller: CallerDep) -> Response:
        if schema not in SCHEMAS:
            return text(404, f"No schema {schema!r}; imgest serves {', '.join(SCHEMAS)}.")
        return Response(SCHEMAS[schema], media_type="application/xml")

    @api.get("/data/search/elements", summary="The data types XNAT's search may query: none "
             "(imgest has no XNAT search; clients read this list when they connect)")
    async def search_elements(_caller: CallerDep) -> JSONResponse:
        return JSONResponse({"ResultSet": {"Result": [], "totalRecords": "0"}})

    # --- importing -------------------------------------------------------------------------------

    @api.post("/data/services/import", summary="XNAT's import service",
              response_class=PlainTextResponse,
              openapi_extra={"requestBody": {"content": {
                  "application/octet-stream": {"schema": {"type": "string",
                                                          "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                     "properties": {"file": {
                                                         "type": "string",
                                                         "format": "binary"}}}}}},
                  "responses": {"200": {"description": "The session URI(s).", "content": {
                      "text/plain": {}, "text/uri-list": {}}}}})
    async def import_(request: Request, caller: CallerDep) -> Response:
        params = dict(request.query_params)
        try:
            options, handler, ignore_unparsable = import_options(params)
            # No project named: the headers route it, to a project the caller may send into,
            # else to Unassigned (XNAT's rule; only administrators see Unassigned).
            if options.project is not None and not caller.may(Action.upload, options.project):
                raise XnatError(403, f"You may not import into project {options.project!r}.")
            if options.project is not None:
                async with svc.db.session() as session:
                    if await session.get(Project, options.project) is None:
                        raise XnatError(404, f"No project {options.project!r}.")
            upload_id = await _receive(request, caller, options, params)
        except XnatError as e:
            return text(e.status, e.text)
        except Refused as refused:
            return text(refused.response.status_code, refused.args[0])
        listener = first(params, "http-session-listener")
        clock = asyncio.get_running_loop().time
        deadline = clock() + settings.xnat_import_wait_seconds
        shown_by = None
        while True:
            async with svc.db.session() as session:
                upload = await session.get(Upload, upload_id)
                assert upload is not None
                unseen = await _entries_not_shown(session, upload) if (
                    upload.state in TERMINAL) else None
            if unseen == 0 or (unseen and shown_by is not None and clock() > shown_by):
                return outcome_response(upload, handler, ignore_unparsable)
            if unseen and shown_by is None:
                # The outcome and the entries' states arrive as two events, in either order;
                # answering once the prearchive lists its entries lets a client that reads it
                # next see them (a moment's wait at most: they may have gone since).
                shown_by = clock() + ENTRY_SHOWN_SECONDS
            if clock() > deadline:
                return text(504, f"Still processing after {settings.xnat_import_wait_seconds:.0f}"
                            f"s; follow it at /api/v1/uploads/{upload_id}"
                            + (f" or /data/status/{listener}" if listener else ""),
                            Location=f"/api/v1/uploads/{upload_id}")
            await waiters.wait(upload_id, 0.25)  # (woken by news; looks again if it missed it)

    async def _entries_not_shown(session, upload: Upload) -> int:
        """How many prearchive entries the upload's outcome names that this gateway's view of
        the prearchive does not list yet."""
        uris = {s["uri"] for s in (upload.summary or {}).get("sessions", [])
                if s["uri"].startswith("/data/prearchive/")}
        if not uris:
            return 0
        shown = (await session.exec(select(PrearchiveEntry.uri).where(
            any_of(col(PrearchiveEntry.uri), uris)))).all()
        return len(uris - set(shown))

    async def _receive(request: Request, caller: Caller, options: ImportOptions,
                       params: dict[str, str]) -> str:
        """Stores what came (the body, one multipart file, or the caller's earlier upload named
        by `src`) as a submitted upload; returns its id."""
        listener = first(params, "http-session-listener")
        src = first(params, "src")
        async with svc.db.session() as session:
            if src is not None:
                upload_id = src.rstrip("/").rsplit("/", 1)[-1]
                upload = await session.get(Upload, upload_id, with_for_update=True)
                if upload is None or upload.uploader != caller.username or upload.state != OPEN:
                    raise XnatError(404, f"No open upload of yours named by src={src!r}.")
                objects = list((await session.exec(select(UploadObject).where(
                    UploadObject.upload_id == upload_id,
                    UploadObject.state == "added"))).all())
                if not objects:
                    raise XnatError(400, f"Upload {upload_id} (src) holds no files.")
                upload.project = options.project
                upload.options = _stored_options(options, listener)
                await submit(svc, session, upload, objects)
                return upload_id
        upload_id = uuid.uuid4().hex
        raw_name = first(params, "filename") or _name_for(request.headers.get("content-type", ""))
        await submit_one_file(svc, settings, request, upload_id, caller, options.project,
                              _stored_options(options, listener), lambda name: _key(
                                  upload_id, raw_name if name is None else name or "upload"))
        return upload_id

    @api.get("/data/status/{listener}", summary="Progress of an import, by its "
             "http-session-listener id", response_class=PlainTextResponse)
    async def status(listener: str, caller: CallerDep) -> Response:
        async with svc.db.session() as session:
            upload = (await session.exec(select(Upload).where(
                col(Upload.options)["listener"].astext == listener,
                Upload.uploader == caller.username))).first()
        if upload is None:
            return text(404, f"No import of yours is listened to as {listener!r}.")
        counts = (upload.summary or {}).get("counts") or {}
        return text(200, f"{upload.state}" + "".join(f" {k}={v}" for k, v in counts.items()))

    return api


def _stored_options(options: ImportOptions, listener: str | None) -> dict:
    stored = options.model_dump(mode="json", exclude_defaults=True, exclude={"project"})
    if listener:
        stored["listener"] = listener
    return stored


def _key(upload_id: str, name: str) -> str:
    try:
        return f"staging/{upload_id}/{safe_filename(name)}"
    except BadFilename:
        return f"staging/{upload_id}/upload"


def _name_for(content_type: str) -> str:
    """A raw body has no name; its type says what it is (the unpacker sniffs it anyway)."""
    return {"application/zip": "upload.zip", "application/x-zip-compressed": "upload.zip",
            "application/x-tar": "upload.tar", "application/gzip": "upload.tar.gz",
            "application/x-gzip": "upload.tar.gz", "application/dicom": "upload.dcm",
            }.get(content_type.split(";")[0].strip().lower(), "upload")


class XnatIds:
    """ASGI middleware: XNAT paths take a subject's or session's ID (`xnat_model.xnat_id`,
    as xnatpy builds its paths from IDs) where they take its label: `/data/projects/P/subjects/
    P.S/experiments/P.E/…` is read as `…/subjects/S/experiments/E/…`, and `/data/subjects/P.S`
    as `/data/projects/P/subjects/S`. An ID of another project stays as it is (no such label:
    a 404)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "." in scope["path"] and (
                scope["path"].startswith(("/data/", "/REST/"))):
            path = labelled_path(scope["path"])
            if path != scope["path"]:
                scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


_BY_ID = re.compile(rf"^(/(?:data|REST))/subjects/({_ID})\.({_ID})(?=/|$)")
_IN_PROJECT = re.compile(rf"^(/(?:data|REST)(?:/archive)?/projects/({_ID})/)(.*)$")


def labelled_path(path: str) -> str:
    """The path with the IDs of its project's subjects and sessions as their labels."""
    path = _BY_ID.sub(r"\1/projects/\2/subjects/\3", path)
    if not (found := _IN_PROJECT.match(path)):
        return path
    head, project, rest = found.groups()
    parts = rest.split("/")
    for i in range(1, len(parts)):
        if parts[i - 1] in ("subjects", "experiments") and parts[i].startswith(project + "."):
            parts[i] = parts[i][len(project) + 1:]
    return head + "/".join(parts)


def plain_http_errors(app) -> None:
    """Errors under /data/ (the XNAT endpoints) are plain text, as XNAT clients read them;
    everything else keeps problem+json."""
    problem_handler = app.exception_handlers[HTTPException]

    async def handler(request: Request, error: HTTPException) -> Response:
        if request.url.path.startswith("/data/"):
            headers = dict(error.headers or {})
            if error.status_code == 405:
                headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
            return text(error.status_code, str(error.detail), **headers)
        return await problem_handler(request, error)

    app.add_exception_handler(HTTPException, handler)
    invalid_handler = app.exception_handlers[RequestValidationError]

    async def invalid(request: Request, error: RequestValidationError) -> Response:
        if request.url.path.startswith("/data/"):
            return text(400, "Bad request: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))
        return await invalid_handler(request, error)

    app.add_exception_handler(RequestValidationError, invalid)
