"""The gateway's own tables (schema `gateway`): uploads as users see them."""

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

metadata = MetaData(schema="gateway")


class Base(SQLModel, registry=registry(metadata=metadata)):
    pass


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kw))


class Upload(Base, table=True):
    __tablename__ = "upload"
    id: str = Field(primary_key=True, max_length=64)
    state: str = Field(max_length=20, index=True)
    project: str | None = Field(default=None, max_length=64, index=True)
    uploader: str = Field(max_length=128, index=True)
    email: str | None = Field(default=None, max_length=320)
    options: dict = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    summary: dict | None = Field(default=None, sa_column=Column(JSONB))
    created_at: datetime = _ts(nullable=False)
    completed_at: datetime | None = _ts(nullable=True)
    redrives: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    files_added: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # the cap
    redriven_at: datetime | None = _ts(nullable=True)
    # upload.submitted and upload.cancelled as sent: a re-drive sends them again from here
    # (the outbox forgets sent events after IMGEST_REPLAY_HOURS).
    submission: dict | None = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    cancellation: dict | None = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))


class UploadObject(Base, table=True):
    """What the client sent: one stored object (a file or an archive)."""

    __tablename__ = "upload_object"
    # The same content twice in an open upload is a duplicate: the database says so, at once,
    # however many clients add files at the same time.
    __table_args__ = (Index("upload_object_added_once", "upload_id", "sha256", unique=True,
                            postgresql_where=text("state = 'added'")),)
    object_key: str = Field(primary_key=True, max_length=1024)
    upload_id: str = Field(index=True, max_length=64)
    filename: str = Field(max_length=1024)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64, index=True)
    content_type: str | None = Field(default=None, max_length=255)
    # added (in an open upload) | duplicate (skipped) | stored → staged (one file) | unpacked |
    # rejected | failed
    state: str = Field(max_length=20)
    reason: dict | None = Field(default=None, sa_column=Column(JSONB))
    event: dict | None = Field(  # the event that last moved it on: a re-drive sends it again
        default=None, sa_column=Column(JSONB(none_as_null=True)))
    progress: dict | None = Field(  # an archive being unpacked: files done / in all, bytes
        default=None, sa_column=Column(JSONB(none_as_null=True)))


class UploadFile(Base, table=True):
    """One file as the pipeline sees it (an archive yields many)."""

    __tablename__ = "upload_file"
    # The files of a prearchive entry, found when it leaves (archived: they are archived too)
    # and when new content is checked against what waits in the prearchive.
    __table_args__ = (Index("upload_file_prearchived_session", "session",
                            postgresql_where=text("state = 'prearchived'")),)
    file_id: str = Field(primary_key=True, max_length=64)
    upload_id: str = Field(index=True, max_length=64)
    object_key: str = Field(max_length=1024)
    # The stored object it came from (itself, or its archive): an archive refused whole takes
    # its files with it, some told of while it still unpacked.
    source_key: str | None = Field(default=None, max_length=1024)
    path: str = Field(max_length=4096)
    kind: str | None = Field(default=None, max_length=20)
    sha256: str | None = Field(default=None, max_length=64, index=True)  # duplicate checks
    state: str = Field(max_length=20)
    reason: dict | None = Field(default=None, sa_column=Column(JSONB))
    session: str | None = Field(default=None, max_length=1024)
    event: dict | None = Field(  # the event that last moved it on: a re-drive sends it again
        default=None, sa_column=Column(JSONB(none_as_null=True)))
    updated_at: datetime = _ts(nullable=False)


# --- identity and projects ----------------------------------------------------------------------


class User(Base, table=True):
    __tablename__ = "user"
    username: str = Field(primary_key=True, max_length=64)
    email: str | None = Field(default=None, max_length=320)
    password_hash: str | None = Field(default=None, max_length=200)  # None: tokens only
    admin: bool = Field(default=False)
    active: bool = Field(default=True)
    success_emails: bool = Field(default=True, sa_column_kwargs={"server_default": "true"})
    created_at: datetime = _ts(nullable=False)


class ApiToken(Base, table=True):
    """A secret that stands for its user (shown once; only its SHA-256 is kept)."""

    __tablename__ = "api_token"
    id: str = Field(primary_key=True, max_length=32)
    username: str = Field(index=True, max_length=64)
    name: str = Field(max_length=200)
    secret_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime | None = _ts(nullable=True)
    last_used_at: datetime | None = _ts(nullable=True)
    revoked_at: datetime | None = _ts(nullable=True)


class LoginSession(Base, table=True):
    """An XNAT-style `JSESSIONID`: what `/data/JSESSION` and `/data/services/auth` hand out."""

    __tablename__ = "login_session"
    id_hash: str = Field(primary_key=True, max_length=64)
    username: str = Field(index=True, max_length=64)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = _ts(nullable=False)


class Project(Base, table=True):
    __tablename__ = "project"
    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    description: str = Field(default="", max_length=4000)
    settings: dict = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class Membership(Base, table=True):
    __tablename__ = "membership"
    project: str = Field(primary_key=True, max_length=64)
    username: str = Field(primary_key=True, max_length=64, index=True)
    role: str = Field(max_length=20)  # owner | member | uploader


class TusUpload(Base, table=True):
    """A resumable (tus) upload of one file into an upload session. Its bytes so far are
    segments in the store (`.tus/{id}/{offset}`); once complete they become the file."""

    __tablename__ = "tus_upload"
    id: str = Field(primary_key=True, max_length=32)
    upload_id: str = Field(index=True, max_length=64)
    username: str = Field(max_length=64)
    filename: str = Field(max_length=1024)
    length: int = Field(sa_column=Column(BigInteger, nullable=False))
    offset: int = Field(sa_column=Column(BigInteger, nullable=False))
    metadata_header: str = Field(default="", max_length=8192)  # as the client sent it
    segments: list = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = _ts(nullable=False, index=True)
    object_key: str | None = Field(default=None, max_length=1024)  # set once complete


class ArchiveRequest(Base, table=True):
    """A request to archive a prearchive entry, and its answer (prearchive.answered)."""

    __tablename__ = "archive_request"
    id: str = Field(primary_key=True, max_length=64)
    session_key: str = Field(max_length=512)
    project: str = Field(max_length=64, index=True)
    username: str = Field(max_length=64)
    state: str = Field(max_length=20)  # pending → archived | conflict | refused
    uri: str | None = Field(default=None, max_length=1024)
    reason: dict | None = Field(default=None, sa_column=Column(JSONB))
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class PrearchiveEntry(Base, table=True):
    """A session waiting in the prearchive, as the importer's events tell (the gateway's view)."""

    __tablename__ = "prearchive_entry"
    session_key: str = Field(primary_key=True, max_length=512)  # prearchive/P/timestamp/label
    project: str = Field(max_length=64, index=True)
    timestamp: str = Field(max_length=20)
    label: str = Field(max_length=64)
    subject: str = Field(max_length=64)
    uri: str = Field(max_length=1024, index=True)  # (the files' `session` names it)
    state: str = Field(max_length=20)  # XNAT's: READY, CONFLICT, …
    reason: dict | None = Field(default=None, sa_column=Column(JSONB))
    files: int = 0
    uploads: list | None = Field(default=None, sa_column=Column(JSONB))
    updated_at: datetime = _ts(nullable=False)


class ArchivedSession(Base, table=True):
    """A session in the archive, as session.archived and session.released tell (the gateway's
    view: what the catalogue lists, and whether it is quarantined)."""

    __tablename__ = "archived_session"
    session_key: str = Field(primary_key=True, max_length=512)  # project/subject/label
    project: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=64)
    label: str = Field(max_length=64)
    uri: str = Field(max_length=1024)
    study_uid: str | None = Field(default=None, max_length=128)
    modalities: list | None = Field(default=None, sa_column=Column(JSONB))
    quarantined: bool = False
    archived_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
