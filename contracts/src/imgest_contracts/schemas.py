"""Writes the JSON Schemas in contracts/schemas/ from the models (`python -m imgest_contracts`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .envelope import CloudEvent, event_type, schema_uri, topic_of
from .events import EVENTS, Payload

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def payload_schema(kind: type[Payload]) -> dict[str, Any]:
    schema = kind.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = schema_uri(kind)
    schema["description"] = kind.description
    schema["x-topic"] = topic_of(kind)
    schema["x-key"] = kind.key_field
    schema["x-cloudevents-type"] = event_type(kind)
    return schema


def envelope_schema() -> dict[str, Any]:
    schema = CloudEvent[Payload].model_json_schema()
    schema["properties"]["data"] = {"type": "object", "description": "The event payload."}
    schema.pop("$defs", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "urn:imgest:schema:cloudevent:v1"
    schema["title"] = "CloudEvent"
    schema["description"] = "CloudEvents 1.0 structured-mode envelope around every imgest event."
    return schema


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name → schema, for everything under contracts/schemas/."""
    out = {"cloudevent.v1.json": envelope_schema()}
    for kind in EVENTS:
        out[f"{kind.event}.v1.json"] = payload_schema(kind)
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written
