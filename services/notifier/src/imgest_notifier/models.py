"""The notifier's tables (schema `notifier`): every email to send, kept until it is sent (so an
SMTP outage loses nothing and nothing is sent twice), and who hears of each project's news."""

from datetime import datetime
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

metadata = MetaData(schema="notifier")


class Base(SQLModel, registry=registry(metadata=metadata)):
    pass


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


class Notification(Base, table=True):
    __tablename__ = "notification"
    id: str = Field(primary_key=True, max_length=64)
    upload_id: str | None = Field(default=None, max_length=64, index=True)
    session_key: str | None = Field(default=None, max_length=512)
    kind: str = Field(max_length=40)
    recipients: list = Field(sa_column=Column(JSONB, nullable=False))
    subject: str = Field(max_length=998)
    # pending → sending (recorded before the SMTP conversation) → sent (after it);
    # failed once given up on
    state: str = Field(default="sent", max_length=10, index=True,
                       sa_column_kwargs={"server_default": "sent"})
    message: str | None = Field(default=None, sa_column=Column(Text))  # as sent, every time
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    last_error: str | None = Field(default=None, max_length=1000)
    next_attempt_at: datetime | None = _ts()
    claimed_at: datetime | None = _ts()
    created_at: datetime | None = _ts()
    transport: str | None = Field(default=None, max_length=8)
    sent_at: datetime | None = _ts()


class Project(Base, table=True):
    """Who hears of a project's news (its owners, its recipients), from project.updated."""

    __tablename__ = "project"
    id: str = Field(primary_key=True, max_length=64)
    contacts: dict = Field(sa_column=Column(JSONB, nullable=False))
    updated_at: datetime = _ts(nullable=False)


class HeldUpload(Base, table=True):
    """An instance of a gradual send, told of once its session is built (not one email each)."""

    __tablename__ = "held_upload"
    upload_id: str = Field(primary_key=True, max_length=64)
    entry_key: str = Field(max_length=512, index=True)  # prearchive/P/TS/E
    uploader: dict = Field(sa_column=Column(JSONB, nullable=False))
    files: int
    received_at: datetime = _ts(nullable=False)
