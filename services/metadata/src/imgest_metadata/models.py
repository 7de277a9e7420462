"""The metadata service's tables (schema `metadata`): its copy of each project's rules, and
what each upload in progress holds already (for duplicate checks), beside the delivery tables."""

from datetime import datetime
from typing import Any

from sqlalchemy import Column, DateTime, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

metadata = MetaData(schema="metadata")


class Base(SQLModel, registry=registry(metadata=metadata)):
    pass


class ProjectRulesRow(Base, table=True):
    """A project's rules as project.updated last told them (the newest wins)."""

    __tablename__ = "project_rules"
    project: str = Field(primary_key=True, max_length=64)
    rules: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class SeenFile(Base, table=True):
    """The first file of an upload with a given content (`sha256:…`) or DICOM instance
    (`sop:…`); a later one with the same key is a duplicate of it. Dropped when the upload
    completes."""

    __tablename__ = "seen_file"
    upload_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=200)
    file_id: str = Field(max_length=64)
    path: str
