"""The CloudEvents 1.0 envelope (structured JSON mode) around every imgest event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .events import Payload

P = TypeVar("P", bound=Payload)

TOPIC_PREFIX = "imgest."
SCHEMA_VERSION = "v1"


def topic_of(payload_type: type[Payload]) -> str:
    """`imgest.<entity>.<past-tense-event>`."""
    return TOPIC_PREFIX + payload_type.event


def event_type(payload_type: type[Payload]) -> str:
    return f"{TOPIC_PREFIX}{payload_type.event}.{SCHEMA_VERSION}"


def schema_uri(payload_type: type[Payload]) -> str:
    return f"urn:imgest:schema:{payload_type.event}:{SCHEMA_VERSION}"


class CloudEvent(BaseModel, Generic[P]):
    """CloudEvents 1.0 attributes plus the typed payload in `data`."""

    model_config = ConfigDict(extra="allow")  # CloudEvents allows extension attributes

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(..., min_length=1)
    source: str = Field(..., min_length=1, description="/imgest/<service>")
    type: str = Field(..., min_length=1)
    time: datetime
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None
    data: P

    @classmethod
    def wrap(cls, payload: P, *, source: str, event_id: str | None = None) -> CloudEvent[P]:
        kind = type(payload)
        return cls[kind](  # type: ignore[index]
            id=event_id or str(uuid.uuid4()),
            source=source,
            type=event_type(kind),
            time=datetime.now(UTC),
            subject=payload.message_key(),
            dataschema=schema_uri(kind),
            data=payload,
        )
