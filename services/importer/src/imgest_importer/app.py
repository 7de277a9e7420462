"""The importer: collects each upload's outcomes, then places its files into sessions and scans.

An upload is finished in two steps so that nothing is lost in between: a handler that sees the
last outcome marks the upload `completing` (one transaction with the fact it recorded); `finish`
then copies the objects to their places and commits the catalogue, the file states and the
outgoing events together. A crash in between leaves the upload `completing`, and the periodic
re-drive finishes it; every step is idempotent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import FastAPI
from imgest_contracts import (
    LISTED_FAILURES,
    ArchiveRejected,
    ArchiveUnpacked,
    CloudEvent,
    FileFailure,
    FileKind,
    FileRejected,
    FileStaged,
    FileValidated,
    ImportOptions,
    ObjectStored,
    PipelinesRequested,
    PrearchiveAnswered,
    PrearchiveRequested,
    ProjectRules,
    ProjectUpdated,
    Reason,
    ReleaseRequested,
    SessionArchived,
    SessionConflicted,
    SessionFailed,
    SessionHints,
    SessionOutcome,
    SessionPrearchived,
    SessionRef,
    SessionReleased,
    UploadCancelled,
    UploadCompleted,
    UploadCounts,
    Uploader,
    UploadSubmitted,
)
from imgest_runtime.broker import PIPELINE_FAILED
from imgest_runtime.db import any_of
from imgest_runtime.outbox import derived_id, insert_ignore
from imgest_runtime.service import Periodic, Service, Tx, create_app
from imgest_runtime.store import ObjectNotFound, fit_name
from sqlalchemy import bindparam, delete, func, insert, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .catalogue_api import catalogue_router
from .domain import (
    UNASSIGNED,
    Existing,
    ObjectProgress,
    Part,
    Placement,
    SessionPlan,
    ValidFile,
    dest_entry,
    gradual,
    idle_entries,
    is_complete,
    land,
    overwrite_mode,
    plan,
    session_id,
    to_prearchive,
    within_budget,
)
from .models import (
    CatalogueFile,
    Project,
    Scan,
    Session,
    Subject,
    Upload,
    UploadFile,
    UploadObject,
    metadata,
)
from .settings import Settings

NAME = "importer"
log = logging.getLogger("imgest.importer")


def valid_file(f: UploadFile) -> ValidFile:
    fileset = f.fileset or {}
    return ValidFile(f.file_id, f.staged_key, f.path, FileKind(f.kind),
                     SessionHints.model_validate(f.hints or {}), f.size or 0, f.sha256 or "",
                     fileset.get("format"), tuple(
                         Part(p["path"], p["object_key"], p["size"], p["sha256"])
                         for p in fileset.get("files", [])), f.file_metadata)


def missing(error: ObjectNotFound) -> Reason:
    return Reason(code="store.object_missing", message=(
        f"{error} is gone from the store, so its session cannot be placed; send the files "
        "again."))


def outcome_state(s: SessionPlan) -> str:
    if s.archived:
        return "archived"
    return {"CONFLICT": "conflict", "ERROR": "failed", "RECEIVING": "receiving"}.get(
        s.state, "prearchived")


def as_read(entry: Session, row: Session | None) -> bool:
    """A prearchive entry is still as it was read: no command, late file or build since."""
    return row is not None and row.state == "prearchived" and row.updated_at == entry.updated_at


class EntryBuilt(Exception):
    """A receiving entry was built while an upload was joining it."""


@dataclass
class EntryWork:
    """How work on a prearchive entry commits: in the unit of the command asking for it (its
    inbox mark and its answer), or on its own (a build once idle); its events' ids derive from
    `seed`."""

    unit: Callable[[], AbstractAsyncContextManager[AsyncSession | None]]
    seed: str
    answer: PrearchiveAnswered | None = None


_OBJECTS = UploadObject.__table__  # type: ignore[attr-defined]
_NEW_OBJECT = pg_insert(_OBJECTS).values(
    object_key=bindparam("object_key"), upload_id=bindparam("upload_id"),
    files_total=bindparam("files_total"))
_OBJECT_TOTAL = _NEW_OBJECT.on_conflict_do_update(
    index_elements=[_OBJECTS.c.object_key], set_={"files_total": func.coalesce(
        _OBJECTS.c.files_total, _NEW_OBJECT.excluded.files_total)})


async def _set_files(session: AsyncSession, file_ids: list[str], **values: Any) -> None:
    await session.execute(update(UploadFile).where(any_of(col(UploadFile.file_id), file_ids))
                          .values(**values))


class Importer:
    def __init__(self, svc: Service, settings: Settings):
        self.svc = svc
        self.settings = settings
        self._finishing: set[str] = set()

    # --- recording facts --------------------------------------------------------------------

    async def upload(self, session: AsyncSession, upload_id: str) -> Upload:
        """The upload's row, locked; created on the first fact (events arrive in any order)."""
        await insert_ignore(session, Upload.__table__, id=upload_id, state="collecting",
                            submitted=False, updated_at=datetime.now(UTC))
        row = await session.get(Upload, upload_id, with_for_update=True, populate_existing=True)
        assert row is not None
        return row

    async def object(self, session: AsyncSession, upload_id: str, key: str) -> UploadObject:
        await insert_ignore(session, UploadObject.__table__, object_key=key, upload_id=upload_id)
        row = await session.get(UploadObject, key, with_for_update=True, populate_existing=True)
        assert row is not None
        return row

    async def progress(self, session: AsyncSession, upload: Upload) -> dict[str, ObjectProgress]:
        # Plain rows, not ORM objects: this runs for every batch, over every object of the
        # upload (a thousand, when each file came alone).
        objects = (await session.execute(select(
            UploadObject.object_key, UploadObject.files_total, UploadObject.rejected).where(
            UploadObject.upload_id == upload.id))).all()
        terminal = dict((await session.exec(
            select(UploadFile.object_key, func.count()).where(UploadFile.upload_id == upload.id)
            .group_by(UploadFile.object_key))).all())
        return {key: ObjectProgress(total, rejected is not None, terminal.get(key, 0))
                for key, total, rejected in objects}

    async def settle(self, session: AsyncSession, upload: Upload) -> bool:
        """Marks the upload `completing` if this fact was its last; True if so."""
        if upload.state != "collecting":
            return False
        # A cancelled upload is done as soon as it is known (submitted): what it holds so far
        # is dropped, not waited for.
        if not (upload.cancelled and upload.submitted) and not is_complete(
                upload.submitted, list(upload.object_keys or []),
                await self.progress(session, upload)):
            return False
        upload.state, upload.updated_at = "completing", datetime.now(UTC)
        upload.planned_at = upload.updated_at
        session.add(upload)
        return True

    async def record_files(self, tx: Tx, files: list[tuple[UploadFile, int | None]]) -> None:
        """Records files' outcomes (with the number of files their object holds, if known yet;
        archive.unpacked says it of members told of while their archive unpacked): each upload
        and object looked at once, the rows inserted in one statement."""
        session = tx.session
        store = self.svc.store
        assert store is not None
        for upload_id in dict.fromkeys(row.upload_id for row, _ in files):
            upload = await self.upload(session, upload_id)
            if upload.cancelled and upload.state in ("cleaning", "completed"):
                # Still on their way when the upload was cancelled: their staged copies go too.
                for row, _ in files:
                    if row.upload_id == upload_id:
                        tx.after_commit(("drop", row.staged_key), lambda key=row.staged_key:
                                        asyncio.to_thread(store.delete, key))
        # Each object's row, with how many files it holds where the event says: one statement
        # per object, sent as one batch, in key order (rows are locked in one order).
        totals = {row.object_key: (row.upload_id, total) for row, total in files}
        await session.execute(_OBJECT_TOTAL, [
            {"object_key": key, "upload_id": upload_id, "files_total": total}
            for key, (upload_id, total) in sorted(totals.items())])
        # The files known already, then the new ones as one executemany. Only this method adds
        # files, each upload's row locked first (above): none can be added meanwhile, so a
        # conflict would be a bug and fails the batch. (An insert returning what it inserted
        # is rendered anew for every batch, a cast per value: a fifth of this service's CPU.)
        known = set((await session.execute(select(UploadFile.file_id).where(any_of(
            col(UploadFile.file_id), [row.file_id for row, _ in files])))).scalars())
        new: dict[str, UploadFile] = {}
        again = []  # known before, or twice in the batch: a file's outcome told again
        for row, _ in files:
            if row.file_id in known or row.file_id in new:
                again.append(row)
            else:
                new[row.file_id] = row
        if new:
            await session.execute(insert(UploadFile.__table__),
                                  [row.model_dump() for row in new.values()])
        for row in again:
            await self.retry_outcome(session, row)
        for upload_id in dict.fromkeys(row.upload_id for row, _ in files):
            self.settle_later(tx, upload_id)

    def settle_later(self, tx: Tx, upload_id: str) -> None:
        """Once the batch's events are recorded, looks once at each upload they touched; one
        that became complete is finished after the commit."""
        async def settle() -> None:
            upload = await self.upload(tx.session, upload_id)
            await tx.session.flush()
            if await self.settle(tx.session, upload):
                tx.after_commit(("finish", upload_id), lambda: self.finish(upload_id))

        tx.before_commit(("settle", upload_id), settle)

    async def retry_outcome(self, session: AsyncSession, row: UploadFile) -> None:
        """A replayed dead letter came through: the file's outcome replaces the failure, and a
        completed upload is re-opened (a new generation) to place it and say so again."""
        known = await session.get(UploadFile, row.file_id, with_for_update=True)
        if known is None or known.state != "rejected" or (known.reason or {}).get(
                "code") != PIPELINE_FAILED:
            return
        source = await session.get(UploadObject, row.object_key)
        if source is not None and source.rejected:  # dropped with its archive
            return
        if row.reason and row.reason.get("code") == PIPELINE_FAILED:
            return
        for name, value in row.model_dump().items():
            setattr(known, name, value)
        session.add(known)
        upload = await self.upload(session, row.upload_id)
        if upload.state in ("cleaning", "completed") and not upload.cancelled:
            upload.state, upload.generation = "collecting", upload.generation + 1
            upload.updated_at = datetime.now(UTC)
            session.add(upload)
            log.info("upload %s: re-opened by a replayed file (generation %d)", upload.id,
                     upload.generation)

    # --- finishing an upload ------------------------------------------------------------------

    async def finish(self, upload_id: str) -> None:
        if upload_id in self._finishing:
            return
        self._finishing.add(upload_id)
        try:
            await self._finish(upload_id)
        finally:
            self._finishing.discard(upload_id)

    async def _finish(self, upload_id: str) -> None:
        store = self.svc.store
        assert store is not None
        async with self.svc.db.session() as session:
            upload = await session.get(Upload, upload_id)
            if upload is None or upload.state not in ("completing", "cleaning"):
                return
            files = (await session.exec(select(UploadFile).where(
                UploadFile.upload_id == upload_id))).all()
            objects = (await session.exec(select(UploadObject).where(
                UploadObject.upload_id == upload_id))).all()
        # An archive refused whole takes its files with it (those told of while it unpacked).
        refused_whole = {o.object_key for o in objects if o.rejected}
        files = [f for f in files if f.object_key not in refused_whole]
        if upload.state == "cleaning":  # completed, but its staging not yet emptied
            await self._clean(upload_id, files, objects, upload.cancelled)
            return
        started = time.perf_counter()
        options = ImportOptions.model_validate(upload.options or {})
        uploader = Uploader.model_validate(upload.uploader or {"username": "unknown"})
        valid = [valid_file(f) for f in files if f.state == "validated"]
        # Planned as of when it was found complete: a re-drive puts everything where the
        # attempt it repeats did (the same prearchive timestamps), leaving nothing behind.
        now = upload.planned_at or datetime.now(UTC)
        cancelled = upload.cancelled  # then nothing is placed, and nothing kept
        rules = ProjectRules.model_validate(upload.rules) if upload.rules else None
        hinted = {f.hints.project for f in valid if f.hints.project}
        async with self.svc.db.session() as session:
            projects = {p.id: ProjectRules.model_validate(p.rules) for p in (
                await session.exec(select(Project).where(col(Project.id).in_(hinted)))).all()}
        sessions = [] if cancelled else plan(upload_id, options, valid,
                                             self.settings.default_project, now, rules, projects,
                                             uploader.projects)
        mode = overwrite_mode(options, rules)
        target = dest_entry(options)
        for s in sessions:
            if gradual(options) or (target and (s.project, s.label) == (target[0], target[2])):
                await self._join_entry(s, target, {
                    "archive": s.archived, "overwrite": mode, "quarantine": s.quarantined,
                    "pipelines": options.trigger_pipelines})
        async with self.svc.db.session() as session:
            for s in sessions:  # (those bound for the archive meet what is there)
                land(s, await self._existing(session, s, upload_id), mode, upload.submitted_at)

        # Copies first (server-side, idempotent): the catalogue only ever names objects that exist.
        # A re-opened upload (generation > 0) finds its earlier files already placed.
        def place() -> None:
            for s in sessions:
                try:
                    self._copy(s.placements)
                except ObjectNotFound as e:  # gone from staging (by hand?): the session fails
                    self._undo(s.placements)
                    s.state, s.reason = "ERROR", missing(e)
            if cancelled:
                return
            # Originals of what was refused (files, and archives refused whole) are kept for
            # inspection outside staging, which is emptied next.
            refused = [(f.staged_key, f.file_id, f.path) for f in files if f.state == "rejected"]
            refused += [(o.object_key, hashlib.sha256(o.object_key.encode()).hexdigest()[:32],
                         o.filename or o.object_key) for o in objects if o.rejected]
            for key, name, path in refused:
                kept = f"rejected/{upload_id}/{name}/{fit_name(PurePosixPath(path).name)}"
                if store.stat(kept) is None and store.stat(key) is not None:
                    store.copy(key, kept)

        planned = time.perf_counter()
        await asyncio.to_thread(place)
        copied = time.perf_counter()

        async with self.svc.db.session() as session:
            upload = await session.get(Upload, upload_id, with_for_update=True,
                                       populate_existing=True)
            if upload is None or upload.state != "completing":
                return
            failures = [FileFailure(file_id=f.file_id, path=f.path,
                                    reason=Reason.model_validate(f.reason))
                        for f in files if f.state == "rejected" and f.reason]
            failures += [FileFailure(path=o.filename or o.object_key,
                                     reason=Reason.model_validate(o.rejected))
                         for o in objects if o.rejected]
            for s in sessions:
                if s.state == "ERROR":
                    await self._session_failed(session, upload_id, s, upload.generation)
                    failures += [FileFailure(file_id=p.file.file_id, path=p.file.path,
                                             reason=s.reason) for p in s.placements
                                 if s.reason and p.source_key == p.file.staged_key]
                else:
                    await self._catalogue(session, upload_id, s, now, upload.generation,
                                          options.trigger_pipelines, build={
                                              "archive": s.state == "CONFLICT", "overwrite": mode,
                                              "quarantine": s.quarantined,
                                              "pipelines": options.trigger_pipelines})
            skipped = [FileFailure(file_id=f.file_id, path=f.path,
                                   reason=Reason.model_validate(f.reason))
                       for f in files if f.state == "duplicate" and f.reason]
            placed = [s for s in sessions if s.state not in ("CONFLICT", "ERROR")]
            archived = sum(len(s.file_ids) for s in placed if s.archived)
            prearchived = sum(len(s.file_ids) for s in placed if not s.archived)
            conflicts = [s for s in sessions if s.state == "CONFLICT"]
            counts = UploadCounts(files=len(valid) + len(failures) - sum(
                len(s.file_ids) for s in sessions if s.state == "ERROR"), archived=archived,
                prearchived=prearchived, rejected=len(failures), duplicates=len(skipped),
                conflicted=sum(len(s.file_ids) for s in conflicts))
            outcome = ("cancelled" if cancelled
                       else "succeeded" if not failures and not conflicts and valid
                       else "partial" if placed else "failed")
            listed = UploadCompleted(
                upload_id=upload_id, uploader=uploader,
                project=options.project or (sessions[0].project if sessions else None),
                outcome=outcome, counts=counts,
                sessions=[SessionOutcome(uri=s.uri, label=s.label, state=outcome_state(s),
                                         file_ids=s.file_ids, files=len(s.file_ids),
                                         reason=s.reason) for s in sessions],
                failures=failures[:LISTED_FAILURES],
                failures_omitted=max(0, len(failures) - LISTED_FAILURES),
                skipped=skipped[:LISTED_FAILURES],
                skipped_omitted=max(0, len(skipped) - LISTED_FAILURES), completed_at=now,
                generation=upload.generation)
            completed = within_budget(listed, self.settings.event_max_bytes)
            if completed is not listed:
                log.warning("upload %s: too many files to list in upload.completed; its "
                            "sessions say how many", upload_id)
            await self.svc.outbox.add(session, completed, event_id=derived_id(
                "upload.completed", upload_id, str(upload.generation)))
            # Not yet "completed": staging is emptied next, and a crash or a store outage in
            # between leaves the upload "cleaning", which the re-drive finishes.
            upload.state, upload.updated_at = "cleaning", datetime.now(UTC)
            session.add(upload)
        catalogued = time.perf_counter()
        await self._clean(upload_id, files, objects, cancelled)
        log.info("upload %s completed: %s, %d archived, %d prearchived, %d in conflict, "
                 "%d rejected, %d duplicates skipped; placed in %.2fs (plan %.2fs, copies %.2fs, catalogue "
                 "%.2fs), staging emptied in %.2fs", upload_id, outcome, archived, prearchived,
                 counts.conflicted, len(failures), len(skipped), catalogued - started, planned - started,
                 copied - planned, catalogued - copied, time.perf_counter() - catalogued)

    def _copy(self, placements: list[Placement]) -> None:
        """Server-side copies of what a plan adds or replaces (what is there already is not
        copied again: a re-drive repeats only what is missing)."""
        store = self.svc.store
        assert store is not None
        store.copy_all([(p.source_key, p.key, p.action == "replace") for p in placements
                        if p.action != "keep"])

    def _undo(self, placements: list[Placement]) -> None:
        """Removes what a failed plan added (what it replaced holds the bytes it was meant to)."""
        store = self.svc.store
        assert store is not None
        for p in placements:
            if p.action == "add":
                store.delete(p.key)

    async def _join_entry(self, s: SessionPlan, target: tuple[str, str, str] | None,
                          build: dict) -> None:
        """Sends a planned session into a prearchive entry: the one `dest` names (made if there
        is none), or, for a gradual send, the RECEIVING entry of its project, study and label
        (XNAT's prearchive key), made if there is none. A receiving entry's idle clock restarts."""
        async with self.svc.db.session() as session:
            if target:
                row = await session.get(Session, session_id(target[0], "", target[2], False,
                                                             target[1]))
                state = row.entry_state if row is not None and row.state == "prearchived" else (
                    "READY")
                to_prearchive(s, state or "READY", target[1])
                return
            # One entry per study, whichever upload comes first: two at once wait here in turn.
            await session.execute(text("select pg_advisory_xact_lock(hashtext(:key))"), {
                "key": f"receiving/{s.project}/{s.study_uid}/{s.label}"})
            row = (await session.exec(select(Session).where(
                Session.project == s.project, Session.label == s.label,
                col(Session.study_uid).is_not_distinct_from(s.study_uid),
                Session.state == "prearchived", Session.entry_state == "RECEIVING"))).first()
            if row is not None:
                to_prearchive(s, "RECEIVING", row.id.split("/")[2])
                row.updated_at = datetime.now(UTC)
                session.add(row)
                return
            to_prearchive(s, "RECEIVING", s.timestamp)
            await self._session_row(session, s, datetime.now(UTC), build)

    async def _clean(self, upload_id: str, files: list[UploadFile],
                     objects: list[UploadObject], cancelled: bool) -> None:
        """What arrived is kept until its upload is finished; what failed in the pipeline is
        kept longer, so that a replay of its dead letter finds it (unless it was cancelled)."""
        keep: set[str] = set()
        if not cancelled:
            keep = {f.staged_key for f in files if f.state == "rejected" and (
                f.reason or {}).get("code") == PIPELINE_FAILED}
            keep |= {o.object_key for o in objects
                     if (o.rejected or {}).get("code") == PIPELINE_FAILED}
        await asyncio.to_thread(self._clean_staging, upload_id, keep)
        async with self.svc.db.session() as session:
            upload = await session.get(Upload, upload_id, with_for_update=True)
            if upload is not None and upload.state == "cleaning":
                upload.state, upload.updated_at = "completed", datetime.now(UTC)
                session.add(upload)

    def _clean_staging(self, upload_id: str, keep: set[str]) -> None:
        store = self.svc.store
        assert store is not None
        if not keep:
            store.delete_prefix(f"staging/{upload_id}/")
            return
        for obj in list(store.list(f"staging/{upload_id}/")):
            if obj.key not in keep:
                store.delete(obj.key)

    async def _existing(self, session: AsyncSession, s: SessionPlan, upload_id: str
                        ) -> Existing | None:
        """The archived session of the plan's project and label, with its files (labels are
        unique in a project, whatever the subject)."""
        if not s.archived:
            return None
        row = (await session.exec(select(Session).where(
            Session.project == s.project, Session.label == s.label,
            Session.state == "archived"))).first()
        if row is None:
            return None
        files = (await session.exec(
            select(CatalogueFile.object_key, CatalogueFile.sha256, CatalogueFile.upload_id)
            .join(Scan, col(Scan.id) == CatalogueFile.scan_id)
            .where(Scan.session_id == row.id))).all()
        return Existing(id=row.id, uri=row.uri, subject=row.subject_id.split("/", 1)[1],
                        study_uid=row.study_uid, modalities=list(row.modalities or []),
                        files={key: sha for key, sha, _ in files},
                        ours=any(u == upload_id for _, _, u in files),
                        created_at=row.created_at)

    async def _session_row(self, session: AsyncSession, s: SessionPlan, now: datetime,
                           build: dict | None) -> Session:
        subject_id = f"{s.project}/{s.subject}"
        await insert_ignore(session, Subject.__table__, id=subject_id, project=s.project,
                            label=s.subject)
        row = Session(id=s.id, project=s.project, subject_id=subject_id, label=s.label,
                      state="archived" if s.archived else "prearchived", uri=s.uri,
                      prefix=s.prefix, study_uid=s.study_uid, modalities=s.modalities,
                      quarantined=s.quarantined and s.archived,
                      entry_state=None if s.archived else s.state,
                      reason=s.reason.model_dump() if s.reason else None,
                      build=None if s.archived else build, created_at=now,
                      updated_at=datetime.now(UTC))
        session.add(row)
        return row

    async def _catalogue(self, session: AsyncSession, upload_id: str, s: SessionPlan,
                         now: datetime, generation: int, pipelines: bool,
                         seed: str | None = None, build: dict | None = None,
                         entry_key: str | None = None) -> None:
        """Records a placed session (in a few statements, however many files) and tells of it
        (event ids from the upload and its generation, or from `seed`: the command that placed
        it)."""
        ids = (seed,) if seed else (upload_id, s.id, str(generation))
        row = await session.get(Session, s.id, with_for_update=True, populate_existing=True)
        if s.state == "RECEIVING" and (row is None or row.entry_state != "RECEIVING"):
            # Built while this upload copied into it: plan again (a new entry), later.
            raise EntryBuilt(f"prearchive entry {s.id} was built meanwhile")
        if row is None:
            row = await self._session_row(session, s, now, build)
        else:
            row.modalities = sorted(set(row.modalities or []) | set(s.modalities))
            row.quarantined = row.quarantined or (s.quarantined and s.archived)
            row.updated_at = datetime.now(UTC)
            session.add(row)
        state = "archived" if s.archived else "prearchived"
        await _set_files(session, s.file_ids, state=state, session_id=s.id)
        # A kept placement: the archived object stays, and so does its record.
        placed = [p for p in s.placements if p.action != "keep"]
        if placed:
            table = CatalogueFile.__table__
            upsert = pg_insert(table)
            await session.execute(upsert.on_conflict_do_update(
                index_elements=["object_key"], set_={
                    c.name: upsert.excluded[c.name] for c in table.c if c.name != "object_key"}),
                [{"object_key": p.key, "scan_id": f"{s.id}/{p.scan}", "name": p.name,
                  "size": p.file.size if p.size is None else p.size, "sha256": p.digest,
                  "sop_instance_uid": p.file.hints.sop_instance_uid, "file_id": p.file.file_id,
                  "upload_id": upload_id, "file_metadata": (
                      p.file.metadata if p.source_key == p.file.staged_key else None)}
                 for p in placed])
        scans: dict[str, ValidFile] = {}
        for p in s.placements:
            scans.setdefault(p.scan, p.file)
        await session.execute(pg_insert(Scan.__table__).on_conflict_do_nothing(), [
            {"id": f"{s.id}/{label}", "session_id": s.id, "label": label,
             "series_uid": first.hints.series_uid, "modality": first.hints.modality,
             # XNAT's scan type and series description (scripts pick scans by them)
             "description": ((first.metadata or {}).get("SeriesDescription") or "")[:256]
             or None} for label, first in scans.items()])
        ref = SessionRef(project=s.project, subject=s.subject, session=s.label, uri=s.uri)
        upload_ids = [upload_id] if upload_id else []
        files, _ = await self._contents(session, s.id)
        if s.archived:
            await self.svc.outbox.add(session, SessionArchived(
                session_key=s.id, upload_ids=upload_ids, session=ref, study_uid=s.study_uid,
                modalities=row.modalities or [], scans=len(scans), files=files,
                quarantined=row.quarantined, archived_at=now, entry_key=entry_key),
                event_id=derived_id("session.archived", *ids))
            if pipelines:
                await self.svc.outbox.add(session, PipelinesRequested(
                    session_key=s.id, upload_ids=upload_ids, session=ref,
                    study_uid=s.study_uid, modalities=row.modalities or [],
                    quarantined=row.quarantined, requested_at=now),
                    event_id=derived_id("pipelines.requested", *ids))
            return
        await self.svc.outbox.add(session, SessionPrearchived(
            session_key=s.id, upload_ids=upload_ids, session=ref, timestamp=s.timestamp,
            state=row.entry_state or s.state,  # type: ignore[arg-type]
            files=files, reason=s.reason), event_id=derived_id("session.prearchived", *ids))
        if s.state == "CONFLICT" and s.reason and s.existing_uri:
            await self.svc.outbox.add(session, SessionConflicted(
                session_key=s.id, upload_ids=upload_ids, session=ref,
                existing_uri=s.existing_uri, reason=s.reason),
                event_id=derived_id("session.conflicted", *ids))

    async def _session_failed(self, session: AsyncSession, upload_id: str, s: SessionPlan,
                              generation: int) -> None:
        """A session of an upload that could not be placed: its files fail with the reason."""
        assert s.reason is not None
        await _set_files(session, s.file_ids, state="rejected", reason=s.reason.model_dump())
        await self.svc.outbox.add(session, SessionFailed(
            session_key=s.id, upload_ids=[upload_id], session=SessionRef(
                project=s.project, subject=s.subject, session=s.label, uri=s.uri),
            reason=s.reason), event_id=derived_id("session.failed", upload_id, s.id,
                                                  str(generation)))
        log.warning("upload %s: session %s failed: %s", upload_id, s.id, s.reason.message)

    # --- prearchive entries: archive (XNAT's commit), build, rebuild, move, delete --------------

    async def _entry_plan(self, session: AsyncSession, entry: Session, quarantine: bool,
                          subject: str | None = None, label: str | None = None) -> SessionPlan:
        """The entry as an archive-bound plan: each of its objects to the same place under the
        session's archive prefix; under another subject or label if the command names one."""
        rows = (await session.exec(select(CatalogueFile, Scan).join(
            Scan, col(Scan.id) == CatalogueFile.scan_id).where(
            Scan.session_id == entry.id))).all()
        timestamp = entry.id.split("/")[2]
        s = SessionPlan(entry.project, subject or entry.subject_id.split("/", 1)[1],
                        label or entry.label, True, entry.study_uid, timestamp,
                        quarantined=quarantine)
        for f, scan in sorted(rows, key=lambda r: r[0].object_key):
            valid = ValidFile(f.file_id, f.object_key, f.name,
                              FileKind.dicom if f.sop_instance_uid else FileKind.unknown,
                              SessionHints(sop_instance_uid=f.sop_instance_uid,
                                           series_uid=scan.series_uid, modality=scan.modality),
                              f.size, f.sha256, metadata=f.file_metadata)
            s.placements.append(Placement(valid, scan.label, s.prefix + f.object_key[
                len(entry.prefix):], f.name, source=f.object_key))
        return s

    async def commit_entry(self, event: CloudEvent[PrearchiveRequested]) -> None:
        """Carries out a command on a prearchive entry and answers it (prearchive.answered)."""
        r = event.data
        if await self.svc.handled_before(event):
            return
        async with self.svc.db.session() as session:
            entry = await session.get(Session, r.session_key)
        work = EntryWork(lambda: self.svc.handling(event), event.id, PrearchiveAnswered(
            request_id=r.request_id, session_key=r.session_key, state="refused"))
        reason = None
        if entry is None or entry.state != "prearchived":
            reason = Reason(code="prearchive.not_found", message=(
                f"No prearchive entry {r.session_key}."))
        elif r.action == "delete":
            await self._delete_entry(event, entry)
        elif r.action == "move":
            await self._move_entry(event, entry)
        elif r.action == "rebuild":
            await self.build(entry, work)
            log.info("prearchive entry %s rebuilt by %s", entry.id, r.username)
        elif entry.project == UNASSIGNED:
            reason = Reason(code="prearchive.unassigned", message=(
                "A session in Unassigned must be moved to a project before it is archived."))
        else:
            await self._archive_entry(entry, {
                "overwrite": r.overwrite, "quarantine": r.quarantine,
                "pipelines": r.trigger_pipelines, "subject": r.subject, "label": r.label},
                work, entry.entry_state)
            log.info("prearchive entry %s: archive requested by %s", entry.id, r.username)
        if reason is not None:
            async with work.unit() as session:
                if session is not None:
                    await self.svc.outbox.add(session, work.answer.model_copy(update={
                        "reason": reason}), event_id=derived_id(event.id, "finished"))

    async def build_idle(self) -> None:
        """Builds the RECEIVING entries (gradual sends) that have been idle for their project's
        time: archived, if that is where they were bound, else READY for review. An entry left
        BUILDING or ARCHIVING by a crash is built again."""
        stale = datetime.now(UTC) - timedelta(seconds=self.settings.redrive_seconds)
        async with self.svc.db.session() as session:
            receiving = (await session.exec(select(
                Session.id, Session.project, Session.updated_at).where(
                Session.entry_state == "RECEIVING"))).all()
            stuck = (await session.exec(select(Session.id).where(
                col(Session.entry_state).in_(("BUILDING", "ARCHIVING")),
                col(Session.updated_at) < stale))).all()
            idle = {p.id: float(p.rules.get("gradual_idle_seconds",
                                            self.settings.gradual_idle_seconds))
                    for p in (await session.exec(select(Project).where(col(Project.id).in_(
                        {project for _, project, _ in receiving})))).all()}
        idle_now = idle_entries([(i, p, t) for i, p, t in receiving if t is not None], idle,
                                self.settings.gradual_idle_seconds, datetime.now(UTC))
        for entry_id in [*idle_now, *stuck]:
            async with self.svc.db.session() as session:
                entry = await session.get(Session, entry_id)
            if entry is not None and entry.entry_state in ("RECEIVING", "BUILDING", "ARCHIVING"):
                assert entry.updated_at is not None
                seed = derived_id("build", entry.id, entry.updated_at.isoformat())
                await self.build(entry, EntryWork(self.svc.db.session, seed))

    async def build(self, entry: Session, work: EntryWork) -> None:
        """Builds an entry (XNAT's build, and rebuild): an empty one goes; one whose objects
        are gone is ERROR; one bound for the archive is archived (or CONFLICT); others READY."""
        async with self.svc.db.session() as session:
            s = await self._entry_plan(session, entry, False)
        if not s.placements and entry.entry_state == "RECEIVING":
            async with work.unit() as session:
                if session is not None:
                    await self._forget_entry(session, entry.id)
            return
        was = entry.entry_state
        building = await self._enter(entry, "BUILDING", work)
        if building is None:
            return
        how = building.build or {}
        if how.get("archive") and building.project != UNASSIGNED:
            await self._archive_entry(building, how, work, was)
            return
        gone = await asyncio.to_thread(self._missing, s.placements)
        await self._mark_entry(building, "ERROR" if gone else "READY", gone, work, was=was)

    def _missing(self, placements: list[Placement]) -> Reason | None:
        store = self.svc.store
        assert store is not None
        for p in placements:
            if store.stat(p.source_key) is None:
                return missing(ObjectNotFound(p.source_key))
        return None

    async def _archive_entry(self, entry: Session, how: dict, work: EntryWork,
                             was: str | None) -> None:
        """Archives an entry with the overwrite rules: a CONFLICT stays in the prearchive with
        its reason; otherwise its objects are copied into the archive, catalogued there, and the
        entry removed (its objects last, once the catalogue no longer names them)."""
        store = self.svc.store
        assert store is not None
        archiving = await self._enter(entry, "ARCHIVING", work)
        if archiving is None:
            return
        entry = archiving
        async with self.svc.db.session() as session:
            quarantine = how.get("quarantine")
            if quarantine is None:  # the project's default
                project = await session.get(Project, entry.project)
                quarantine = bool(project and project.rules.get("quarantine"))
            s = await self._entry_plan(session, entry, quarantine, how.get("subject"),
                                       how.get("label"))
            land(s, await self._existing(session, s, ""), how.get("overwrite", "none"))
        if s.state == "CONFLICT":
            await self._mark_entry(entry, "CONFLICT", s.reason, work, s.existing_uri, was)
            return
        try:
            await asyncio.to_thread(self._copy, s.placements)
        except ObjectNotFound as e:
            await asyncio.to_thread(self._undo, s.placements)
            await self._mark_entry(entry, "ERROR", missing(e), work, was=was)
            return
        async with work.unit() as session:
            if session is None:
                return
            row = await self._unchanged(session, entry, work)
            if row is None:
                return
            first = next(iter((await self._contents(session, entry.id))[1]), "")
            await self._forget_entry(session, entry.id)
            await self._catalogue(session, first, s, datetime.now(UTC), 0,
                                  bool(how.get("pipelines", True)), seed=work.seed,
                                  entry_key=entry.id)
            if work.answer is not None:
                await self.svc.outbox.add(session, work.answer.model_copy(update={
                    "state": "archived", "uri": s.uri}), event_id=derived_id(work.seed,
                                                                              "finished"))
        log.info("prearchive entry %s archived as %s", entry.id, s.uri)
        await asyncio.to_thread(store.delete_prefix, entry.prefix)

    async def _contents(self, session: AsyncSession, session_id: str
                        ) -> tuple[int, list[str]]:
        """How many files a session holds, and the uploads they came in."""
        rows = (await session.exec(select(CatalogueFile.upload_id, func.count()).join(
            Scan, col(Scan.id) == CatalogueFile.scan_id).where(
            Scan.session_id == session_id).group_by(col(CatalogueFile.upload_id)).order_by(
            col(CatalogueFile.upload_id)))).all()
        return sum(n for _, n in rows), [upload for upload, _ in rows]

    async def _unchanged(self, session: AsyncSession, entry: Session, work: EntryWork
                         ) -> Session | None:
        """The entry's row, locked, if it is as it was read; None (and a command answered) if
        it changed since."""
        row = await session.get(Session, entry.id, with_for_update=True, populate_existing=True)
        if await self._changed(session, entry, row, work):
            return None
        return row

    async def _changed(self, session: AsyncSession, entry: Session, row: Session | None,
                       work: EntryWork) -> bool:
        """The entry changed since it was read (another command, or a late file joined it): it
        is left as it is now, a build looks at it again once idle, a command is refused."""
        if as_read(entry, row):
            return False
        if work.answer is not None:
            await self.svc.outbox.add(session, work.answer.model_copy(update={
                "reason": Reason(code="prearchive.changed", message=(
                    "The entry changed while this command ran (files arrived, or another "
                    "command came first); look at it and ask again."))}),
                event_id=derived_id(work.seed, "finished"))
        return True

    async def _enter(self, entry: Session, state: str, work: EntryWork) -> Session | None:
        """Marks an entry BUILDING or ARCHIVING while that work runs, as XNAT shows it (a crash
        leaves it so: the build check takes it up again); None if it changed meanwhile."""
        async with self.svc.db.session() as session:
            row = await session.get(Session, entry.id, with_for_update=True,
                                    populate_existing=True)
            if as_read(entry, row):
                assert row is not None
                row.entry_state, row.updated_at = state, datetime.now(UTC)
                session.add(row)
                await self._tell_entry(session, row, None, derived_id(work.seed, state))
                return row
        async with work.unit() as session:
            if session is not None:
                await self._changed(session, entry, None, work)
        return None

    async def _tell_entry(self, session: AsyncSession, row: Session, reason: Reason | None,
                          seed: str) -> tuple[SessionRef, list[str]]:
        """session.prearchived with the entry's state; its reference and uploads."""
        ref = SessionRef(project=row.project, subject=row.subject_id.split("/", 1)[1],
                         session=row.label, uri=row.uri)
        files, uploads = await self._contents(session, row.id)
        await self.svc.outbox.add(session, SessionPrearchived(
            session_key=row.id, upload_ids=uploads, session=ref,
            timestamp=row.id.split("/")[2], state=row.entry_state,  # type: ignore[arg-type]
            files=files, reason=reason), event_id=derived_id("session.prearchived", seed))
        return ref, uploads

    async def _mark_entry(self, entry: Session, state: str, reason: Reason | None,
                          work: EntryWork, existing_uri: str | None = None,
                          was: str | None = None) -> None:
        """An entry stays in the prearchive in a new state (READY, CONFLICT or ERROR), and
        says so (its owners hear of a CONFLICT or ERROR it was not in before)."""
        async with work.unit() as session:
            if session is None:
                return
            row = await self._unchanged(session, entry, work)
            if row is None:
                return
            news = was != state  # (a rebuild that finds the same is no news)
            row.entry_state, row.reason = state, reason.model_dump() if reason else None
            row.updated_at = datetime.now(UTC)
            session.add(row)
            ref, uploads = await self._tell_entry(session, row, reason, work.seed)
            if news and state == "CONFLICT" and reason is not None:
                await self.svc.outbox.add(session, SessionConflicted(
                    session_key=row.id, upload_ids=uploads, session=ref,
                    existing_uri=existing_uri or "", reason=reason),
                    event_id=derived_id("session.conflicted", work.seed))
            elif news and state == "ERROR" and reason is not None:
                await self.svc.outbox.add(session, SessionFailed(
                    session_key=row.id, upload_ids=uploads, session=ref, reason=reason),
                    event_id=derived_id("session.failed", work.seed))
            if work.answer is not None:
                answer = {"CONFLICT": "conflict", "ERROR": "failed"}.get(state, "rebuilt")
                await self.svc.outbox.add(session, work.answer.model_copy(update={
                    "state": answer, "uri": row.uri, "reason": reason}),
                    event_id=derived_id(work.seed, "finished"))
        log.info("prearchive entry %s is %s%s", entry.id, state,
                 f": {reason.message}" if reason else "")

    async def _move_entry(self, event: CloudEvent[PrearchiveRequested], entry: Session
                          ) -> None:
        """Moves a prearchive entry to another project (out of Unassigned, typically): its
        objects are copied under the new project, catalogued there, then the old ones go."""
        store = self.svc.store
        assert store is not None
        r = event.data
        if not r.to_project or r.to_project == entry.project:
            async with self.svc.handling(event) as session:
                if session is not None:
                    await self.svc.outbox.add(session, PrearchiveAnswered(
                        request_id=r.request_id, session_key=r.session_key, state="refused",
                        uri=entry.uri, reason=Reason(code="prearchive.bad_move", message=(
                            "Name another project to move the entry to."))),
                        event_id=derived_id(event.id, "finished"))
            return
        async with self.svc.db.session() as session:
            moved = await self._entry_plan(session, entry, False)
        moved.project, moved.archived = r.to_project, False
        for p in moved.placements:
            p.key = moved.prefix + p.source_key[len(entry.prefix):]
        await asyncio.to_thread(self._copy, moved.placements)
        async with self.svc.handling(event) as session:
            if session is None:
                return
            first = next(iter((await self._contents(session, entry.id))[1]), "")
            await self._forget_entry(session, entry.id)
            await self._catalogue(session, first, moved, datetime.now(UTC), 0, False,
                                  seed=event.id, build=entry.build)
            await self.svc.outbox.add(session, PrearchiveAnswered(
                request_id=r.request_id, session_key=r.session_key, state="moved",
                uri=moved.uri), event_id=derived_id(event.id, "finished"))
        await asyncio.to_thread(lambda: [store.delete(o.key) for o in store.list(entry.prefix)])
        log.info("prearchive entry %s moved to %s by %s", entry.id, r.to_project, r.username)

    async def _forget_entry(self, session: AsyncSession, entry_id: str) -> None:
        """An entry's records (not its objects)."""
        scans = select(Scan.id).where(Scan.session_id == entry_id)
        await session.execute(delete(CatalogueFile).where(col(CatalogueFile.scan_id).in_(scans)))
        await session.execute(delete(Scan).where(col(Scan.session_id) == entry_id))
        await session.execute(delete(Session).where(col(Session.id) == entry_id))

    async def _delete_entry(self, event: CloudEvent[PrearchiveRequested], entry: Session
                            ) -> None:
        """Deletes a prearchive entry: its records, then its objects."""
        store = self.svc.store
        assert store is not None
        r = event.data
        async with self.svc.handling(event) as session:
            if session is None:
                return
            await self._forget_entry(session, entry.id)
            await self.svc.outbox.add(session, PrearchiveAnswered(
                request_id=r.request_id, session_key=r.session_key, state="deleted",
                uri=entry.uri), event_id=derived_id(event.id, "finished"))
        await asyncio.to_thread(lambda: [store.delete(o.key) for o in store.list(entry.prefix)])
        log.info("prearchive entry %s deleted by %s", entry.id, r.username)

    async def redrive(self) -> None:
        """Finishes uploads left `completing` or `cleaning` by a crash or an outage."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.redrive_seconds)
        async with self.svc.db.session() as session:
            stuck = (await session.exec(select(Upload.id).where(
                col(Upload.state).in_(("completing", "cleaning")),
                col(Upload.updated_at) < cutoff))).all()
        for upload_id in stuck:
            log.warning("upload %s: re-driving its completion", upload_id)
            try:
                await self.finish(upload_id)
            except Exception:  # one that fails again must not keep the others stuck
                log.exception("upload %s: its completion failed again; tried next pass",
                              upload_id)


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations")
    importer = Importer(svc, settings)
    svc.periodic.append(Periodic("redrive", max(1.0, settings.redrive_seconds / 3),
                                 importer.redrive))
    svc.periodic.append(Periodic("build", settings.build_check_seconds, importer.build_idle))
    svc.publishes(SessionArchived, SessionPrearchived, SessionConflicted, SessionFailed,
                  PipelinesRequested, PrearchiveAnswered, SessionReleased, UploadCompleted)

    @svc.on(UploadSubmitted)
    async def on_upload_submitted(event: CloudEvent[UploadSubmitted], tx: Tx) -> None:
        u = event.data
        upload = await importer.upload(tx.session, u.upload_id)
        upload.submitted = True
        upload.uploader = u.uploader.model_dump(mode="json")
        upload.options = u.options.model_dump(mode="json")
        upload.object_keys = u.object_keys
        upload.rules = u.rules.model_dump(mode="json") if u.rules else None
        upload.submitted_at = u.submitted_at
        upload.updated_at = datetime.now(UTC)
        tx.session.add(upload)
        if u.object_keys:  # a row for each object not yet heard of: all in one statement
            await tx.session.execute(_NEW_OBJECT.on_conflict_do_nothing(), [
                {"object_key": key, "upload_id": u.upload_id, "files_total": None}
                for key in u.object_keys])
        importer.settle_later(tx, u.upload_id)

    @svc.on(ProjectUpdated)
    async def on_project_updated(event: CloudEvent[ProjectUpdated], tx: Tx) -> None:
        p = event.data
        rules = ProjectRules.of(p.project, p.settings, p.updated_at)
        insert = pg_insert(Project).values(id=p.project, rules=rules.model_dump(mode="json"),
                                           updated_at=p.updated_at)
        await tx.session.execute(insert.on_conflict_do_update(
            index_elements=["id"], set_={"rules": insert.excluded.rules,
                                         "updated_at": insert.excluded.updated_at},
            where=col(Project.updated_at) < insert.excluded.updated_at))

    @svc.on(ReleaseRequested)
    async def on_release_requested(event: CloudEvent[ReleaseRequested], tx: Tx) -> None:
        r = event.data
        row = await tx.session.get(Session, r.session_key, with_for_update=True)
        if row is None or row.state != "archived":
            log.info("release of %s by %s: no such archived session", r.session_key,
                     r.username)
            return
        row.quarantined, row.updated_at = False, datetime.now(UTC)
        tx.session.add(row)
        tx.publish(SessionReleased(
            request_id=r.request_id, session_key=row.id, session=SessionRef(
                project=row.project, subject=row.subject_id.split("/", 1)[1], session=row.label,
                uri=row.uri), released_by=r.username, released_at=row.updated_at),
            event_id=derived_id(event.id, "released"))
        log.info("session %s released from quarantine by %s", row.id, r.username)

    @svc.on(PrearchiveRequested, own_transaction=True)
    async def on_archive_requested(event: CloudEvent[PrearchiveRequested]) -> None:
        await importer.commit_entry(event)

    @svc.on(UploadCancelled)
    async def on_upload_cancelled(event: CloudEvent[UploadCancelled], tx: Tx) -> None:
        upload = await importer.upload(tx.session, event.data.upload_id)
        if upload.state != "collecting":
            log.info("upload %s: cancelled by %s too late; it is already being placed",
                     upload.id, event.data.username)
            return
        upload.cancelled, upload.updated_at = True, datetime.now(UTC)
        tx.session.add(upload)
        log.info("upload %s: cancelled by %s", upload.id, event.data.username)
        importer.settle_later(tx, upload.id)

    @svc.on(FileValidated, whole_batch=True)
    async def on_files_validated(events: list[CloudEvent[FileValidated]], tx: Tx) -> None:
        await importer.record_files(tx, [(UploadFile(
            file_id=f.file_id, upload_id=f.upload_id, object_key=f.source.object_key,
            staged_key=f.object_key, path=f.path, kind=f.kind.value, state="validated",
            size=f.size, sha256=f.sha256, hints=f.hints.model_dump(mode="json"),
            file_metadata=f.metadata,
            fileset=f.fileset.model_dump() if f.fileset else None), f.source.files_total)
            for e in events for f in [e.data]])

    @svc.on(FileRejected, whole_batch=True)
    async def on_files_rejected(events: list[CloudEvent[FileRejected]], tx: Tx) -> None:
        await importer.record_files(tx, [(UploadFile(
            file_id=f.file_id, upload_id=f.upload_id, object_key=f.source.object_key,
            staged_key=f.object_key, path=f.path, kind=f.kind.value,
            state="duplicate" if f.duplicate_of else "rejected",
            reason=f.reason.model_dump()), f.source.files_total) for e in events for f in [e.data]])

    async def archive_outcome(tx: Tx, event: CloudEvent, files_total: int | None,
                              rejected: Reason | None) -> None:
        a = event.data
        await importer.upload(tx.session, a.upload_id)
        obj = await importer.object(tx.session, a.upload_id, a.object_key)
        obj.filename = a.filename
        if files_total is not None:
            obj.files_total = files_total
        if rejected is not None:
            obj.rejected = rejected.model_dump()
        tx.session.add(obj)
        importer.settle_later(tx, a.upload_id)

    # Dead letters: a file that could not get through is an outcome too (failed, with the
    # reason), so the upload still completes and its email says what happened.
    @svc.on(ObjectStored, dead_letters_of="unpacker")
    async def on_object_dead(event: CloudEvent[ObjectStored], tx: Tx, reason: Reason) -> None:
        await archive_outcome(tx, event, None, reason)

    @svc.on(FileStaged, dead_letters_of="metadata")
    async def on_file_dead(event: CloudEvent[FileStaged], tx: Tx, reason: Reason) -> None:
        await file_failed(tx, event.data, reason)

    # Its own dead letters too: a file whose outcome this service could not record (a fault of
    # ours) fails with the reason, and its upload still completes.
    @svc.on(FileValidated, dead_letters_of="importer")
    async def on_validated_dead(event: CloudEvent[FileValidated], tx: Tx, reason: Reason
                                ) -> None:
        await file_failed(tx, event.data, reason)

    @svc.on(FileRejected, dead_letters_of="importer")
    async def on_rejected_dead(event: CloudEvent[FileRejected], tx: Tx, reason: Reason
                               ) -> None:
        await file_failed(tx, event.data, reason)

    async def file_failed(tx: Tx, f: FileStaged | FileValidated | FileRejected, reason: Reason
                          ) -> None:
        await importer.record_files(tx, [(UploadFile(
            file_id=f.file_id, upload_id=f.upload_id, object_key=f.source.object_key,
            staged_key=f.object_key, path=f.path, kind="unknown", state="rejected",
            reason=reason.model_dump()), f.source.files_total)])

    @svc.on(ArchiveUnpacked)
    async def on_archive_unpacked(event: CloudEvent[ArchiveUnpacked], tx: Tx) -> None:
        await archive_outcome(tx, event, event.data.members_staged, None)

    @svc.on(ArchiveRejected)
    async def on_archive_rejected(event: CloudEvent[ArchiveRejected], tx: Tx) -> None:
        await archive_outcome(tx, event, None, event.data.reason)

    return svc


def build_app(settings: Settings) -> FastAPI:
    svc = bootstrap(settings)
    app = create_app(svc)
    app.include_router(catalogue_router(svc))
    return app
