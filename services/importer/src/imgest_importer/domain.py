"""When an upload is complete, and where its files go: sessions, scans, archive layout. No I/O.

Layout (XNAT's, in object keys):
  archive/<project>/<subject>/<session>/scans/<scan>/resources/<DICOM|PHOTO>/files/<name>
  prearchive/<project>/<timestamp>/<session>/scans/<scan>/resources/<...>/files/<name>
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath

from imgest_contracts import FileKind, ImportOptions, SessionHints
from imgest_runtime.store import fit_name


@dataclass(frozen=True)
class ObjectProgress:
    files_total: int | None
    rejected: bool
    terminal: int  # files of this object that were validated or rejected


def is_complete(submitted: bool, object_keys: list[str],
                progress: dict[str, ObjectProgress]) -> bool:
    """Every object the client sent has yielded all its files, each validated or rejected."""
    if not submitted:
        return False
    for key in object_keys:
        p = progress.get(key)
        if p is None:
            return False
        if p.rejected:
            continue
        if p.files_total is None or p.terminal < p.files_total:
            return False
    return True


@dataclass(frozen=True)
class Part:
    """One related file of a multi-file slide."""

    path: str  # relative to the index file's folder
    staged_key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ValidFile:
    file_id: str
    staged_key: str
    path: str
    kind: FileKind
    hints: SessionHints
    size: int
    sha256: str
    fileset_format: str | None = None  # a multi-file slide: this is its index file …
    parts: tuple[Part, ...] = ()  # … and these its related files


@dataclass(frozen=True)
class Placement:
    file: ValidFile
    scan: str
    key: str  # destination object key
    name: str
    source: str = ""  # the staged object copied there (default: the file's own)
    size: int | None = None  # (default: the file's own)
    sha256: str | None = None

    @property
    def source_key(self) -> str:
        return self.source or self.file.staged_key


@dataclass
class SessionPlan:
    project: str
    subject: str
    label: str
    archived: bool
    study_uid: str | None
    timestamp: str
    placements: list[Placement] = field(default_factory=list)

    @property
    def id(self) -> str:
        return session_id(self.project, self.subject, self.label, self.archived, self.timestamp)

    @property
    def prefix(self) -> str:
        if self.archived:
            return f"archive/{self.project}/{self.subject}/{self.label}/"
        return f"prearchive/{self.project}/{self.timestamp}/{self.label}/"

    @property
    def uri(self) -> str:
        if self.archived:
            return (f"/data/archive/projects/{self.project}/subjects/{self.subject}"
                    f"/experiments/{self.label}")
        return f"/data/prearchive/projects/{self.project}/{self.timestamp}/{self.label}"

    @property
    def file_ids(self) -> list[str]:
        """The files placed, once each (a multi-file slide is one file in several objects)."""
        return list(dict.fromkeys(p.file.file_id for p in self.placements))

    @property
    def modalities(self) -> list[str]:
        return sorted({p.file.hints.modality for p in self.placements if p.file.hints.modality})


_LABEL = re.compile(r"[^A-Za-z0-9_-]+")


def session_id(project: str, subject: str, label: str, archived: bool, timestamp: str) -> str:
    return (f"{project}/{subject}/{label}" if archived
            else f"prearchive/{project}/{timestamp}/{label}")


def prearchive_timestamp(when: datetime) -> str:
    """XNAT's prearchive folder name: yyyyMMdd_HHmmssSSS."""
    return when.strftime("%Y%m%d_%H%M%S") + f"{when.microsecond // 1000:03d}"


def plan(upload_id: str, options: ImportOptions, files: list[ValidFile], default_project: str,
         now: datetime) -> list[SessionPlan]:
    """Groups validated files into sessions: DICOM by study, photos into one session per upload.

    The upload's explicit project/subject/session win over what the headers say (XNAT's rule).
    """
    timestamp = prearchive_timestamp(now)
    archived = options.auto_archive is not False and not (options.dest or "").startswith(
        "/prearchive")
    sessions: dict[str, SessionPlan] = {}
    labels_taken: dict[tuple[str, str], str] = {}  # XNAT: a session label is unique per project
    for f in sorted(files, key=lambda f: f.path):
        h = f.hints
        group = f"study:{h.study_uid}" if f.kind is FileKind.dicom else f"kind:{f.kind.value}"
        s = sessions.get(group)
        if s is None:
            project = options.project or h.project or default_project
            subject = options.subject or h.subject or "unassigned"
            label = options.session or h.session or (
                f"{subject}_{f.kind.value}" if f.kind is not FileKind.dicom
                else f"study_{(h.study_uid or upload_id)[-12:].replace('.', '_')}")
            # Two studies of one upload must not share a session label.
            base, n = label, 1
            while labels_taken.get((project, label), group) != group:
                n += 1
                label = f"{base}_{n}"
            labels_taken[(project, label)] = group
            this_archived = archived and h.auto_archive is not False
            s = SessionPlan(project, subject, label, this_archived, h.study_uid, timestamp)
            sessions[group] = s
        if f.fileset_format:  # one image in several files: one scan, the vendor's layout
            scan = base = _LABEL.sub("_", PurePosixPath(f.path).stem).strip("_")[:60] or "slide"
            n = 1
            while any(p.scan == scan and p.file.file_id != f.file_id for p in s.placements):
                n += 1  # two slides of one name in a session: two scans, never one over another
                scan = f"{base}_{n}"
            files = f"{s.prefix}scans/{scan}/resources/{f.fileset_format.upper()}/files/"
            name = fit_name(PurePosixPath(f.path).name)
            s.placements.append(Placement(f, scan, files + name, name))
            for part in f.parts:
                if not part.staged_key.startswith(f"staging/{upload_id}/"):
                    continue  # (never: the unpacker staged it; a second guard all the same)
                rel = "/".join(fit_name(c) for c in PurePosixPath(part.path).parts)
                s.placements.append(Placement(f, scan, files + rel, rel, part.staged_key,
                                              part.size, part.sha256))
            continue
        if f.kind is FileKind.dicom:
            scan = h.scan or "1"
            name = f"{h.sop_instance_uid or f.file_id}.dcm"
            resource = "DICOM"
        else:
            scan = f.kind.value
            name = fit_name(f"{f.file_id[:8]}_{PurePosixPath(f.path).name}")
            resource = f.kind.value.upper()
        key = f"{s.prefix}scans/{scan}/resources/{resource}/files/{name}"
        s.placements.append(Placement(f, scan, key, name))
    return list(sessions.values())
