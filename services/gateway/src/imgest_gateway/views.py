"""How the gateway shows what it keeps: uploads as JSON, events as stored for a re-drive."""

import json
from datetime import date, datetime
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from imgest_contracts import TOPICS, CloudEvent, event_type
from sqlalchemy import bindparam, exists
from sqlalchemy.orm import defer
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Upload, UploadFile, UploadObject

# What a status shows of objects and files: not the event each keeps for a re-drive (JSON of
# a kilobyte or more each, decoded for nothing).
_OBJECTS = select(UploadObject).options(defer(col(UploadObject.event))).where(
    UploadObject.upload_id == bindparam("upload_id"))
# The files an upload shows: not those of an archive refused (or failed) whole, which goes
# with its files as if none had come (some were told of while it still unpacked).
SHOWN = ~exists().where(col(UploadObject.object_key) == col(UploadFile.source_key),
                        col(UploadObject.state).in_(("rejected", "failed")))
_FILES = select(UploadFile).options(defer(col(UploadFile.event))).where(
    UploadFile.upload_id == bindparam("upload_id"), SHOWN).order_by(col(UploadFile.path))

TOPIC_OF_TYPE = {event_type(payload): topic for topic, payload in TOPICS.items()}


def event_json(event: CloudEvent) -> dict:
    """An event as a JSONB column keeps it (a re-drive sends it again from there)."""
    return event.model_dump(mode="json", exclude_none=True)


class _Json(JSONResponse):
    """Plain data encoded by the json module itself, datetimes as ISO 8601: FastAPI's
    `jsonable_encoder` walks every value in Python first, which made a status of 1,000 files
    cost tens of milliseconds of CPU. Anything else is left to it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                          default=_plain).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return jsonable_encoder(value)


def json_response(value: Any, status: int = 200, **headers: str) -> JSONResponse:
    return _Json(value, status_code=status, headers=headers or None)


async def upload_status(session: AsyncSession, upload: Upload) -> dict[str, Any]:
    """The upload's status, object by object and file by file."""
    params = {"upload_id": upload.id}
    objects = (await session.exec(_OBJECTS, params=params)).all()  # type: ignore[call-overload]
    files = (await session.exec(_FILES, params=params)).all()  # type: ignore[call-overload]
    return upload_view(upload, list(objects), list(files))


def upload_view(upload: Upload, objects: list[UploadObject], files: list[UploadFile]
                ) -> dict[str, Any]:
    summary = upload.summary or {}
    cancelled = upload.state == "cancelled"

    def state(f: UploadFile) -> str:  # a file still on its way when its upload was cancelled
        return "cancelled" if cancelled and f.state in ("staged", "validated") else f.state

    by_state: dict[str, int] = {}
    for f in files:
        by_state[state(f)] = by_state.get(state(f), 0) + 1
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
                     "sha256": o.sha256, "state": o.state, "reason": o.reason,
                     "progress": o.progress} for o in objects],
        "files": [{"file_id": f.file_id, "path": f.path, "kind": f.kind, "state": state(f),
                   "reason": f.reason, "session": f.session} for f in files],
    }
