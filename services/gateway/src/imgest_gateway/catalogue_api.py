"""The archive as its users read it: a project's subjects and sessions, a session with its scans
and files (and what the metadata service read of each), one file's bytes, a whole session as a
zip; a prearchive entry's details and zip. JSON under /api/v1; XNAT's paths and ResultSets under
/data (and /data/archive), with XNAT's plain-text errors.

The catalogue is the importer's: the gateway asks its read-only API over HTTP and decides who may
see what, as for every other project resource. The bytes it streams itself from the store, a
chunk at a time: no file or zip is ever held whole in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import mimetypes
import re
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, BinaryIO, Literal
from urllib.parse import quote

import httpx
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from imgest_runtime.service import Service, problem_responses
from imgest_runtime.store import CHUNK, ObjectNotFound, ObjectStore, StoreError
from starlette.exceptions import HTTPException

from .archive_api import PLAIN, TIMESTAMP, xnat_entry_url
from .auth import CallerDep, forbidden
from .identity import PROJECT_ID, Action, Caller
from .identity_api import visible_project, visible_projects
from .settings import Settings
from .views import json_response
from .xnat_model import (
    project_items,
    scan_items,
    session_items,
    subject_items,
    xnat_id,
    xsi_type,
)

LABEL = PROJECT_ID  # subjects, sessions, scans and resources have XNAT's ID characters too
ProjectId = Annotated[str, Path(pattern=PROJECT_ID, description="The project's ID.")]
SubjectLabel = Annotated[str, Path(pattern=LABEL, description="The subject's label.")]
SessionLabel = Annotated[str, Path(pattern=LABEL, description="The session's label.")]
ScanId = Annotated[str, Path(pattern=LABEL, description="The scan's ID (a series number, or "
                             "an image's name).")]
ResourceLabel = Annotated[str, Path(pattern=LABEL, description="The resource: DICOM, PHOTO, "
                                    "SLIDE, or a multi-file slide's format (MRXS…).")]
Timestamp = Annotated[str, Path(pattern=TIMESTAMP, description="The entry's "
                                "yyyyMMdd_HHmmssSSS.")]
FileName = Annotated[str, Path(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$",
                               description="The file's name (a multi-file slide's parts carry "
                               "their folder: CMU-1/Data0000.dat).")]
ListFormat = Annotated[Literal["json"], Query(alias="format", description="json only.")]
ListOrZip = Annotated[Literal["json", "zip"], Query(alias="format",
                                                    description="json: a listing; zip: the files.")]
Zip = Annotated[Literal["zip"], Query(alias="format", description="zip (the only one served).")]
ItemOrZip = Annotated[Literal["json", "zip"], Query(alias="format", description="json: the "
                      "object as XNAT's items; zip: its files.")]

BYTES = {"schema": {"type": "string", "format": "binary"}}
ZIP = {"description": "A zip, streamed: `SESSION/scans/SCAN/resources/RESOURCE/files/NAME`, "
       "stored (not compressed), ZIP64 where sizes need it.",
       "content": {"application/zip": BYTES}}
FILE = {"description": "The file's bytes: application/dicom for DICOM, otherwise the type its "
        "name says. Single byte ranges (Range: bytes=…) are served.", "content": {"*/*": BYTES}}
ITEMS = {"description": "The object as XNAT's `format=json` sends it: `items`, each with "
         "`data_fields`, `meta` (its `xsi:type`) and `children`.",
         "content": {"application/json": {}}}
ITEMS_OR_ZIP = {"description": "The session as XNAT's items, its scans as children "
                "(format=json), or its files as a zip (format=zip).",
                "content": {"application/json": {}, "application/zip": BYTES}}
LISTING_OR_ZIP = {"description": "A ResultSet (format=json) or the files as a zip (format=zip).",
                  "content": {"application/json": {}, "application/zip": BYTES}}
PART = {"description": "The byte range asked for (Content-Range).", "content": {"*/*": BYTES}}
PLAIN_ERRORS = {
    400: "Bad request: a name no session, scan or file can have, or a format not served.",
    401: "Not logged in.", 403: "Not allowed to see the project.",
    404: "No such project, subject, session, scan, resource or file.",
    409: "The subject label is in more than one of the caller's projects.",
    416: "The byte range lies past the end of the file.",
    503: "The catalogue or the store does not answer; try again shortly."}


def plain_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": PLAIN_ERRORS[status], **PLAIN} for status in statuses}


def visible(caller: Caller, project: str) -> None:
    """Unassigned is seen by administrators only (`may` says so)."""
    if not caller.may(Action.view, project):
        raise forbidden(f"You may not see project {project!r}.")


class Catalogue:
    """The importer's read-only catalogue API. What it does not have is a 404 with its words;
    no answer (or a broken one) is a 503: the archive is there, the reader is not."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.http: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def connected(self, _app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            self.http = http
            yield
        self.http = None

    async def get(self, path: str, **params: Any) -> Any:
        if self.http is None:
            raise HTTPException(503, "The gateway is starting or stopping; try again shortly.")
        try:
            response = await self.http.get(path, params={k: v for k, v in params.items()
                                                         if v is not None})
        except httpx.HTTPError as e:
            raise unavailable(f"The catalogue does not answer ({type(e).__name__}).") from e
        if response.status_code == 404:
            raise HTTPException(404, response.json()["detail"])
        if response.status_code != 200:
            raise unavailable(f"The catalogue answered {response.status_code}.")
        return response.json()


def unavailable(why: str) -> HTTPException:
    return HTTPException(503, f"{why} Try again shortly.", headers={"Retry-After": "5"})


# --- views ---------------------------------------------------------------------------------------


def session_json(s: dict[str, Any], base: str, file_urls: bool) -> dict[str, Any]:
    """A session or prearchive entry with its scans and files, as the JSON API shows it."""
    view = {"uri": s["uri"], "project": s["project"], "subject": s["subject"],
            "session": s["label"], "study_uid": s["study_uid"], "modalities": s["modalities"],
            "created_at": s["created_at"], "updated_at": s["updated_at"]}
    if s["state"] == "archived":
        view["quarantined"] = s["quarantined"]
    else:
        view |= {"timestamp": s["timestamp"], "state": s["entry_state"], "reason": s["reason"]}
    view["download_url"] = f"{base}/download"
    view["scans"] = [
        {"scan": c["label"], "series_uid": c["series_uid"], "modality": c["modality"],
         "description": c["description"], "file_count": c["file_count"], "size": c["size"],
         "files": [{"name": f["name"], "resource": f["resource"], "size": f["size"],
                    "sha256": f["sha256"], "sop_instance_uid": f["sop_instance_uid"],
                    "metadata": f["metadata"],
                    **({"url": f"{base}/scans/{c['label']}/files/{quote(f['name'])}"}
                       if file_urls else {})} for f in c["files"]]}
        for c in s["scans"]]
    return view


def result_set(rows: list[dict[str, Any]]) -> JSONResponse:
    """XNAT's listing, as its clients read it (every value a string, as XNAT sends them)."""
    return JSONResponse({"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})


def xnat_date(value: str | None) -> str:
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value else ""


def files_of(s: dict[str, Any], resource: str | None = None) -> list[dict[str, Any]]:
    return [{**f, "scan": c["label"]} for c in s["scans"] for f in c["files"]
            if resource in (None, f["resource"])]


def files_in(s: dict[str, Any], scan: str, resource: str, name: str | None = None
             ) -> list[dict[str, Any]]:
    """The files of one resource of a session read with `scan` (and `file=name`) filters;
    none is a 404."""
    files = files_of(s, resource)
    if not files:
        raise HTTPException(404, f"No file {name!r} in resource {resource} of scan {scan}."
                            if name else f"No resource {resource} in scan {scan}.")
    return files


def scan_rows(s: dict[str, Any], base: str, typed: bool) -> list[dict[str, Any]]:
    """A session's scans as XNAT lists them; `typed` (the archive) names each one's xsiType,
    the prearchive does not (its client makes its own scan objects)."""
    return [{"ID": c["label"], "type": c["description"] or "",
             "series_description": c["description"] or "", "modality": c["modality"] or "",
             **({"xsiType": xsi_type(c["modality"], "Scan")} if typed else {}),
             "file_count": str(c["file_count"]), "URI": f"{base}/scans/{c['label']}"}
            for c in s["scans"]]


def resource_id(uri: str) -> str:
    """An archived resource's xnat_abstractresource_id: as XNAT's, a number unique across the
    site, for clients keep resources by it (xnat's did: with every scan's "DICOM" the same, a
    second scan's resource answered with the first one's files). From its address: stable."""
    return str(int(hashlib.sha256(uri.encode()).hexdigest()[:12], 16))


def resource_named(s: dict[str, Any], base: str, resource: str) -> str:
    """The label of the resource a path names by its label or (as clients do) by its ID."""
    if resource.isdigit():
        for label in {f["resource"] for f in files_of(s)}:
            if resource_id(f"{base}/{label}") == resource:
                return label
    return resource


def resource_rows(s: dict[str, Any], base: str, typed: bool) -> list[dict[str, Any]]:
    """A scan's resources (`base`: …/scans/SCAN/resources), with their file counts and sizes;
    the prearchive's are known by their labels (as XNAT's are)."""
    resources: dict[str, list[int]] = {}
    for f in files_of(s):
        resources.setdefault(f["resource"], []).append(f["size"])
    return [{"ID": (rid := resource_id(f"{base}/{r}") if typed else r),
             "xnat_abstractresource_id": rid, "label": r,
             **({"element_name": "xnat:resourceCatalog"} if typed else {}), "format": r,
             "file_count": str(len(sizes)), "file_size": str(sum(sizes)), "URI": f"{base}/{r}"}
            for r, sizes in sorted(resources.items())]


def file_rows(base: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Files as XNAT lists them (`base`: the session's address). No "digest": XNAT's is an MD5,
    which clients check downloads against; imgest keeps SHA-256."""
    return [{"Name": f["name"], "Size": str(f["size"]), "collection": f["resource"],
             "URI": f"{base}/scans/{f['scan']}/resources/{f['resource']}/files/"
                    f"{quote(f['name'])}", "sha256": f["sha256"]} for f in files]


# --- bytes ---------------------------------------------------------------------------------------


def requested_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range a Range header asks for, as (first, last); None for the whole file
    (no Range, or one served whole: several ranges, other units, a malformed one, RFC 9110
    §14.2). Raises ValueError for a range that starts past the end."""
    found = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if found is None or found[1] == found[2] == "":
        return None
    if found[1] == "":  # the last N bytes
        if int(found[2]) == 0 or size == 0:
            raise ValueError("an empty suffix")
        return max(0, size - int(found[2])), size - 1
    first = int(found[1])
    if found[2] != "" and int(found[2]) < first:
        return None
    if first >= size:
        raise ValueError("past the end")
    return first, size - 1 if found[2] == "" else min(int(found[2]), size - 1)


def attachment(name: str) -> str:
    """Content-Disposition (RFC 6266): an ASCII fallback, and the name itself encoded."""
    base = name.rsplit("/", 1)[-1]
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(base, safe='')}"


def media_type(f: dict[str, Any]) -> str:
    if f["sop_instance_uid"] or f["resource"] == "DICOM":
        return "application/dicom"
    return mimetypes.guess_type(f["name"])[0] or "application/octet-stream"


def stream_chunks(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        while block := stream.read(CHUNK):
            yield block


def range_chunks(store: ObjectStore, key: str, first: int, last: int) -> Iterator[bytes]:
    """Bytes first..last of an object, one ranged read per chunk."""
    while first <= last:
        block = store.read_range(key, first, min(CHUNK, last + 1 - first))
        if not block:
            raise StoreError(f"{key} ends before byte {first}")
        yield block
        first += len(block)


class _Sink(io.RawIOBase):
    """Where zipfile writes (a file it cannot seek in: it then writes data descriptors),
    handed on as response chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        self.written.append(bytes(b))  # (bytes, as a file's blocks are, are not copied)
        return len(b)

    def take(self) -> list[bytes]:
        """What was written since the last call, as one chunk (or none)."""
        written, self.written = self.written, []
        return [b"".join(written)] if written else []


def zip_chunks(store: ObjectStore, folder: str, files: list[dict[str, Any]], when: datetime
               ) -> Iterator[bytes]:
    """The files as a zip, laid out as XNAT's downloads are (FOLDER/scans/…/files/NAME). A store
    failure midway breaks the download off: the client sees a truncated zip, never a wrong
    one."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
        for f in files:
            member = zipfile.ZipInfo(f"{folder}/{f['path']}", when.timetuple()[:6])
            member.file_size = f["size"]  # past 4 GiB, zipfile writes ZIP64 fields from the start
            member.external_attr = 0o100644 << 16  # a regular file, readable once unzipped
            with store.open_once(f["object_key"]) as stream, zf.open(member, "w") as out:
                while block := stream.read(CHUNK):
                    out.write(block)
                    yield from sink.take()
            yield from sink.take()
    yield from sink.take()


def catalogue_router(svc: Service, settings: Settings) -> APIRouter:
    catalogue = Catalogue(settings.importer_url)
    api = APIRouter(lifespan=catalogue.connected)

    def store() -> ObjectStore:
        assert svc.store is not None  # opened before the gateway serves
        return svc.store

    async def archived(caller: Caller, project: str, subject: str, session: str,
                       **params: Any) -> dict[str, Any]:
        visible(caller, project)
        return await catalogue.get(f"/catalogue/sessions/{project}/{subject}/{session}",
                                   **params)

    async def subject_rows(caller: Caller, project: str) -> list[dict[str, Any]]:
        visible(caller, project)
        return await catalogue.get(f"/catalogue/projects/{project}/subjects")

    async def labelled(caller: Caller, subject: str) -> list[dict[str, Any]]:
        """The subjects of this label in the projects the caller may see."""
        return [r for r in await catalogue.get(f"/catalogue/subjects/{subject}")
                if caller.may(Action.view, r["project"])]

    async def entry(caller: Caller, project: str, timestamp: str, session: str,
                    **params: Any) -> dict[str, Any]:
        visible(caller, project)
        return await catalogue.get(f"/catalogue/sessions/prearchive/{project}/{timestamp}/"
                                   f"{session}", **params)

    async def file_response(request: Request, f: dict[str, Any]) -> Response:
        size, key = f["size"], f["object_key"]
        etag = f'"{f["sha256"]}"'
        headers = {"Accept-Ranges": "bytes", "ETag": etag,
                   "Content-Disposition": attachment(f["name"])}
        same = request.headers.get("if-range", etag) == etag  # else the whole file, as it is now
        try:
            wanted = requested_range(request.headers.get("range"), size) if same else None
        except ValueError as e:
            raise HTTPException(416, f"The file has {size} bytes; the range asked for starts "
                                "past its end.", headers={"Content-Range": f"bytes */{size}"}
                                ) from e
        if wanted is not None:
            first, last = wanted
            return StreamingResponse(
                range_chunks(store(), key, first, last), status_code=206,
                media_type=media_type(f), headers={
                    **headers, "Content-Length": str(last - first + 1),
                    "Content-Range": f"bytes {first}-{last}/{size}"})
        try:  # opened before answering: a missing object is still a clean error
            stream = await asyncio.to_thread(store().open_once, key)
        except ObjectNotFound as e:
            raise HTTPException(404, f"The bytes of {f['name']} are missing from the store."
                                ) from e
        except StoreError as e:
            raise unavailable("The store does not answer.") from e
        return StreamingResponse(stream_chunks(stream), media_type=media_type(f),
                                 headers={**headers, "Content-Length": str(size)})

    def zip_response(s: dict[str, Any], files: list[dict[str, Any]]) -> StreamingResponse:
        when = datetime.fromisoformat(s["updated_at"] or s["created_at"])
        return StreamingResponse(zip_chunks(store(), s["label"], files, when),
                                 media_type="application/zip",
                                 headers={"Content-Disposition": attachment(f"{s['label']}.zip")})

    # --- JSON ----------------------------------------------------------------------------------

    def session_base(project: str, subject: str, session: str) -> str:
        return f"/api/v1/projects/{project}/subjects/{subject}/sessions/{session}"

    @api.get("/api/v1/projects/{project}/subjects", tags=["archive"],
             operation_id="list_subjects", summary="The project's subjects (those with archived "
             "sessions)", responses=problem_responses(401, 403, 422, 503))
    async def subjects(project: ProjectId, caller: CallerDep) -> JSONResponse:
        return json_response([{"subject": r["label"], "sessions": r["sessions"],
                               "created_at": r["created_at"]}
                              for r in await subject_rows(caller, project)])

    @api.get("/api/v1/projects/{project}/subjects/{subject}/sessions/{session}",
             tags=["archive"], operation_id="get_session",
             summary="An archived session: its scans and their files, with their metadata",
             responses=problem_responses(401, 403, 404, 422, 503))
    async def session_details(project: ProjectId, subject: SubjectLabel, session: SessionLabel,
                              caller: CallerDep) -> JSONResponse:
        s = await archived(caller, project, subject, session)
        return json_response(session_json(s, session_base(project, subject, session), True))

    @api.get("/api/v1/projects/{project}/subjects/{subject}/sessions/{session}/scans/{scan}"
             "/files/{name:path}", tags=["archive"], operation_id="download_file",
             summary="One file of an archived session, as it was sent (byte ranges served)",
             response_class=Response, responses={
                 200: FILE, 206: PART, **problem_responses(401, 403, 404, 416, 422, 503)})
    async def download_file(request: Request, project: ProjectId, subject: SubjectLabel,
                            session: SessionLabel, scan: ScanId, name: FileName,
                            caller: CallerDep) -> Response:
        s = await archived(caller, project, subject, session, scan=scan, file=name)
        return await file_response(request, files_of(s)[0])

    @api.get("/api/v1/projects/{project}/subjects/{subject}/sessions/{session}/download",
             tags=["archive"], operation_id="download_session",
             summary="An archived session as a zip (XNAT's layout), streamed",
             response_class=Response,
             responses={200: ZIP, **problem_responses(401, 403, 404, 422, 503)})
    async def download_session(project: ProjectId, subject: SubjectLabel,
                               session: SessionLabel, caller: CallerDep) -> Response:
        s = await archived(caller, project, subject, session)
        return zip_response(s, files_of(s))

    @api.get("/api/v1/projects/{project}/prearchive/{timestamp}/{session}", tags=["prearchive"],
             operation_id="get_prearchive_entry",
             summary="A prearchive entry: its state, scans and files, with their metadata",
             responses=problem_responses(401, 403, 404, 422, 503))
    async def entry_details(project: ProjectId, timestamp: Timestamp, session: SessionLabel,
                            caller: CallerDep) -> JSONResponse:
        s = await entry(caller, project, timestamp, session)
        return json_response(session_json(
            s, f"/api/v1/projects/{project}/prearchive/{timestamp}/{session}", False))

    @api.get("/api/v1/projects/{project}/prearchive/{timestamp}/{session}/download",
             tags=["prearchive"], operation_id="download_prearchive_entry",
             summary="A prearchive entry as a zip (XNAT's layout), streamed",
             response_class=Response,
             responses={200: ZIP, **problem_responses(401, 403, 404, 422, 503)})
    async def download_entry(project: ProjectId, timestamp: Timestamp, session: SessionLabel,
                             caller: CallerDep) -> Response:
        s = await entry(caller, project, timestamp, session)
        return zip_response(s, files_of(s))

    # --- XNAT ----------------------------------------------------------------------------------

    def xnat_get(path: str, summary: str, *statuses: int, ok: dict[str, Any] | None = None,
                 **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """XNAT answers the same under /data and /data/archive (documented once)."""
        def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            for prefix in ("/data", "/data/archive"):
                api.get(prefix + path, tags=["xnat"], include_in_schema=prefix == "/data",
                        summary=f"XNAT: {summary} (also under /data/archive)",
                        responses={**({200: ok} if ok else {}),
                                   **plain_errors(400, 401, 403, *statuses, 503)},
                        **options)(endpoint)
            return endpoint
        return register

    def session_uri(project: str, subject: str, session: str) -> str:
        return f"/data/projects/{project}/subjects/{subject}/experiments/{session}"

    def resources_uri(project: str, subject: str, session: str, scan: str) -> str:
        """Where an archived scan's resources are listed (and their IDs derive from)."""
        return f"{session_uri(project, subject, session)}/scans/{scan}/resources"

    @xnat_get("/projects", "the projects the caller may see")
    async def xnat_projects(caller: CallerDep, fmt: ListFormat = "json") -> JSONResponse:
        async with svc.db.session() as db:
            rows = await visible_projects(db, caller)
        return result_set([{"ID": p.id, "secondary_ID": p.id, "name": p.name,
                            "description": p.description, "URI": f"/data/projects/{p.id}"}
                           for p in rows])

    @xnat_get("/projects/{project}", "a project (XNAT's items)", 404, ok=ITEMS)
    async def xnat_project(project: ProjectId, caller: CallerDep, fmt: ListFormat = "json"
                           ) -> JSONResponse:
        async with svc.db.session() as db:
            return JSONResponse(project_items(await visible_project(db, caller, project)))

    @xnat_get("/projects/{project}/subjects", "the project's subjects")
    async def xnat_subjects(project: ProjectId, caller: CallerDep,
                            fmt: ListFormat = "json") -> JSONResponse:
        return result_set([{"ID": xnat_id(project, r["label"]), "label": r["label"],
                            "project": project, "insert_date": xnat_date(r["created_at"]),
                            "URI": f"/data/projects/{project}/subjects/{r['label']}"}
                           for r in await subject_rows(caller, project)])

    @xnat_get("/projects/{project}/subjects/{subject}", "a subject (XNAT's items)", 404,
              ok=ITEMS)
    async def xnat_subject(project: ProjectId, subject: SubjectLabel, caller: CallerDep,
                           fmt: ListFormat = "json") -> JSONResponse:
        visible(caller, project)
        found = [r for r in await labelled(caller, subject) if r["project"] == project]
        if not found:
            raise HTTPException(404, f"No subject {subject} in project {project}.")
        return JSONResponse(subject_items(project, found[0]))

    @xnat_get("/subjects/{subject}", "a subject by its ID alone (XNAT's IDs are global; "
              "imgest's are labels, so a label in two of the caller's projects is a 409)",
              404, 409, ok=ITEMS)
    async def xnat_subject_by_id(subject: SubjectLabel, caller: CallerDep,
                                 fmt: ListFormat = "json") -> JSONResponse:
        found = await labelled(caller, subject)
        if len(found) > 1:
            raise HTTPException(409, f"Subject {subject} is in projects "
                                f"{', '.join(r['project'] for r in found)}; read it as "
                                f"/data/projects/PROJECT/subjects/{subject}.")
        if not found:
            raise HTTPException(404, f"No subject {subject}.")
        return JSONResponse(subject_items(found[0]["project"], found[0]))

    async def experiments(caller: Caller, project: str, subject: str | None) -> JSONResponse:
        visible(caller, project)
        rows = await catalogue.get(f"/catalogue/projects/{project}/sessions", subject=subject,
                                   state="archived")
        return result_set([{
            "ID": xnat_id(project, r["label"]), "label": r["label"], "project": project,
            "subject_ID": xnat_id(project, r["subject"]), "subject_label": r["subject"],
            "xsiType": xsi_type(r["modalities"][0] if r["modalities"] else None, "Session"),
            "insert_date": xnat_date(r["created_at"]),
            "URI": session_uri(project, r["subject"], r["label"])} for r in rows])

    @xnat_get("/projects/{project}/experiments", "the project's sessions (experiments)")
    async def xnat_project_experiments(project: ProjectId, caller: CallerDep,
                                       fmt: ListFormat = "json") -> JSONResponse:
        return await experiments(caller, project, None)

    @xnat_get("/projects/{project}/subjects/{subject}/experiments", "a subject's sessions")
    async def xnat_subject_experiments(project: ProjectId, subject: SubjectLabel,
                                       caller: CallerDep, fmt: ListFormat = "json"
                                       ) -> JSONResponse:
        return await experiments(caller, project, subject)

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}",
              "a session with its scans (XNAT's items); format=zip for its files", 404,
              ok=ITEMS_OR_ZIP, response_class=Response)
    async def xnat_session(project: ProjectId, subject: SubjectLabel, session: SessionLabel,
                           caller: CallerDep, fmt: ItemOrZip = "json") -> Response:
        s = await archived(caller, project, subject, session, files=fmt == "zip")
        if fmt == "zip":
            return zip_response(s, files_of(s))
        return JSONResponse(session_items(s))

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}/scans",
              "a session's scans", 404)
    async def xnat_scans(project: ProjectId, subject: SubjectLabel, session: SessionLabel,
                         caller: CallerDep, fmt: ListFormat = "json") -> JSONResponse:
        s = await archived(caller, project, subject, session, files=False)
        return result_set(scan_rows(s, session_uri(project, subject, session), typed=True))

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}/scans/{scan}",
              "a scan (XNAT's items)", 404, ok=ITEMS)
    async def xnat_scan(project: ProjectId, subject: SubjectLabel, session: SessionLabel,
                        scan: ScanId, caller: CallerDep, fmt: ListFormat = "json"
                        ) -> JSONResponse:
        s = await archived(caller, project, subject, session, scan=scan, files=False)
        return JSONResponse(scan_items(s, s["scans"][0]))

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}/scans/{scan}"
              "/resources", "a scan's resources", 404)
    async def xnat_resources(project: ProjectId, subject: SubjectLabel, session: SessionLabel,
                             scan: ScanId, caller: CallerDep, fmt: ListFormat = "json"
                             ) -> JSONResponse:
        s = await archived(caller, project, subject, session, scan=scan)
        return result_set(resource_rows(
            s, resources_uri(project, subject, session, scan), typed=True))

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}/scans/{scan}/files",
              "a scan's files (scan ALL: every scan's); format=zip for the files themselves",
              404, ok=LISTING_OR_ZIP)
    async def xnat_scan_files(project: ProjectId, subject: SubjectLabel, session: SessionLabel,
                              scan: ScanId, caller: CallerDep, fmt: ListOrZip = "json"
                              ) -> Response:
        s = await archived(caller, project, subject, session,
                           scan=None if scan == "ALL" else scan)
        if fmt == "zip":
            return zip_response(s, files_of(s))
        return result_set(file_rows(session_uri(project, subject, session), files_of(s)))

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}/scans/{scan}"
              "/resources/{resource}/files", "a resource's files; format=zip for the files "
              "themselves", 404, ok=LISTING_OR_ZIP)
    async def xnat_resource_files(project: ProjectId, subject: SubjectLabel,
                                  session: SessionLabel, scan: ScanId, resource: ResourceLabel,
                                  caller: CallerDep, fmt: ListOrZip = "json") -> Response:
        s = await archived(caller, project, subject, session, scan=scan)
        files = files_in(s, scan, resource_named(
            s, resources_uri(project, subject, session, scan), resource))
        if fmt == "zip":
            return zip_response(s, files)
        return result_set(file_rows(session_uri(project, subject, session), files))

    @xnat_get("/projects/{project}/subjects/{subject}/experiments/{session}/scans/{scan}"
              "/resources/{resource}/files/{name:path}", "one file's bytes (byte ranges "
              "served)", 404, 416, ok=FILE, response_class=Response)
    async def xnat_file(request: Request, project: ProjectId, subject: SubjectLabel,
                        session: SessionLabel, scan: ScanId, resource: ResourceLabel,
                        name: FileName, caller: CallerDep) -> Response:
        s = await archived(caller, project, subject, session, scan=scan, file=name)
        named = resource_named(s, resources_uri(project, subject, session, scan), resource)
        return await file_response(request, files_in(s, scan, named, name)[0])

    @api.get("/data/prearchive/projects/{project}/{timestamp}/{session}", tags=["xnat"],
             summary="XNAT: a prearchive entry (format=zip: its files)",
             responses={200: LISTING_OR_ZIP, **plain_errors(400, 401, 403, 404, 503)})
    async def xnat_entry(project: ProjectId, timestamp: Timestamp, session: SessionLabel,
                         caller: CallerDep, fmt: ListOrZip = "json") -> Response:
        s = await entry(caller, project, timestamp, session)
        if fmt == "zip":
            return zip_response(s, files_of(s))
        return result_set([{
            "project": project, "timestamp": timestamp, "subject": s["subject"],
            "folderName": s["label"], "name": s["label"], "status": s["entry_state"],
            "url": xnat_entry_url(s["uri"]), "lastmod": xnat_date(s["updated_at"]),
            "uploaded": xnat_date(s["created_at"]),
            "reason": (s["reason"] or {}).get("message", ""),
            "scans": str(len(s["scans"])), "files": str(len(files_of(s)))}])

    # An entry's scans, resources and files, as XNAT's client browses them before archiving.
    def xnat_pre(path: str, summary: str, ok: dict[str, Any] | None = None, *statuses: int,
                 **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return api.get(f"/data/prearchive/projects/{{project}}/{{timestamp}}/{{session}}{path}",
                       tags=["xnat"], summary=f"XNAT: {summary}", responses={
                           **({200: ok} if ok else {}),
                           **plain_errors(400, 401, 403, 404, *statuses, 503)}, **options)

    def entry_uri(project: str, timestamp: str, session: str) -> str:
        return f"/data/prearchive/projects/{project}/{timestamp}/{session}"

    @xnat_pre("/scans", "a prearchive entry's scans")
    async def xnat_entry_scans(project: ProjectId, timestamp: Timestamp, session: SessionLabel,
                               caller: CallerDep, fmt: ListFormat = "json") -> JSONResponse:
        s = await entry(caller, project, timestamp, session, files=False)
        return result_set(scan_rows(s, entry_uri(project, timestamp, session), typed=False))

    @xnat_pre("/scans/{scan}", "a prearchive entry's scan as a zip (format=zip)", ZIP,
              response_class=Response)
    async def xnat_entry_scan(project: ProjectId, timestamp: Timestamp, session: SessionLabel,
                              scan: ScanId, caller: CallerDep, fmt: Zip) -> Response:
        s = await entry(caller, project, timestamp, session, scan=scan)
        return zip_response(s, files_of(s))

    @xnat_pre("/scans/{scan}/resources", "a prearchive scan's resources")
    async def xnat_entry_resources(project: ProjectId, timestamp: Timestamp,
                                   session: SessionLabel, scan: ScanId, caller: CallerDep,
                                   fmt: ListFormat = "json") -> JSONResponse:
        s = await entry(caller, project, timestamp, session, scan=scan)
        return result_set(resource_rows(
            s, f"{entry_uri(project, timestamp, session)}/scans/{scan}/resources", typed=False))

    @xnat_pre("/scans/{scan}/resources/{resource}/files", "a prearchive resource's files; "
              "format=zip for the files themselves", LISTING_OR_ZIP)
    async def xnat_entry_files(project: ProjectId, timestamp: Timestamp, session: SessionLabel,
                               scan: ScanId, resource: ResourceLabel, caller: CallerDep,
                               fmt: ListOrZip = "json") -> Response:
        s = await entry(caller, project, timestamp, session, scan=scan)
        files = files_in(s, scan, resource)
        if fmt == "zip":
            return zip_response(s, files)
        return result_set(file_rows(entry_uri(project, timestamp, session), files))

    @xnat_pre("/scans/{scan}/resources/{resource}/files/{name:path}", "one prearchived file's "
              "bytes (byte ranges served)", FILE, 416, response_class=Response)
    async def xnat_entry_file(request: Request, project: ProjectId, timestamp: Timestamp,
                              session: SessionLabel, scan: ScanId, resource: ResourceLabel,
                              name: FileName, caller: CallerDep) -> Response:
        s = await entry(caller, project, timestamp, session, scan=scan, file=name)
        return await file_response(request, files_in(s, scan, resource, name)[0])

    return api
