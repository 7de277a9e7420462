"""Resumable uploads for large files: tus 1.0 (core, creation, creation-with-upload,
termination, expiration, checksum) at /api/v1/tus/, each attached to an upload session.

The bytes of a PATCH are cut into segments (a multiple of the S3 part size chosen from the
length), each durable and committed as it completes, so a dropped connection loses at most the
segment in flight (on the local store, also the one before it, whose fsync overlaps it), and a
gateway restart loses nothing committed: the offset lives in PostgreSQL. On S3 each segment
is an object of its own, and once the last byte is in they are composed server-side into the
file; on the local store the file is written in place at each segment's offset and only
renamed at the end (each byte is written once). Memory holds one chunk at a time, whatever
the file's size. The finished file joins the upload session with the same duplicate checks as
any added file. SHA-256 is computed while the bytes stream in; a process that did not see them
all (a restart, another replica) reads the file once to hash it.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi import Path as PathParam
from imgest_runtime.service import Periodic, Service, problem, problem_responses
from imgest_runtime.store import (
    StoredObject,
    StoreError,
    part_size_for,
    put_async,
    write_at_async,
)
from sqlalchemy import delete, update
from sqlmodel import col, select
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect

from .auth import CallerDep, forbidden
from .domain import Arrival, safe_filename
from .identity import Action
from .models import TusUpload, Upload
from .settings import Settings
from .uploads_api import OPEN, Refused, project_settings, record_arrivals, staging_key

PREFIX = "/api/v1/tus"
TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration,checksum"
CHECKSUMS = {"sha1": hashlib.sha1, "md5": hashlib.md5, "sha256": hashlib.sha256}
OFFSET_STREAM = "application/offset+octet-stream"
SEGMENT_MIN = 16 * 1024 * 1024
TERMINATE_WAIT = 10.0  # seconds a DELETE waits for a PATCH to end (one whose client is gone)
# The protocol's headers, declared so that the document (and a generated client) knows them.
TusResumable = Annotated[Literal["1.0.0"], Header(alias="Tus-Resumable",
                                                 description="The tus version: 1.0.0.")]
UploadOffset = Annotated[str, Header(alias="Upload-Offset", pattern=r"^[0-9]{1,19}$",
                                     description="Where these bytes go (what HEAD said).")]
TusId = Annotated[str, PathParam(max_length=32, pattern=r"^[0-9a-f]{32}$",
                                 description="The tus upload's id (its Location).")]

log = logging.getLogger("imgest.gateway.tus")


class Hashes:
    """This process's running SHA-256 of each tus upload, valid up to `offset`."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[int, Any]] = {}

    def at(self, tus_id: str, offset: int) -> Any | None:
        found = self.state.get(tus_id)
        if offset == 0:
            return hashlib.sha256()
        if found is None or found[0] != offset:
            return None  # bytes this process did not see: hashed at the end instead
        return found[1].copy()

    def keep(self, tus_id: str, offset: int, hasher: Any | None) -> None:
        if hasher is None:
            self.state.pop(tus_id, None)
        else:
            self.state[tus_id] = (offset, hasher)


METADATA = r"^$|^[^\s,]+( [A-Za-z0-9+/]*={0,2})?(, ?[^\s,]+( [A-Za-z0-9+/]*={0,2})?)*$"


def parse_metadata(header: str) -> dict[str, str]:
    """`key base64value,key2 base64value2` (a value may be absent). Read leniently: a value
    missing its padding is padded, bytes that are not UTF-8 become U+FFFD."""
    metadata: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        value = value.strip()
        try:
            raw = base64.b64decode(value + "=" * (-len(value) % 4)) if value else b""
        except binascii.Error:
            raw = b""
        metadata[key] = raw.decode(errors="replace")
    return metadata


def segment_size(length: int) -> int:
    """Big enough for S3 to compose the file from the segments (10,000 parts at most)."""
    return max(SEGMENT_MIN, part_size_for(length))


IN_PLACE = "/data"


def in_place_key(tus_id: str) -> str:
    return f".tus/{tus_id}{IN_PLACE}"


def tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


TUS_METHODS = ("POST", "HEAD", "PATCH", "DELETE")  # (others: 405, from the router)


class TusProtocol:
    """ASGI middleware for the tus URLs: every answer carries Tus-Resumable, as the protocol
    requires, whoever made it (authentication, validation, a handler)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        override = headers.get("x-http-method-override", "").upper()
        if scope["method"] == "POST" and override in ("PATCH", "DELETE", "HEAD"):
            scope = {**scope, "method": override}  # (tus 1.0: for clients that only POST)
        # (POST creates on the collection; the rest act on one upload: other pairs are 405s)
        creating = scope["path"].rstrip("/") == PREFIX.rstrip("/")
        tus_request = scope["method"] in TUS_METHODS and (scope["method"] == "POST") == creating
        version = headers.get("tus-resumable")  # (none: the route's 422, a required header)
        if tus_request and version is not None and version != TUS_VERSION:
            refused = problem(412, "Precondition Failed", "Send Tus-Resumable: "
                              f"{TUS_VERSION}, the tus version this server speaks.")
            refused.headers.update(tus_headers(**{"Tus-Version": TUS_VERSION}))
            await refused(scope, receive, send)
            return

        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in tus_headers().items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, tagged)


def tus_router(svc: Service, settings: Settings) -> APIRouter:
    api = APIRouter(prefix=PREFIX, tags=["resumable uploads (tus)"],
                    responses={**problem_responses(400, 401, 403, 404, 409, 410, 412, 413, 415,
                                                   422, 503),
                               460: {**problem_responses(400)[400],
                                     "description": "Checksum Mismatch (PATCH with "
                                     "Upload-Checksum): nothing of the body was kept."}})
    # The document names the maximum; the handler refuses past it, before any byte, with
    # tus's 413 (validation would say 422).
    UploadLength = Annotated[int, Header(
        alias="Upload-Length", ge=1, description="The file's size in bytes (at most "
        "Tus-Max-Size: past it, 413).", json_schema_extra={"maximum": settings.max_upload_bytes})]
    hashes = Hashes()
    patching = asyncio.Semaphore(settings.tus_patches)  # (each holds a connection: bounded)

    def in_place(row: TusUpload) -> bool:
        """The store writes at offsets (the local one): the file is assembled where it lies,
        each byte written once, instead of segments joined at the end. (An upload begun as
        segments, by an earlier version, goes on as segments.)"""
        return svc.store.writes_in_place and all(
            key == in_place_key(row.id) for _, key, _ in row.segments)

    async def owned(tus_id: str, caller) -> TusUpload:
        async with svc.db.session() as session:
            row = await session.get(TusUpload, tus_id)
        if row is None:
            raise Refused(404, "Not Found", f"No tus upload {tus_id}.")
        if row.username != caller.username and not caller.admin:
            raise forbidden(f"Tus upload {tus_id} is not yours.")
        if row.object_key is None and row.expires_at <= datetime.now(UTC):
            raise Refused(410, "Gone", f"Tus upload {tus_id} expired at {row.expires_at}.")
        return row

    @api.options("/", summary="What this tus server supports", status_code=204)
    async def options() -> Response:
        return Response(status_code=204, headers=tus_headers(
            **{"Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
               "Tus-Max-Size": str(settings.max_upload_bytes),
               "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)}))

    @api.post("/", status_code=201, summary="Create a tus upload (Upload-Length; Upload-Metadata "
              "names the upload session as `upload` and the file as `filename`); a body is its "
              "first bytes (creation-with-upload)")
    async def create(request: Request, caller: CallerDep, _version: TusResumable,
                     upload_length: UploadLength,
                     upload_metadata: Annotated[str, Header(
                         alias="Upload-Metadata", max_length=8192, pattern=METADATA,
                         description="`upload <base64 id>,filename <base64 name>`")] = ""
                     ) -> Response:
        if upload_length > settings.max_upload_bytes:
            return problem(413, "Content Too Large", f"A file may be at most "
                           f"{settings.max_upload_bytes} bytes (Tus-Max-Size).")
        try:
            length = upload_length
            header = upload_metadata
            metadata = parse_metadata(header)
            upload_id = metadata.get("upload") or metadata.get("upload_id") or ""
            # A missing name is no reason to refuse 10 GB: the unpacker sniffs the content.
            filename = safe_filename(metadata.get("filename") or metadata.get("name") or "file")
            async with svc.db.session() as session:
                upload = await session.get(Upload, upload_id) if upload_id else None
                if upload is None:
                    raise Refused(404, "Upload session not found", (
                        "Upload-Metadata must name an open upload session as `upload` "
                        "(POST /api/v1/projects/{project}/uploads makes one)."))
                if upload.uploader != caller.username or not caller.may(Action.upload,
                                                                         upload.project):
                    raise forbidden(f"Upload {upload_id} is not yours to add to.")
                if upload.state != OPEN:
                    raise Refused(409, "Upload not open", f"Upload {upload_id} is "
                                  f"{upload.state}; files are added to an open upload only.")
                rules = await project_settings(session, upload.project or "")
                if upload.files_added >= rules.max_files_per_upload:  # (not 10 GB later)
                    raise Refused(409, "Too many files", f"Upload {upload_id} holds "
                                  f"{upload.files_added} files, the most project "
                                  f"{upload.project} allows (max_files_per_upload).")
                now = datetime.now(UTC)
                row = TusUpload(id=uuid.uuid4().hex, upload_id=upload_id,
                                username=caller.username, filename=filename, length=length,
                                offset=0, metadata_header=header[:8192], segments=[],
                                created_at=now,
                                expires_at=now + timedelta(hours=settings.tus_expire_hours))
                session.add(row)
        except Refused as refused:
            return refused.response
        location = f"{PREFIX}/{row.id}"
        headers = tus_headers(Location=location,
                              **{"Upload-Expires": format_datetime(row.expires_at, usegmt=True)})
        if request.headers.get("content-type") == OFFSET_STREAM:
            outcome = await receive(request, row, 0)
            if isinstance(outcome, Response):
                outcome.headers["Location"] = location
                return outcome
            headers["Upload-Offset"] = str(outcome)
        return Response(status_code=201, headers=headers)

    @api.head("/{tus_id}", summary="How much of the file the server has")
    async def head(tus_id: TusId, caller: CallerDep) -> Response:
        row = await owned(tus_id, caller)  # (a refusal's body is not sent: the server's rule)
        headers = tus_headers(**{"Upload-Offset": str(row.offset),
                                 "Upload-Length": str(row.length)})
        if row.metadata_header:
            headers["Upload-Metadata"] = row.metadata_header
        if row.object_key is None:
            headers["Upload-Expires"] = format_datetime(row.expires_at, usegmt=True)
        return Response(status_code=200, headers=headers)

    @api.patch("/{tus_id}", status_code=204, summary="Append bytes at Upload-Offset",
               openapi_extra={"requestBody": {"required": True, "content": {
                   OFFSET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}})
    async def patch(tus_id: TusId, request: Request, caller: CallerDep,
                    _version: TusResumable, offset_header: UploadOffset,
                    _checksum: Annotated[str | None, Header(
                        alias="Upload-Checksum", max_length=200,
                        description="`<algorithm> <base64 digest>` of this PATCH's body")] = None
                    ) -> Response:
        if request.headers.get("content-type") != OFFSET_STREAM:
            return problem(415, "Unsupported Media Type", f"PATCH bodies are {OFFSET_STREAM}.")
        row = await owned(tus_id, caller)
        if patching.locked():
            busy = problem(503, "Too many uploads at once", f"This server takes "
                           f"{settings.tus_patches} PATCHes at once; resume in a moment.")
            busy.headers["Retry-After"] = "5"
            return busy
        # One PATCH at a time per upload, whichever gateway process or replica it reaches.
        async with patching, svc.db.advisory_lock(f"tus:{tus_id}") as mine:
            if not mine:
                return problem(409, "Upload in progress", "Another PATCH to this upload is "
                               "running.")
            row = await owned(tus_id, caller)  # read again: as the PATCH before this one left it
            if int(offset_header) != row.offset:
                return problem(409, "Offset mismatch", f"The server has {row.offset} bytes of "
                               f"this file, not {offset_header}: HEAD tells where to resume.")
            if row.object_key is not None:  # whole already: a client's last PATCH, repeated
                async for chunk in request.stream():
                    if chunk:
                        return problem(413, "Past Upload-Length", f"The file is {row.length} "
                                       "bytes, all received; nothing more can be appended.")
                return Response(status_code=204, headers=tus_headers(
                    **{"Upload-Offset": str(row.offset)}))
            outcome = await receive(request, row, row.offset)
        if isinstance(outcome, Response):
            return outcome
        return Response(status_code=204, headers=tus_headers(**{"Upload-Offset": str(outcome)}))

    @api.delete("/{tus_id}", status_code=204, summary="Terminate: drop the bytes received")
    async def terminate(tus_id: TusId, caller: CallerDep, _version: TusResumable) -> Response:
        await owned(tus_id, caller)
        # After a PATCH still running (a client that just let go of it, say): dropped under
        # it, its bytes would be written again where nothing would ever delete them.
        async with svc.db.advisory_lock(f"tus:{tus_id}", wait=TERMINATE_WAIT) as mine:
            if not mine:
                return problem(409, "Upload in progress", "A PATCH to this upload is still "
                               "running; end it, then terminate.")
            row = await owned(tus_id, caller)
            if row.object_key:  # (it said 204, and the file went on to be archived)
                return problem(409, "Already added", f"The file is whole and in upload "
                               f"{row.upload_id}; cancel the upload to drop it.")
            await drop(row)
        return Response(status_code=204, headers=tus_headers())

    async def receive(request: Request, row: TusUpload, start: int) -> int | Response:
        """Appends the request body at `start`, a segment at a time; returns the new offset, or
        a refusal. Without a checksum each segment counts as soon as it is stored (a dropped
        connection keeps them); with one, the PATCH counts whole or not at all."""
        checksum = request.headers.get("upload-checksum")
        expected, checker = None, None
        if checksum:
            algorithm, _, digest = checksum.partition(" ")
            if algorithm not in CHECKSUMS:
                return problem(400, "Unsupported checksum", f"Upload-Checksum algorithms: "
                               f"{', '.join(CHECKSUMS)}.")
            try:
                expected = base64.b64decode(digest, validate=True)
            except binascii.Error:
                return problem(400, "Bad Upload-Checksum", "The digest is not base64.")
            checker = CHECKSUMS[algorithm]()
        place = in_place(row)  # (the segments it looks at stay of one kind while this runs)
        if place and start > 0:
            draft = await asyncio.to_thread(svc.store.stat, in_place_key(row.id))
            if draft is None or draft.size < start:  # (a store restored from a backup)
                await drop(row)
                return problem(410, "Bytes lost", f"The {start} bytes received so far are no "
                               "longer in the store; create the upload again.")
        hasher = hashes.at(row.id, start)
        size = segment_size(row.length)
        stream = request.stream().__aiter__()
        leftover = bytearray()
        ended = False
        offset = start
        written: list[list] = []  # this PATCH's segments: [offset, key, size]

        async def segment() -> AsyncIterator[bytes]:
            nonlocal ended
            sent = 0
            while sent < size:
                if leftover:
                    chunk = bytes(leftover[: size - sent])
                    del leftover[: len(chunk)]
                else:
                    try:
                        async with asyncio.timeout(settings.tus_idle_seconds):
                            chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        ended = True
                        return
                    except TimeoutError:  # stalled: as if gone (resumed from Upload-Offset)
                        log.warning("tus upload %s: no bytes for %.0f s; PATCH ended at the "
                                    "stored offset", row.id, settings.tus_idle_seconds)
                        raise ClientDisconnect() from None
                    if len(chunk) > size - sent:
                        leftover.extend(chunk[size - sent:])
                        chunk = chunk[: size - sent]
                if offset + sent + len(chunk) > row.length:
                    raise Refused(413, "Past Upload-Length", f"The file is {row.length} bytes; "
                                  "this PATCH goes past its end.")
                sent += len(chunk)
                yield chunk

        syncing: tuple[asyncio.Future, list] | None = None  # in place: the segment fsynced

        async def settle() -> None:
            """In place, a segment counts once its fsync is done; the next one is received
            meanwhile, so the disk and the network work at once."""
            nonlocal syncing
            if syncing is not None:
                fsync, done = syncing
                syncing = None
                try:
                    await fsync
                except OSError as e:
                    raise Refused(503, "Store unavailable", f"The bytes could not be made "
                                  f"durable: {e}; resume from Upload-Offset.") from e
                if expected is None:
                    await commit(row, [done], done[0] + done[2])

        try:
            while not ended and offset < row.length:
                before = hasher.copy() if hasher is not None else None
                # Hashed by the writer's thread as the bytes go by (hashlib lets go of the GIL).
                digests = [d for d in (checker, hasher) if d is not None]
                try:
                    if place:  # past the committed offset, bytes are only a draft
                        key = in_place_key(row.id)
                        stored = await write_at_async(svc.store, key, offset, segment(),
                                                      durable=False, digests=digests)
                    else:
                        key = f".tus/{row.id}/{offset:020d}"
                        stored = await put_async(svc.store, key, segment(), digests=digests)
                except StoreError as e:
                    await settle()
                    await forget(written if expected is not None else [])
                    return problem(503, "Store unavailable", f"The bytes could not be stored: "
                                   f"{e}; resume from Upload-Offset once it is back.")
                except (ClientDisconnect, OSError):
                    hasher = before  # what was hashed of the lost segment does not count
                    await forget([[offset, key, 0]])
                    break
                if stored.size == 0:
                    await forget([[offset, key, 0]])
                    break
                written.append([offset, key, stored.size])
                offset += stored.size
                if place:
                    await settle()
                    syncing = (asyncio.ensure_future(asyncio.to_thread(
                        svc.store.make_durable, key)), written[-1])
                elif expected is None:
                    await commit(row, written[-1:], offset)
            await settle()
        except Refused as refused:
            with contextlib.suppress(Refused):
                await settle()  # what was received before the refusal counts (no checksum)
            await forget(written if expected is not None else [])
            hashes.keep(row.id, row.offset, None)
            return refused.response
        if expected is not None:
            if checker is None or checker.digest() != expected:
                await forget(written)
                hashes.keep(row.id, start, None)
                return problem(460, "Checksum Mismatch", "The PATCH body does not match "
                               "Upload-Checksum; nothing of it was kept.")
            await commit(row, written, offset)
        hashes.keep(row.id, offset, hasher)
        try:
            return await finish_if_done(row, offset)
        except Refused as refused:
            return refused.response

    async def commit(row: TusUpload, segments: list[list], offset: int) -> None:
        if not segments:
            return
        async with svc.db.session() as session:
            done = (await session.execute(update(TusUpload).where(
                col(TusUpload.id) == row.id, col(TusUpload.offset) == segments[0][0])
                .values(offset=offset,
                        segments=col(TusUpload.segments).op("||")(_jsonb(segments))))).rowcount
        if not done:  # another replica appended first: ours do not count
            await forget(segments)
            raise Refused(409, "Offset mismatch", "Another PATCH appended to this upload.")
        row.offset = offset
        row.segments = [*row.segments, *segments]

    async def forget(segments: list[list]) -> None:
        """Deletes segments that do not count. (Written in place, they are bytes past the
        committed offset, written over on resume.)"""
        for _, key, _ in segments:
            if not key.endswith(IN_PLACE):
                await asyncio.to_thread(svc.store.delete, key)

    async def finish_if_done(row: TusUpload, offset: int) -> int:
        """The last byte is in: the segments become the file in the upload session. A file
        the session refuses (closed meanwhile, or full) is dropped with the tus upload, bytes
        and all: kept, its HEAD would say it is whole, and a client resuming would take that
        for success."""
        if offset < row.length or row.object_key is not None:
            return offset
        key, _ = staging_key(row.upload_id, row.filename, token=row.id[:12])
        try:
            return await _finish(row, offset, key)
        except Refused:
            await asyncio.to_thread(svc.store.delete, key)
            await drop(row)
            raise

    async def _finish(row: TusUpload, offset: int, key: str) -> int:
        async with svc.db.session() as session:
            fresh = await session.get(TusUpload, row.id)
            upload = await session.get(Upload, row.upload_id)
            rules = await project_settings(session, upload.project or "") if upload else None
        assert fresh is not None
        if upload is None or rules is None:
            raise Refused(409, "Upload not open", f"Upload {row.upload_id} is gone.")
        if in_place(fresh):
            # Whole: no byte past the length was ever written (the body is cut there).
            await asyncio.to_thread(svc.store.move, in_place_key(row.id), key)
            await asyncio.to_thread(svc.store.delete_prefix, f".tus/{row.id}/")  # its folder
            stored = StoredObject(key, row.length)
        else:
            sources = [k for _, k, _ in sorted(fresh.segments)]
            stored = await asyncio.to_thread(svc.store.concat, sources, key)
        hashed = hashes.at(row.id, offset)
        sha256 = hashed.hexdigest() if hashed is not None else await asyncio.to_thread(
            _sha256_of, svc, key)
        hashes.keep(row.id, 0, None)
        [verdict] = await record_arrivals(svc, upload, rules, [
            Arrival(key, row.filename, stored.size, sha256)])
        if verdict.state == "refused":
            raise Refused(verdict.status, HTTPStatus(verdict.status).phrase,
                          verdict.reason["message"] if verdict.reason else "")
        async with svc.db.session() as session:
            await session.execute(update(TusUpload).where(col(TusUpload.id) == row.id)
                                  .values(object_key=key if verdict.state == "added" else "",
                                          segments=[]))
        await forget(fresh.segments)
        row.object_key = key
        return offset

    async def drop(row: TusUpload) -> None:
        await forget(row.segments)
        await asyncio.to_thread(svc.store.delete_prefix, f".tus/{row.id}/")
        async with svc.db.session() as session:
            await session.execute(delete(TusUpload).where(col(TusUpload.id) == row.id))
        hashes.keep(row.id, 0, None)

    async def sweep() -> None:
        """Expired, unfinished tus uploads give their space back."""
        async with svc.db.session() as session:
            expired = (await session.exec(select(TusUpload).where(
                col(TusUpload.expires_at) < datetime.now(UTC),
                col(TusUpload.object_key).is_(None)).limit(100))).all()
        for row in expired:
            async with svc.db.advisory_lock(f"tus:{row.id}") as mine:
                if mine:  # (else a PATCH begun before it expired still runs: next time)
                    await drop(row)

    svc.periodic.append(Periodic("tus-expiry", 600, sweep))
    return api


def _jsonb(value: Any) -> Any:
    from sqlalchemy import cast
    from sqlalchemy.dialects.postgresql import JSONB

    return cast(value, JSONB)


def _sha256_of(svc: Service, key: str) -> str:
    digest = hashlib.sha256()
    for block in svc.store.iter_chunks(key):
        digest.update(block)
    return digest.hexdigest()
