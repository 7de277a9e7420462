"""The contracts: checked-in JSON Schemas match the models, and the models obey the schemas."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import jsonschema
import pytest
from imgest_contracts import (
    EVENTS,
    CloudEvent,
    FileKind,
    FileStaged,
    ImportOptions,
    ObjectStored,
    Reason,
    SessionArchived,
    SessionFailed,
    SessionOutcome,
    SessionRef,
    Source,
    UploadCompleted,
    UploadCounts,
    Uploader,
    UploadSubmitted,
    topic_of,
)
from imgest_contracts.schemas import SCHEMA_DIR, all_schemas, render
from pydantic import ValidationError

SHA = "0" * 64


def test_checked_in_schemas_match_the_models():
    generated = all_schemas()
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(generated), "run `imgest docs` to regenerate contracts/schemas"
    for name, schema in generated.items():
        assert (SCHEMA_DIR / name).read_text() == render(schema), (
            f"{name} drifted from its model; run `imgest docs`")


def test_every_required_event_has_a_schema():
    required = {"object.stored", "file.staged", "file.validated", "file.rejected",
                "session.prearchived", "session.archived", "session.conflicted",
                "pipelines.requested", "upload.submitted", "upload.completed",
                "notification.sent"}
    assert required <= {e.event for e in EVENTS}
    for name in required:
        assert (SCHEMA_DIR / f"{name}.v1.json").exists()


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event)
def test_topic_names_and_keys(event):
    assert re.fullmatch(r"imgest\.[a-z]+\.[a-z]+", topic_of(event))
    assert event.key_field in event.model_fields
    # DESIGN.md §4: upload-scoped events keyed by upload, session events by session.
    expected = {"session.archived": "session_key", "session.prearchived": "session_key",
                "session.conflicted": "session_key", "session.failed": "session_key",
                "pipelines.requested": "session_key",
                "prearchive.requested": "session_key", "prearchive.answered": "session_key",
                "release.requested": "session_key", "session.released": "session_key",
                "notification.sent": "notification_id", "project.updated": "project"}
    assert event.key_field == expected.get(event.event, "upload_id")


def samples():
    now = datetime.now(UTC)
    uploader = Uploader(username="ada", email="ada@example.org")
    source = Source(object_key="staging/u1/a.zip", member="a/1.dcm", files_total=20)
    ref = SessionRef(project="P", subject="S", session="E",
                     uri="/data/archive/projects/P/subjects/S/experiments/E")
    return [
        ObjectStored(upload_id="u1", object_key="staging/u1/a.zip", filename="a.zip", size=10,
                     sha256=SHA),
        UploadSubmitted(upload_id="u1", uploader=uploader.model_copy(update={"projects": ["P"]}),
                        options=ImportOptions(project="P", import_handler="gradual-DICOM"),
                        object_keys=["staging/u1/a.zip"], submitted_at=now),
        FileStaged(upload_id="u1", file_id="f1", object_key="staging/u1/m/f1/1.dcm",
                   path="a.zip/a/1.dcm", size=5, sha256=SHA, source=source),
        SessionArchived(session_key="P/S/E", upload_ids=["u1"], session=ref, scans=1, files=20,
                        modalities=["CT"], archived_at=now,
                        entry_key="prearchive/P/20260101_120000000/E"),
        SessionFailed(session_key="P/S/E", upload_ids=["u1"], session=ref, reason=Reason(
            code="store.object_missing", message="gone")),
        UploadCompleted(upload_id="u1", uploader=uploader, project="P", outcome="succeeded",
                        counts=UploadCounts(files=20, prearchived=20), sessions=[SessionOutcome(
                            uri="/data/prearchive/projects/P/20260101_120000000/E", label="E",
                            state="receiving", file_ids=["f1"])], failures=[],
                        completed_at=now),
    ]


@pytest.mark.parametrize("payload", samples(), ids=lambda p: p.event)
def test_models_validate_against_their_schemas(payload):
    schemas = all_schemas()
    data = json.loads(payload.model_dump_json())
    jsonschema.validate(data, schemas[f"{payload.event}.v1.json"])
    envelope = json.loads(CloudEvent.wrap(payload, source="/imgest/test").model_dump_json())
    jsonschema.validate(envelope, schemas["cloudevent.v1.json"])
    assert envelope["type"] == f"imgest.{payload.event}.v1"
    assert envelope["subject"] == payload.message_key()
    assert type(payload).model_validate(data) == payload  # round trip


def test_schemas_reject_what_models_reject():
    schemas = all_schemas()
    bad = {"upload_id": "u1", "object_key": "k", "filename": "f", "size": -1, "sha256": "xyz"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schemas["object.stored.v1.json"])
    with pytest.raises(ValidationError):
        ObjectStored.model_validate(bad)
    extra = json.loads(samples()[0].model_dump_json()) | {"surprise": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(extra, schemas["object.stored.v1.json"])


def test_envelope_requires_cloudevents_attributes():
    schema = all_schemas()["cloudevent.v1.json"]
    for missing in ("id", "source", "type", "specversion"):
        event = json.loads(CloudEvent.wrap(samples()[0], source="/x").model_dump_json())
        event.pop(missing)
        if missing == "specversion":
            event["specversion"] = "0.3"
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(event, schema)


def test_reason_and_kind_are_closed_vocabularies():
    assert {k.value for k in FileKind} >= {"dicom", "photo", "slide", "csv"}
    with pytest.raises(ValidationError):
        Reason.model_validate({"code": "x"})
