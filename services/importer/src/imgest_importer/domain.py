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

from imgest_contracts import (
    FileKind,
    ImportOptions,
    ProjectRules,
    Reason,
    SessionHints,
    UploadCompleted,
)
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
    metadata: dict | None = None  # what the metadata service read (DICOM fields, EXIF…)


@dataclass
class Placement:
    file: ValidFile
    scan: str
    key: str  # destination object key
    name: str
    source: str = ""  # the staged object copied there (default: the file's own)
    size: int | None = None  # (default: the file's own)
    sha256: str | None = None
    # add: a new object; replace: copied over the archived one (overwrite=delete); keep: the
    # archived object stays (the same bytes re-sent, or overwrite=append)
    action: str = "add"

    @property
    def source_key(self) -> str:
        return self.source or self.file.staged_key

    @property
    def digest(self) -> str:
        return self.sha256 or self.file.sha256


@dataclass(frozen=True)
class Existing:
    """An archived session a plan lands on (same project and label)."""

    id: str
    uri: str
    subject: str
    study_uid: str | None
    modalities: list[str]
    files: dict[str, str]  # object key → sha256
    ours: bool = False  # holds files of the upload being placed (a re-opened upload)
    created_at: datetime | None = None


@dataclass
class SessionPlan:
    project: str
    subject: str
    label: str
    archived: bool
    study_uid: str | None
    timestamp: str
    placements: list[Placement] = field(default_factory=list)
    quarantined: bool = False
    state: str = "READY"  # of a prearchive entry: RECEIVING, READY, CONFLICT/ERROR with a reason
    reason: Reason | None = None
    existing_uri: str | None = None  # the archived session a CONFLICT collided with

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
LABEL_MAX = 64  # the catalogue's session and scan labels (XNAT's)


def fitted(label: str, suffix: str) -> str:
    """A label with a suffix, cut to fit LABEL_MAX: a header's label may be that long already."""
    return label[:LABEL_MAX - len(suffix)] + suffix


def session_id(project: str, subject: str, label: str, archived: bool, timestamp: str) -> str:
    return (f"{project}/{subject}/{label}" if archived
            else f"prearchive/{project}/{timestamp}/{label}")


def prearchive_timestamp(when: datetime) -> str:
    """XNAT's prearchive folder name: yyyyMMdd_HHmmssSSS."""
    return when.strftime("%Y%m%d_%H%M%S") + f"{when.microsecond // 1000:03d}"


def to_archive(options: ImportOptions, hinted: bool | None, rules: ProjectRules | None) -> bool:
    """Archive or prearchive, in XNAT's order: `dest`, the upload's AA, the DICOM's AA hint,
    then the project's setting (manual keeps sessions in the prearchive)."""
    dest = options.dest or ""
    if dest.startswith("/prearchive"):
        return False
    if dest.startswith("/archive"):
        return True
    if options.auto_archive is not None:
        return options.auto_archive
    if hinted is not None:
        return hinted
    return (rules.auto_archive if rules else "auto") != "manual"


def overwrite_mode(options: ImportOptions, rules: ProjectRules | None) -> str:
    """The upload's overwrite; a project set to auto-archive with overwrite replaces what
    differs when the upload does not ask for more."""
    if options.overwrite == "none" and rules is not None and rules.auto_archive == (
            "auto-overwrite"):
        return "delete"
    return options.overwrite


def land(s: SessionPlan, existing: Existing | None, overwrite: str,
         submitted_at: datetime | None = None) -> None:
    """Decides how an archive-bound session meets the archived one of its label (XNAT's
    overwrite rules): nothing there, added whole; a different subject, study or modality, or
    new content with overwrite=none, a CONFLICT that waits in the prearchive (the archive
    unchanged); otherwise merged, each file added, kept or replaced. The same bytes sent again
    change nothing, whatever the mode.

    A session made after this upload was submitted is no earlier session but this one's twin:
    two uploads of one study sent at once end as one session (XNAT's receiving entry)."""
    if existing is None or not s.archived:
        return
    twin = (submitted_at is not None and existing.created_at is not None
            and existing.created_at >= submitted_at)
    if (existing.ours or twin) and overwrite == "none":
        overwrite = "append"  # a re-opened upload, or a twin, adds to what is there
    what = f"Session {s.label} of project {s.project}"
    conflict = None
    if existing.subject != s.subject:
        conflict = Reason(code="session.subject_mismatch", message=f"{what} is archived under subject "
                    f"{existing.subject}; this upload puts it under {s.subject}.")
    elif s.study_uid and existing.study_uid and s.study_uid != existing.study_uid:
        conflict = Reason(code="session.study_mismatch", message=f"{what} holds study {existing.study_uid}; "
                    f"this upload holds study {s.study_uid}.")
    elif s.modalities and existing.modalities and not set(s.modalities) & set(
            existing.modalities):
        conflict = Reason(code="session.modality_mismatch", message=f"{what} is {'/'.join(existing.modalities)}"
                    f"; this upload is {'/'.join(s.modalities)}.")
    elif overwrite == "none" and any(existing.files.get(p.key) != p.digest
                                     for p in s.placements):
        conflict = Reason(code="session.exists", message=f"{what} is already archived ({existing.uri}) and "
                    "overwrite is none: the archive keeps it as it is. Archive this entry "
                    "with overwrite=append (add new files) or delete (replace what differs).")
    if conflict:
        to_prearchive(s, "CONFLICT", s.timestamp)  # waits in the prearchive instead
        s.existing_uri, s.reason = existing.uri, conflict
        return
    for p in s.placements:
        there = existing.files.get(p.key)
        if there is not None:
            p.action = "keep" if there == p.digest or overwrite == "append" else "replace"


def to_prearchive(s: SessionPlan, state: str, timestamp: str) -> None:
    """Sends a planned session to the prearchive entry of that timestamp, in that state (its
    placements follow it)."""
    before = s.prefix
    s.archived, s.state, s.timestamp = False, state, timestamp
    for p in s.placements:
        p.key = s.prefix + p.key[len(before):]


_DEST_ENTRY = re.compile(r"^/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>\d{8}_\d{9})"
                         r"/(?P<label>[^/]+)/?$")


def dest_entry(options: ImportOptions) -> tuple[str, str, str] | None:
    """The prearchive entry a `dest` names (project, timestamp, label): XNAT merges into it."""
    found = _DEST_ENTRY.match(options.dest or "")
    return (found["project"], found["timestamp"], found["label"]) if found else None


def gradual(options: ImportOptions) -> bool:
    """Instance by instance, never submitted as a whole (XNAT's gradual-DICOM): sessions wait
    RECEIVING until idle, then are built."""
    return (options.import_handler or "").lower() == "gradual-dicom"


def idle_entries(receiving: list[tuple[str, str, datetime]], idle: dict[str, float],
                 default_idle: float, now: datetime) -> list[str]:
    """The RECEIVING entries (id, project, last file) idle long enough to be built: each
    project sets its own idle time (XNAT: 5 minutes)."""
    return [entry for entry, project, last in receiving
            if (now - last).total_seconds() >= idle.get(project, default_idle)]


UNASSIGNED = "Unassigned"


def _group(f: ValidFile) -> str:
    """Which session of an upload's a file joins: its study's, or the upload's images'."""
    return f"study:{f.hints.study_uid}" if f.kind is FileKind.dicom else "images"


def plan(upload_id: str, options: ImportOptions, files: list[ValidFile], default_project: str,
         now: datetime, rules: ProjectRules | None = None,
         projects: dict[str, ProjectRules] | None = None,
         allowed: list[str] | None = None) -> list[SessionPlan]:
    """Groups validated files into sessions: DICOM by study into one scan per series; the
    photos and slides of an upload into one session (its session fields), one scan per image.

    The upload's explicit project/subject/session win over what the headers say (XNAT's rule).
    A project named only by the headers must exist (`projects`, with its rules) and be one the
    uploader may send into (`allowed`; None: any); otherwise the session goes to the default
    project, Unassigned, which holds sessions in the prearchive until someone moves them.
    """
    projects = projects or {}
    timestamp = prearchive_timestamp(now)
    sessions: dict[str, SessionPlan] = {}
    labels_taken: dict[tuple[str, str], str] = {}  # XNAT: a session label is unique per project
    # A scan per series: of two series of one number in a study (a localizer and its MPR,
    # say), the second by UID is scan "<number>_2", never one scan of both.
    numbered: dict[tuple[str, str], set[str | None]] = {}
    for f in files:
        if f.kind is FileKind.dicom:
            numbered.setdefault((_group(f), f.hints.scan or "1"), set()).add(f.hints.series_uid)
    series_rank = {(group, scan, uid): rank for (group, scan), uids in numbered.items()
                   for rank, uid in enumerate(sorted(uids, key=str))}
    for f in sorted(files, key=lambda f: f.path):
        h = f.hints
        group = _group(f)
        s = sessions.get(group)
        if s is None:
            hinted = h.project in projects and (allowed is None or h.project in allowed)
            project = options.project or (h.project if hinted else None) or default_project
            project_rules = rules if rules and rules.project == project else projects.get(
                project)
            subject = options.subject or h.subject or "unassigned"
            # Unnamed, an upload's images are a session of their own (its id in the label),
            # as a study's files are (its UID's): the next upload's never meet it as a CONFLICT.
            label = options.session or h.session or (
                fitted(subject, f"_images_{upload_id[:8]}") if f.kind is not FileKind.dicom
                else f"study_{(h.study_uid or upload_id)[-12:].replace('.', '_')}")
            # Two studies of one upload must not share a session label.
            base, n = label, 1
            while labels_taken.get((project, label), group) != group:
                n += 1
                label = fitted(base, f"_{n}")
            labels_taken[(project, label)] = group
            archived = project != UNASSIGNED and to_archive(options, h.auto_archive,
                                                            project_rules)
            quarantined = options.quarantine if options.quarantine is not None else bool(
                project_rules and project_rules.quarantine)
            s = SessionPlan(project, subject, label, archived, h.study_uid, timestamp,
                            quarantined=quarantined)
            sessions[group] = s
        if f.kind is not FileKind.dicom:  # an image (photo, slide, fileset): a scan of its own
            scan = base = _LABEL.sub("_", PurePosixPath(f.path).stem).strip("_")[:60] or (
                f.kind.value)
            n = 1
            while any(p.scan == scan and p.file.file_id != f.file_id for p in s.placements):
                n += 1  # two images of one name in a session: two scans, never one over another
                scan = f"{base}_{n}"
        if f.fileset_format:  # one image in several files: the vendor's layout
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
            if (rank := series_rank[(group, scan, h.series_uid)]) > 0:
                scan = fitted(scan, f"_{rank + 1}")
            name = f"{h.sop_instance_uid or f.file_id}.dcm"
            resource = "DICOM"
        else:
            name = fit_name(PurePosixPath(f.path).name)
            resource = f.kind.value.upper()
        key = f"{s.prefix}scans/{scan}/resources/{resource}/files/{name}"
        s.placements.append(Placement(f, scan, key, name))
    return list(sessions.values())


def within_budget(done: UploadCompleted, budget: int) -> UploadCompleted:
    """upload.completed as it can be sent: past `budget` bytes (an upload of some 200,000
    files), without its sessions' file ids, whose number `files` still says. The upload still
    ends, and its email still counts; what is in each session is in the catalogue."""
    if len(done.model_dump_json(exclude_none=True)) <= budget:
        return done
    return done.model_copy(update={"sessions": [
        s.model_copy(update={"file_ids": []}) for s in done.sessions]})
