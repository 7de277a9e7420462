"""The checked-in AsyncAPI document is what the services declare (regenerate: `imgest docs`)."""

import json

from imgest_contracts import TOPICS

from imgest.cli import ASYNCAPI_PATH, asyncapi_document


def test_asyncapi_document_has_not_drifted():
    generated = json.loads(json.dumps(asyncapi_document(), sort_keys=True))
    on_disk = json.loads(ASYNCAPI_PATH.read_text())
    assert generated == on_disk, "contracts/asyncapi.json drifted: run `imgest docs`"


def test_every_published_topic_is_documented_with_its_schema():
    doc = json.loads(ASYNCAPI_PATH.read_text())
    addresses = {ch.get("address") for ch in doc["channels"].values()}
    for topic in TOPICS:
        assert topic in addresses, topic
    text = json.dumps(doc)
    assert "specversion" in text and "upload_id" in text


def test_readme_configuration_table_is_current():
    from imgest.cli import README_PATH, readme_with_config

    text = README_PATH.read_text()
    assert readme_with_config(text) == text, "README's configuration table drifted: `imgest docs`"
