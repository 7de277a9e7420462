"""Event payloads (the `data` of a CloudEvent), one model per event type, version 1.

These models are the source of truth: `python -m imgest_contracts` writes the JSON Schemas in
contracts/schemas/ from them, and a test fails when the checked-in schemas drift.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
)
from typing_extensions import TypeAliasType


class Payload(BaseModel):
    """Base of every event payload: knows its event name and which field keys the message."""

    model_config = ConfigDict(extra="forbid")

    event: ClassVar[str]  # e.g. "object.stored"; topic is "imgest." + event
    key_field: ClassVar[str] = "upload_id"
    description: ClassVar[str] = ""

    def message_key(self) -> str:
        return str(getattr(self, self.key_field))


# --- shared parts ----------------------------------------------------------------------------


def _json_integer(value: Any) -> Any:
    """JSON's integers: 3 and 3.0 (JSON Schema counts both), not "3" or true."""
    if isinstance(value, (bool, str)):
        raise ValueError("a JSON integer is required")  # noqa: TRY004 (pydantic wants ValueError)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(ge: int, le: int) -> Any:
    """An integer in [ge, le] as JSON has it (the bounds sit under the check, so the JSON
    Schema keeps them as minimum and maximum)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_json_integer)]


# JSON without NUL characters (PostgreSQL's jsonb cannot hold U+0000), for what users write.
NulFree = Annotated[str, Field(pattern=r"^[^\x00]*$")]
Json = TypeAliasType(  # type: ignore[misc]
    "Json", "NulFree | int | float | bool | None | list[Json] | dict[NulFree, Json]")
EMAIL = r"^[^@\x00-\x20\x7f]+@[^@\x00-\x20\x7f]+$"  # same in Python and ECMA regex
FIELD_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"


class FileKind(StrEnum):
    dicom = "dicom"
    photo = "photo"  # JPEG/PNG/TIFF photograph
    slide = "slide"  # whole-slide image (single file or fileset)
    csv = "csv"
    unknown = "unknown"


class Uploader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    email: str | None = None
    success_emails: bool = Field(True, description="Wants an email when an upload succeeds "
                                 "(failures are always told).")
    projects: list[str] | None = Field(
        None, description="The projects the uploader may send files into when the upload was "
        "submitted (None: any, an administrator). A project named only by a file's headers "
        "that is not one of them sends its session to Unassigned (XNAT's rule).")


class ImportOptions(BaseModel):
    """What the user asked for with an upload (XNAT's import parameters, in our words)."""

    model_config = ConfigDict(extra="forbid")
    project: str | None = Field(None, description="Explicit project; overrides DICOM hints.")
    subject: str | None = None
    session: str | None = None
    dest: str | None = Field(None, description="XNAT-style destination, e.g. /archive/projects/P.")
    overwrite: Literal["none", "append", "delete"] = "none"
    quarantine: bool | None = None
    auto_archive: bool | None = Field(None, description="Overrides the project's setting.")
    trigger_pipelines: bool = True
    import_handler: str | None = None
    fields: dict[str, str] = Field(default_factory=dict, description="Free fields: view, date…")


class Source(BaseModel):
    """Where a staged file came from: the stored object and, for archive members, its path."""

    model_config = ConfigDict(extra="forbid")
    object_key: str
    member: str | None = Field(None, description="Path inside the archive, if any.")
    files_total: int | None = Field(
        None, ge=0, description="How many files this stored object yields in all (1 unless "
        "archive); null for a member told of while its archive is still being unpacked "
        "(archive.unpacked then says how many)."
    )


class FilesetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="Relative to the index file's folder: where the vendor's "
                      "software expects it (e.g. `slide/Data0001.dat`).")
    object_key: str
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern="^[0-9a-f]{64}$")


class Fileset(BaseModel):
    """A whole-slide image in several files, kept together as one image."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["mrxs", "vsi", "afi", "ndpis"]
    files: list[FilesetFile] = Field(..., description="The related files; the index file is "
                                     "the event's own object.")


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(..., description="Stable machine code, e.g. 'dicom.malformed'.")
    message: str = Field(..., description="What a person reads: what was wrong, what was expected.")


class SessionHints(BaseModel):
    """Labels and grouping keys the metadata service found; the importer decides with them."""

    model_config = ConfigDict(extra="forbid")
    project: str | None = None
    subject: str | None = None
    session: str | None = None
    auto_archive: bool | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    modality: str | None = None
    scan: str | None = Field(None, description="Scan label, e.g. series number.")


class ProjectRules(BaseModel):
    """What a project's files are checked against (its settings as they were when the upload
    was submitted; the metadata service uses a newer copy from project.updated if it has one)."""

    model_config = ConfigDict(extra="forbid")
    project: str
    accepted_kinds: list[FileKind] = Field(..., description="Kinds of file the project takes.")
    metadata_rules: dict[FileKind, dict[NulFree, Json]] = Field(
        default_factory=dict, description="A JSON Schema per file kind for its metadata.")
    auto_archive: Literal["manual", "auto", "auto-overwrite"] = Field(
        "auto", description="Where sessions go when the upload does not say (see "
        "ProjectSettings).")
    quarantine: bool = Field(False, description="Archived content is quarantined by default.")
    gradual_idle_seconds: float = Field(300.0, description="See ProjectSettings.")
    updated_at: datetime = Field(..., description="When the project's settings last changed.")

    @classmethod
    def of(cls, project: str, settings: ProjectSettings, updated_at: datetime) -> ProjectRules:
        return cls(project=project, accepted_kinds=settings.accepted_kinds,
                   metadata_rules=settings.metadata_rules, auto_archive=settings.auto_archive,
                   quarantine=settings.quarantine,
                   gradual_idle_seconds=settings.gradual_idle_seconds, updated_at=updated_at)


# --- events ----------------------------------------------------------------------------------


class ObjectStored(Payload):
    event: ClassVar[str] = "object.stored"
    description: ClassVar[str] = "Bytes of an upload are durable in the object store (staging)."
    upload_id: str
    project: str | None = None
    object_key: str
    filename: str
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern="^[0-9a-f]{64}$")
    content_type: str | None = None
    rules: ProjectRules | None = Field(None, description="The project's rules for its files.")
    only_object: bool = Field(False, description=(
        "The upload's only object. Then an archive's members may go on before it is wholly "
        "unpacked: should it be refused after all, no other object's file was taken for a "
        "duplicate of one of them."))


class UploadSubmitted(Payload):
    event: ClassVar[str] = "upload.submitted"
    description: ClassVar[str] = "An upload is complete on the client side; process its objects."
    upload_id: str
    uploader: Uploader
    options: ImportOptions
    object_keys: list[str]
    submitted_at: datetime
    rules: ProjectRules | None = Field(None, description="The project's rules when submitted "
                                       "(routing, quarantine).")


class UploadCancelled(Payload):
    event: ClassVar[str] = "upload.cancelled"
    description: ClassVar[str] = (
        "The uploader cancelled an upload being processed: nothing of it not yet placed is "
        "placed; it completes with the outcome `cancelled`. A cancel that comes after the "
        "importer began placing the upload's files changes nothing.")
    upload_id: str
    username: str
    cancelled_at: datetime


class FileStaged(Payload):
    event: ClassVar[str] = "file.staged"
    description: ClassVar[str] = "One file (or archive member) is ready for inspection."
    upload_id: str
    file_id: str
    object_key: str
    path: str = Field(..., description="What the user calls it: file name or archive/member path.")
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern="^[0-9a-f]{64}$")
    source: Source
    fileset: Fileset | None = Field(None, description="Set for a multi-file slide: the object "
                                    "is its index file, these its related files.")
    project: str | None = Field(None, description="The upload's project, if it names one.")
    rules: ProjectRules | None = Field(None, description="As object.stored said.")


class ArchiveUnpacked(Payload):
    event: ClassVar[str] = "archive.unpacked"
    description: ClassVar[str] = "An archive's members are all staged."
    upload_id: str
    object_key: str
    filename: str
    format: str
    members_staged: int = Field(..., ge=0)
    members_skipped: int = Field(..., ge=0, description="Junk such as __MACOSX/ and .DS_Store.")
    bytes_unpacked: int = Field(..., ge=0)


class ArchiveProgress(Payload):
    event: ClassVar[str] = "archive.progress"
    description: ClassVar[str] = (
        "How far the unpacking of an archive has got; sent every few seconds while a large one "
        "unpacks. archive.unpacked or archive.rejected says how it ended.")
    upload_id: str
    object_key: str
    members_done: int = Field(..., ge=0, description="Files staged so far.")
    members_total: int | None = Field(None, ge=0, description="Files in all, when the archive "
                                      "says (a zip's directory does; a tar does not).")
    bytes_done: int = Field(..., ge=0)


class ArchiveRejected(Payload):
    event: ClassVar[str] = "archive.rejected"
    description: ClassVar[str] = "An archive was refused as a whole; none of its members staged."
    upload_id: str
    object_key: str
    filename: str
    reason: Reason


class FileValidated(Payload):
    event: ClassVar[str] = "file.validated"
    description: ClassVar[str] = "A file was identified and passed its project's rules."
    upload_id: str
    file_id: str
    object_key: str
    path: str
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern="^[0-9a-f]{64}$")
    source: Source
    kind: FileKind
    metadata: dict[str, Any] = Field(default_factory=dict)
    hints: SessionHints = Field(default_factory=SessionHints)
    fileset: Fileset | None = Field(None, description="As file.staged said: a multi-file slide.")


class FileRejected(Payload):
    event: ClassVar[str] = "file.rejected"
    description: ClassVar[str] = "A file was refused, with the reason a person reads."
    upload_id: str
    file_id: str
    object_key: str
    path: str
    source: Source
    kind: FileKind = FileKind.unknown
    reason: Reason
    duplicate_of: str | None = Field(
        None, description="Set when the file is skipped as a duplicate: the path of the file "
        "of the same upload it repeats (same content, or same DICOM SOP Instance UID).")


class SessionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str
    subject: str
    session: str
    uri: str = Field(..., description="XNAT-style URI, e.g. /data/archive/projects/P/...")


class SessionPrearchived(Payload):
    event: ClassVar[str] = "session.prearchived"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = "A session waits in the prearchive for review."
    session_key: str
    upload_ids: list[str]
    session: SessionRef
    timestamp: str = Field(..., description="Prearchive folder timestamp, yyyyMMdd_HHmmssSSS.")
    state: Literal["RECEIVING", "BUILDING", "READY", "CONFLICT", "ERROR", "ARCHIVING"]
    files: int = Field(..., ge=0)
    reason: Reason | None = None


class SessionArchived(Payload):
    event: ClassVar[str] = "session.archived"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = "A session entered the archive (study complete)."
    session_key: str
    upload_ids: list[str]
    session: SessionRef
    study_uid: str | None = None
    modalities: list[str] = Field(default_factory=list)
    scans: int = Field(..., ge=0)
    files: int = Field(..., ge=0)
    quarantined: bool = False
    archived_at: datetime
    entry_key: str | None = Field(None, description="The prearchive entry it was archived "
                                  "from, which is gone now.")


class SessionConflicted(Payload):
    event: ClassVar[str] = "session.conflicted"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = (
        "A session could not be archived onto the one already there (overwrite=none, or its "
        "subject, study or modality differ): it waits in the prearchive as CONFLICT and the "
        "archive is unchanged.")
    session_key: str = Field(..., description="The prearchive entry holding the session.")
    upload_ids: list[str]
    session: SessionRef
    existing_uri: str = Field(..., description="The archived session it collided with.")
    reason: Reason


class SessionFailed(Payload):
    event: ClassVar[str] = "session.failed"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = (
        "A session could not be built or archived (its objects are missing or unreadable): it "
        "waits in the prearchive as ERROR with the reason, and the archive is unchanged.")
    session_key: str = Field(..., description="The prearchive entry holding the session.")
    upload_ids: list[str]
    session: SessionRef
    reason: Reason


class PipelinesRequested(Payload):
    event: ClassVar[str] = "pipelines.requested"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = (
        "A session was archived and its upload did not turn pipelines off "
        "(triggerPipelines=false): other systems may now process it.")
    session_key: str
    upload_ids: list[str]
    session: SessionRef
    study_uid: str | None = None
    modalities: list[str] = Field(default_factory=list)
    quarantined: bool = False
    requested_at: datetime


class PrearchiveRequested(Payload):
    event: ClassVar[str] = "prearchive.requested"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = (
        "A command on a prearchive entry: archive it (XNAT's commit, with the overwrite "
        "rules), move it to another project, delete it, or rebuild it (build a RECEIVING entry "
        "now; look again at a CONFLICT or ERROR); prearchive.answered answers it.")
    request_id: str
    session_key: str = Field(..., description="The prearchive entry, e.g. "
                             "prearchive/P/20260101_120000000/E1.")
    action: Literal["archive", "delete", "move", "rebuild"] = "archive"
    to_project: str | None = Field(None, description="For move: the project the entry goes "
                                   "to (it stays in the prearchive).")
    username: str
    overwrite: Literal["none", "append", "delete"] = "none"
    quarantine: bool | None = None
    trigger_pipelines: bool = True
    subject: str | None = Field(None, max_length=64, description="For archive: the subject "
                                "it is archived under (XNAT's `subject`); the entry's if none.")
    label: str | None = Field(None, max_length=64, description="For archive: the session label "
                              "it is archived as (XNAT's `session`); the entry's if none.")
    requested_at: datetime


class PrearchiveAnswered(Payload):
    event: ClassVar[str] = "prearchive.answered"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = "The answer to prearchive.requested."
    request_id: str
    session_key: str = Field(..., description="The prearchive entry the request named.")
    state: Literal["archived", "moved", "deleted", "rebuilt", "conflict", "failed", "refused"]
    uri: str | None = Field(None, description="Where the session is now (archive or "
                            "prearchive).")
    reason: Reason | None = None


class ReleaseRequested(Payload):
    event: ClassVar[str] = "release.requested"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = (
        "A command: lift the quarantine of an archived session (a project owner's call); "
        "session.released tells it is done.")
    request_id: str
    session_key: str = Field(..., description="The archived session, e.g. P/S/E.")
    username: str
    requested_at: datetime


class SessionReleased(Payload):
    event: ClassVar[str] = "session.released"
    key_field: ClassVar[str] = "session_key"
    description: ClassVar[str] = "An archived session left quarantine."
    request_id: str | None = None
    session_key: str
    session: SessionRef
    released_by: str
    released_at: datetime


class SessionOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    label: str
    state: Literal["archived", "prearchived", "receiving", "conflict", "failed"] = Field(
        ..., description="receiving: a gradual send's entry, built once idle.")
    file_ids: list[str] = Field(..., description="Its files' ids; none when listing every "
                                "session's would make the event larger than a broker takes "
                                "(an upload of some 200,000 files): `files` says how many.")
    files: int | None = Field(None, ge=0, description="How many files it holds.")
    reason: Reason | None = Field(None, description="Why a session is in conflict or failed.")

    @property
    def file_count(self) -> int:
        return self.files if self.files is not None else len(self.file_ids)


class FileFailure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_id: str | None = None
    path: str
    reason: Reason


class UploadCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: int = Field(..., ge=0)
    archived: int = Field(0, ge=0)
    prearchived: int = Field(0, ge=0)
    rejected: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    conflicted: int = Field(0, ge=0, description="In the prearchive in CONFLICT with the "
                            "archive, waiting for someone's decision.")
    duplicates: int = Field(0, ge=0, description="Skipped as repeats of another file of the "
                            "upload (not counted in `files`).")


# How many failures (and duplicates) upload.completed names: a failure is ~300 bytes, so an
# upload of many refused files stays far below what a broker takes (its sessions' file ids,
# ~40 bytes each, are listed unless there are too many: SessionOutcome.file_ids).
LISTED_FAILURES = 1000


class UploadCompleted(Payload):
    event: ClassVar[str] = "upload.completed"
    description: ClassVar[str] = "Every file of an upload reached an outcome."
    upload_id: str
    uploader: Uploader
    project: str | None = None
    outcome: Literal["succeeded", "partial", "failed", "cancelled"]
    counts: UploadCounts
    sessions: list[SessionOutcome]
    failures: list[FileFailure] = Field(..., description=(
        f"Files not imported, each with its reason: the first {LISTED_FAILURES:,} (the "
        "status API lists every file)."))
    failures_omitted: int = Field(0, ge=0, description="Failures not listed here.")
    skipped: list[FileFailure] = Field(
        default_factory=list, description=f"Files skipped as duplicates, each with its "
        f"reason: the first {LISTED_FAILURES:,}.")
    skipped_omitted: int = Field(0, ge=0, description="Duplicates not listed here.")
    completed_at: datetime
    generation: int = Field(
        0, ge=0, description="0 the first time; one more each time a replayed dead letter "
        "re-opened the upload and it completed again.")


class NotificationSent(Payload):
    event: ClassVar[str] = "notification.sent"
    key_field: ClassVar[str] = "notification_id"
    description: ClassVar[str] = "An email was handed to the mail server (or written as .eml)."
    notification_id: str
    upload_id: str | None = None
    kind: str
    recipients: list[str]
    subject: str
    transport: Literal["smtp", "eml"]
    sent_at: datetime




Address = Annotated[str, Field(pattern=EMAIL, max_length=320)]
NoticeKind = Literal["upload.succeeded", "upload.partial", "upload.failed", "upload.cancelled",
                     "session.conflicted", "session.failed", "session.quarantined"]


class Contact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    email: str | None = None


class ProjectSettings(BaseModel):
    """What a project decides for the uploads into it (its owner sets it)."""

    model_config = ConfigDict(extra="forbid")
    auto_archive: Literal["manual", "auto", "auto-overwrite"] = Field(
        "auto", description="manual: sessions wait in the prearchive for review; auto: they go "
        "to the archive; auto-overwrite: and replace what is there.")
    quarantine: StrictBool = Field(False,
                                   description="Archived content is quarantined by default.")
    gradual_idle_seconds: float = Field(
        300.0, ge=0.1, le=86400, description="A session sent instance by instance "
        "(gradual-DICOM) is built once no file came for this long (XNAT: 5 minutes).")
    accepted_kinds: list[FileKind] = Field(
        default_factory=lambda: [FileKind.dicom, FileKind.photo, FileKind.slide, FileKind.csv],
        description="Kinds of file the project takes; others are rejected with a reason.")
    required_fields: list[Annotated[str, Field(pattern=FIELD_NAME)]] = Field(
        default_factory=list, description="Upload fields every upload must carry (e.g. "
        "view_name, capture_date); a missing one is refused when the upload is created.")
    max_files_per_upload: json_int(1, 1_000_000) = Field(  # type: ignore[valid-type]
        1500, description="Most files one upload may hold.")
    metadata_rules: dict[FileKind, dict[NulFree, Json]] = Field(
        default_factory=dict, description="A JSON Schema per file kind that a file's metadata "
        "must satisfy (e.g. a photo must carry DateTimeOriginal).")
    notify: list[Address] = Field(
        default_factory=list, description="Addresses told of every upload's outcome.")
    recipients: dict[NoticeKind, list[Address]] = Field(
        default_factory=dict, description="Addresses told of each kind of news of the project, "
        "besides the uploader (upload.*) and the project's owners (session.*).")

    @field_validator("metadata_rules")
    @classmethod
    def _rules_are_schemas(cls, rules: dict[FileKind, dict[str, Any]]
                           ) -> dict[FileKind, dict[str, Any]]:
        import jsonschema

        for kind, schema in rules.items():
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"the rule for {kind.value} is not a JSON Schema: {e.message}"
                                 ) from None
        return rules


class ProjectUpdated(Payload):
    event: ClassVar[str] = "project.updated"
    key_field: ClassVar[str] = "project"
    description: ClassVar[str] = "A project's settings, as they now are (state transfer)."
    project: str
    name: str
    settings: ProjectSettings
    owners: list[Contact] = Field(default_factory=list,
                                  description="Who is told when a session needs attention.")
    updated_at: datetime


EVENTS: tuple[type[Payload], ...] = (
    ObjectStored,
    UploadSubmitted,
    UploadCancelled,
    FileStaged,
    ArchiveProgress,
    ArchiveUnpacked,
    ArchiveRejected,
    FileValidated,
    FileRejected,
    SessionPrearchived,
    SessionArchived,
    SessionConflicted,
    SessionFailed,
    PipelinesRequested,
    PrearchiveRequested,
    PrearchiveAnswered,
    ReleaseRequested,
    SessionReleased,
    UploadCompleted,
    NotificationSent,
    ProjectUpdated,
)
