"""The catalogue, read-only, for the gateway (which keeps no copy of it): a project's subjects
and sessions, and one session (archived, or a prearchive entry) with its scans and files.

It answers whoever asks: the gateway decides who may see what. Keep the importer's port inside
the deployment.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from imgest_runtime.service import Service, problem_responses
from sqlalchemy import func
from sqlmodel import col, select
from starlette.exceptions import HTTPException

from .models import CatalogueFile, Scan, Session, Subject

log = logging.getLogger("imgest.importer.catalogue")


def session_view(s: Session, subject: str) -> dict[str, Any]:
    return {"id": s.id, "project": s.project, "subject": subject, "label": s.label,
            "state": s.state, "uri": s.uri, "prefix": s.prefix,
            "timestamp": s.id.split("/")[2] if s.state == "prearchived" else None,
            "study_uid": s.study_uid, "modalities": s.modalities or [],
            "quarantined": s.quarantined, "entry_state": s.entry_state, "reason": s.reason,
            "created_at": s.created_at, "updated_at": s.updated_at}


def file_view(f: CatalogueFile, prefix: str) -> dict[str, Any] | None:
    """A file with its resource and its path in the session
    (`scans/SCAN/resources/RESOURCE/files/NAME`), taken from its object key; None for a key
    outside the session's prefix, which the catalogue never hands out."""
    path = f.object_key.removeprefix(prefix)
    parts = path.split("/")
    if path == f.object_key or len(parts) < 6 or (parts[0], parts[2], parts[4]) != (
            "scans", "resources", "files"):
        log.warning("file %s is not laid out under its session %s; left out", f.object_key,
                    prefix)
        return None
    return {"name": f.name, "resource": parts[3], "path": path, "object_key": f.object_key,
            "size": f.size, "sha256": f.sha256, "sop_instance_uid": f.sop_instance_uid,
            "metadata": f.file_metadata or {}}


def scan_order(label: str) -> tuple[bool, int, str]:
    """Series numbers in number order (2 before 10), other labels after them."""
    return (not label.isdigit(), int(label) if label.isdigit() else 0, label)


def catalogue_router(svc: Service) -> APIRouter:
    api = APIRouter(prefix="/catalogue", tags=["catalogue"])

    async def subject_rows(*where: Any) -> list[dict[str, Any]]:
        query = (select(Subject.project, Subject.label, func.count(col(Session.id)),
                        func.min(Session.created_at))
                 .join(Session, col(Session.subject_id) == Subject.id)
                 .where(Session.state == "archived", *where)
                 .group_by(col(Subject.project), col(Subject.label))
                 .order_by(col(Subject.project), col(Subject.label)))
        async with svc.db.session() as db:
            rows = (await db.exec(query)).all()
        return [{"project": project, "label": label, "sessions": n, "created_at": first}
                for project, label, n, first in rows]

    @api.get("/projects/{project}/subjects", summary="The project's subjects that have archived "
             "sessions")
    async def subjects(project: str) -> list[dict[str, Any]]:
        return await subject_rows(Subject.project == project)

    @api.get("/subjects/{label}", summary="The subjects of this label, in every project (XNAT "
             "reads a subject by its ID alone)")
    async def subjects_labelled(label: str) -> list[dict[str, Any]]:
        return await subject_rows(Subject.label == label)

    @api.get("/projects/{project}/sessions", summary="The project's sessions (of one subject, "
             "in one state)")
    async def sessions(project: str, subject: str | None = None,
                       state: Literal["archived", "prearchived"] | None = None
                       ) -> list[dict[str, Any]]:
        query = (select(Session, Subject.label).join(Subject, col(Subject.id) == Session.subject_id)
                 .where(Session.project == project)
                 .order_by(col(Subject.label), col(Session.label), col(Session.id)))
        if subject is not None:
            query = query.where(Session.subject_id == f"{project}/{subject}")
        if state is not None:
            query = query.where(Session.state == state)
        async with svc.db.session() as db:
            rows = (await db.exec(query)).all()
        return [session_view(s, label) for s, label in rows]

    @api.get("/sessions/{key:path}", summary="A session with its scans and their files",
             responses=problem_responses(404, 422))
    async def session(key: str,
                      scan: Annotated[str | None, Query(description="Only this scan.")] = None,
                      file: Annotated[str | None, Query(description="Only this file (by name).")
                                      ] = None,
                      files: Annotated[bool, Query(description="false: scans with their counts, "
                                                   "no files.")] = True) -> dict[str, Any]:
        """One query per level: the session, its scans (with file counts and sizes), its
        files."""
        async with svc.db.session() as db:
            found = (await db.exec(select(Session, Subject.label).join(
                Subject, col(Subject.id) == Session.subject_id).where(Session.id == key))).first()
            if found is None:
                raise HTTPException(404, f"No session {key}.")
            scans_query = (select(Scan, func.count(col(CatalogueFile.object_key)),
                                  func.coalesce(func.sum(CatalogueFile.size), 0))
                           .join(CatalogueFile, col(CatalogueFile.scan_id) == Scan.id,
                                 isouter=True)
                           .where(Scan.session_id == key).group_by(col(Scan.id)))
            files_query = (select(CatalogueFile, Scan.label)
                           .join(Scan, col(Scan.id) == CatalogueFile.scan_id)
                           .where(Scan.session_id == key).order_by(col(CatalogueFile.name)))
            if scan is not None:
                scans_query = scans_query.where(Scan.label == scan)
                files_query = files_query.where(Scan.label == scan)
            if file is not None:
                files_query = files_query.where(CatalogueFile.name == file)
            scans = (await db.exec(scans_query)).all()
            rows = (await db.exec(files_query)).all() if files else []
        s, subject = found
        if scan is not None and not scans:
            raise HTTPException(404, f"No scan {scan} in session {key}.")
        if file is not None and not rows:
            raise HTTPException(404, f"No file {file!r} in session {key}"
                                + (f", scan {scan}." if scan is not None else "."))
        by_scan: dict[str, list[dict[str, Any]]] = {}
        for f, label in rows:
            if (view := file_view(f, s.prefix)) is not None:
                by_scan.setdefault(label, []).append(view)
        return {**session_view(s, subject), "scans": [
            {"label": c.label, "series_uid": c.series_uid, "modality": c.modality,
             "description": c.description, "file_count": count, "size": size,
             **({"files": by_scan.get(c.label, [])} if files else {})}
            for c, count, size in sorted(scans, key=lambda r: scan_order(r[0].label))]}

    return api
