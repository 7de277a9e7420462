"""The notifier's tables (schema `notifier`): what was sent, so nothing is sent twice."""

from datetime import datetime

from sqlalchemy import Column, DateTime, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

metadata = MetaData(schema="notifier")


class Base(SQLModel, registry=registry(metadata=metadata)):
    pass


class Notification(Base, table=True):
    __tablename__ = "notification"
    id: str = Field(primary_key=True, max_length=64)
    upload_id: str | None = Field(default=None, max_length=64, index=True)
    kind: str = Field(max_length=40)
    recipients: list = Field(sa_column=Column(JSONB, nullable=False))
    subject: str = Field(max_length=998)
    transport: str = Field(max_length=8)
    sent_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
