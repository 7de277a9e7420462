"""The importer's tables (schema `importer`): uploads in progress, and the catalogue."""

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

metadata = MetaData(schema="importer")


class Base(SQLModel, registry=registry(metadata=metadata)):
    pass


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSONB, nullable=nullable))


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


# --- uploads being imported ----------------------------------------------------------------------


class Upload(Base, table=True):
    __tablename__ = "upload"
    id: str = Field(primary_key=True, max_length=64)
    state: str = Field(default="collecting", max_length=20,
                       index=True)  # → completing → cleaning → completed (also if cancelled)
    submitted: bool = False
    cancelled: bool = Field(default=False, sa_column_kwargs={"server_default": "false"})
    generation: int = 0  # +1 each time a replayed dead letter re-opens a completed upload
    uploader: dict | None = _json()
    options: dict | None = _json()
    object_keys: list | None = _json()
    rules: dict | None = _json()  # the project's rules when submitted (routing, quarantine)
    submitted_at: datetime | None = _ts()
    # When it was found complete: its sessions are planned from this moment, so that a re-drive
    # plans them into the same places (prearchive timestamps) as the attempt it repeats.
    planned_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class UploadObject(Base, table=True):
    __tablename__ = "upload_object"
    object_key: str = Field(primary_key=True, max_length=1024)
    upload_id: str = Field(index=True, max_length=64)
    files_total: int | None = None
    filename: str | None = Field(default=None, max_length=1024)
    rejected: dict | None = _json()


class UploadFile(Base, table=True):
    __tablename__ = "upload_file"
    file_id: str = Field(primary_key=True, max_length=64)
    upload_id: str = Field(index=True, max_length=64)
    object_key: str = Field(max_length=1024, description="the stored object it came from")
    staged_key: str = Field(max_length=1024)
    path: str = Field(max_length=4096)
    kind: str = Field(max_length=20)
    state: str = Field(max_length=20)  # validated | rejected | duplicate | archived | prearchived
    size: int | None = Field(default=None, sa_column=Column(BigInteger))
    sha256: str | None = Field(default=None, max_length=64)
    reason: dict | None = _json()
    hints: dict | None = _json()
    file_metadata: dict | None = _json()
    fileset: dict | None = _json()  # a multi-file slide: its format and related files
    session_id: str | None = Field(default=None, max_length=512)


# --- the catalogue -------------------------------------------------------------------------------


class Subject(Base, table=True):
    __tablename__ = "subject"
    id: str = Field(primary_key=True, max_length=256)  # project/label
    project: str = Field(max_length=64, index=True)
    label: str = Field(max_length=64)


class Session(Base, table=True):
    __tablename__ = "session"
    id: str = Field(primary_key=True, max_length=512)  # see domain.session_id
    project: str = Field(max_length=64, index=True)
    subject_id: str = Field(max_length=256, index=True)
    label: str = Field(max_length=64)
    state: str = Field(max_length=20)  # archived | prearchived
    uri: str = Field(max_length=1024)
    prefix: str = Field(max_length=1024, description="where its objects live in the store")
    study_uid: str | None = Field(default=None, max_length=128, index=True)
    modalities: list | None = _json()
    quarantined: bool = Field(default=False, sa_column_kwargs={"server_default": "false"})
    entry_state: str | None = Field(default=None, max_length=20)  # a prearchive entry's: READY…
    reason: dict | None = _json()  # why a prearchive entry is in CONFLICT or ERROR
    # What a prearchive entry becomes when built (a gradual send once idle, or a rebuild):
    # {"archive": bool, "overwrite": ..., "quarantine": bool, "pipelines": bool}
    build: dict | None = _json()
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class Scan(Base, table=True):
    __tablename__ = "scan"
    id: str = Field(primary_key=True, max_length=600)  # session id/label
    session_id: str = Field(max_length=512, index=True)
    label: str = Field(max_length=64)
    series_uid: str | None = Field(default=None, max_length=128)
    modality: str | None = Field(default=None, max_length=16)
    description: str | None = Field(default=None, max_length=256)


class CatalogueFile(Base, table=True):
    __tablename__ = "file"
    object_key: str = Field(primary_key=True, max_length=1024)
    scan_id: str = Field(max_length=600, index=True)
    name: str = Field(max_length=512)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    sop_instance_uid: str | None = Field(default=None, max_length=128)
    file_id: str = Field(max_length=64)
    upload_id: str = Field(max_length=64, index=True)
    file_metadata: dict | None = _json()  # what the metadata service read (DICOM fields, EXIF…)


class Project(Base, table=True):
    """The projects there are, with their rules, as project.updated tells (newest wins):
    a project named only by a file's headers must be one of them."""

    __tablename__ = "project"
    id: str = Field(primary_key=True, max_length=64)
    rules: dict = Field(sa_column=Column(JSONB, nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
