"""imgest's XNAT schema, read by XNAT's own Python client's parser (no server needed)."""

import io
import logging

import pytest
from imgest_gateway.xnat_model import SCHEMAS, SESSION_TYPES, session_items, xsi_type


class _Log(logging.LoggerAdapter):
    def verbose(self, message, *args, **kwargs):  # xnatpy's own level (it adds it on connect)
        self.debug(message, *args, **kwargs)


def test_xnats_client_builds_its_model_from_the_schema():
    from xnat.convert_xsd import SchemaParser

    parser = SchemaParser(logger=_Log(logging.getLogger("xnat-test"), {}))
    assert parser.parse_schema_xmlstring(SCHEMAS["xnat"], schema_uri="/xapi/schemas/xnat")
    parser.write(code_file=io.StringIO())  # the client's code generation runs
    names = set(parser.class_list)
    # The types its mixins and listings key on, and one session and scan type per modality.
    assert {"xnat:projectData", "xnat:subjectData", "xnat:experimentData",
            "xnat:subjectAssessorData", "xnat:imageSessionData", "xnat:imageScanData",
            "xnat:abstractResource", "xnat:resourceCatalog"} <= names
    for name in [*SESSION_TYPES.values(), "otherDicom"]:
        assert {f"xnat:{name}SessionData", f"xnat:{name}ScanData"} <= names
    session = parser.class_list["xnat:imageSessionData"]
    assert session.attributes["scans"].field_name == "scans/scan"  # its scans listing


@pytest.mark.parametrize(("modality", "expected"), [
    ("CT", "xnat:ctSessionData"), ("PT", "xnat:petSessionData"), ("SM", "xnat:smSessionData"),
    ("OT", "xnat:otherDicomSessionData"), (None, "xnat:imageSessionData")])
def test_each_modality_has_xnats_type(modality, expected):
    assert xsi_type(modality, "Session") == expected


def test_a_session_is_xnats_items_with_its_scans_as_children_and_no_empty_fields():
    [s] = session_items({
        "project": "P", "label": "E1", "subject": "S1", "modalities": ["MR"], "study_uid": "1.2",
        "created_at": "2026-01-01T00:00:00+00:00",
        "scans": [{"label": "3", "description": None, "modality": "MR", "series_uid": "1.2.3"}],
    })["items"]
    assert s["meta"] == {"xsi:type": "xnat:mrSessionData", "isHistory": False,
                         "start_date": "2026-01-01T00:00:00+00:00"}
    # IDs unique across the site (the project's, a dot, the label), as xnatpy keeps them.
    assert s["data_fields"] == {"ID": "P.E1", "label": "E1", "project": "P",
                                "subject_ID": "P.S1", "modality": "MR", "UID": "1.2"}
    [scans] = s["children"]
    [scan] = scans["items"]
    assert scans["field"] == "scans/scan" and scan["meta"]["xsi:type"] == "xnat:mrScanData"
    assert "type" not in scan["data_fields"]  # an empty description is left out


def test_paths_with_ids_are_read_as_paths_with_labels():
    from imgest_gateway.xnat_api import labelled_path

    assert labelled_path("/data/archive/projects/PA/subjects/PA.S1/experiments/PA.E1/scans/1/"
                         "resources/9/files/PA.x") == (
        "/data/archive/projects/PA/subjects/S1/experiments/E1/scans/1/resources/9/files/PA.x")
    assert labelled_path("/data/subjects/PA.S1") == "/data/projects/PA/subjects/S1"
    # Another project's ID is no label of this one; the prearchive has no IDs.
    for path in ["/data/projects/PA/subjects/PB.S1", "/data/prearchive/projects/PA/1_2/PA.E"]:
        assert labelled_path(path) == path
