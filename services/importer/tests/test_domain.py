"""imgest_importer.domain: when an upload is complete, and how its files become sessions."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from imgest_contracts import FileKind, ImportOptions, ProjectRules, SessionHints
from imgest_importer.domain import (
    Existing,
    ObjectProgress,
    Part,
    ValidFile,
    dest_entry,
    gradual,
    idle_entries,
    is_complete,
    land,
    overwrite_mode,
    plan,
    prearchive_timestamp,
    session_id,
    to_archive,
    to_prearchive,
    within_budget,
)

NOW = datetime(2024, 1, 2, 3, 4, 5, 678_901)
TS = "20240102_030405678"

# --- is_complete ---------------------------------------------------------------------------------


def test_not_complete_before_submission() -> None:
    progress = {"a": ObjectProgress(files_total=1, rejected=False, terminal=1)}
    assert is_complete(False, ["a"], progress) is False
    assert is_complete(True, ["a"], progress) is True


def test_not_complete_while_an_object_is_unheard_of() -> None:
    progress = {"a": ObjectProgress(1, False, 1)}
    assert is_complete(True, ["a", "b"], progress) is False


def test_not_complete_while_files_total_unknown() -> None:
    progress = {"a": ObjectProgress(None, False, 5)}
    assert is_complete(True, ["a"], progress) is False


def test_not_complete_while_files_outstanding() -> None:
    keys = ["a", "b"]
    assert is_complete(True, keys, {"a": ObjectProgress(3, False, 3),
                                    "b": ObjectProgress(10, False, 9)}) is False
    assert is_complete(True, keys, {"a": ObjectProgress(3, False, 3),
                                    "b": ObjectProgress(10, False, 10)}) is True


def test_rejected_object_counts_as_done() -> None:
    keys = ["zip", "b"]
    progress = {"zip": ObjectProgress(None, True, 0), "b": ObjectProgress(1, False, 1)}
    assert is_complete(True, keys, progress) is True


def test_complete_with_more_terminal_than_total_and_with_empty_archive() -> None:
    # redeliveries may count twice; an empty archive yields nothing and is done at once
    assert is_complete(True, ["a"], {"a": ObjectProgress(2, False, 3)}) is True
    assert is_complete(True, ["a"], {"a": ObjectProgress(0, False, 0)}) is True


def test_submitted_upload_without_objects_is_complete() -> None:
    assert is_complete(True, [], {}) is True


def test_progress_of_objects_not_in_the_upload_is_ignored() -> None:
    progress = {"a": ObjectProgress(1, False, 1), "other": ObjectProgress(5, False, 0)}
    assert is_complete(True, ["a"], progress) is True


# --- plan ----------------------------------------------------------------------------------------


def dcm(path: str, study: str, sop: str, *, series: str = "1.2.3.9", scan: str | None = "1",
        subject: str | None = "S1", session: str | None = "E1", project: str | None = None,
        modality: str | None = "CT", auto_archive: bool | None = None) -> ValidFile:
    return ValidFile(
        file_id=f"{sop.replace('.', '')}{'0' * 32}"[:32], staged_key=f"staging/u/{path}",
        path=path, kind=FileKind.dicom, size=10, sha256="0" * 64,
        hints=SessionHints(project=project, subject=subject, session=session, study_uid=study,
                           series_uid=series, sop_instance_uid=sop, modality=modality, scan=scan,
                           auto_archive=auto_archive))


def photo(path: str, fid: str) -> ValidFile:
    return ValidFile(file_id=fid, staged_key=f"staging/u/{fid}", path=path, kind=FileKind.photo,
                     hints=SessionHints(), size=5, sha256="1" * 64)


ARCHIVE_KEY = re.compile(
    r"^archive/(?P<project>[^/]+)/(?P<subject>[^/]+)/(?P<session>[^/]+)/scans/(?P<scan>[^/]+)"
    r"/resources/DICOM/files/(?P<sop>[^/]+)\.dcm$")


def test_prearchive_timestamp_format() -> None:
    assert prearchive_timestamp(NOW) == TS
    assert prearchive_timestamp(datetime(2030, 12, 31, 23, 59, 59, 999)) == "20301231_235959000"
    assert prearchive_timestamp(datetime(2030, 12, 31, 23, 59, 59, 999_999)) == \
        "20301231_235959999"
    assert re.fullmatch(r"\d{8}_\d{9}", prearchive_timestamp(datetime.now()))


def test_one_study_one_session_with_archive_layout() -> None:
    files = [dcm("b.dcm", "1.2.840.1", "1.2.840.1.2", scan="2", modality="MR"),
             dcm("a.dcm", "1.2.840.1", "1.2.840.1.1", scan="1", modality="CT")]
    [s] = plan("u1", ImportOptions(), files, "DEFAULT", NOW)
    assert (s.project, s.subject, s.label) == ("DEFAULT", "S1", "E1")
    assert s.archived is True and s.study_uid == "1.2.840.1" and s.timestamp == TS
    assert s.prefix == "archive/DEFAULT/S1/E1/"
    assert s.uri == "/data/archive/projects/DEFAULT/subjects/S1/experiments/E1"
    assert s.id == "DEFAULT/S1/E1" == session_id("DEFAULT", "S1", "E1", True, TS)
    assert s.modalities == ["CT", "MR"]
    assert [p.file.path for p in s.placements] == ["a.dcm", "b.dcm"]  # sorted by path
    for p in s.placements:
        m = ARCHIVE_KEY.match(p.key)
        assert m, p.key
        assert m["project"] == "DEFAULT" and m["subject"] == "S1" and m["session"] == "E1"
        assert m["scan"] == p.scan == p.file.hints.scan
        assert m["sop"] == p.file.hints.sop_instance_uid
        assert p.name == f"{p.file.hints.sop_instance_uid}.dcm"
    assert s.placements[0].key == \
        "archive/DEFAULT/S1/E1/scans/1/resources/DICOM/files/1.2.840.1.1.dcm"


def test_two_studies_same_hints_get_distinct_labels() -> None:
    files = [dcm("s1/a.dcm", "1.2.3.100", "1.2.3.100.1"),
             dcm("s1/b.dcm", "1.2.3.100", "1.2.3.100.2"),
             dcm("s2/a.dcm", "1.2.3.200", "1.2.3.200.1")]
    sessions = plan("u1", ImportOptions(), files, "P", NOW)
    assert len(sessions) == 2
    by_study = {s.study_uid: s for s in sessions}
    assert by_study["1.2.3.100"].label == "E1"
    assert by_study["1.2.3.200"].label == "E1_2"
    assert len(by_study["1.2.3.100"].placements) == 2
    assert len(by_study["1.2.3.200"].placements) == 1
    assert len({s.id for s in sessions}) == 2
    assert len({s.prefix for s in sessions}) == 2
    keys = [p.key for s in sessions for p in s.placements]
    assert len(set(keys)) == 3


def test_three_studies_same_label_are_numbered() -> None:
    files = [dcm(f"{i}.dcm", f"1.9.{i}", f"1.9.{i}.1") for i in range(3)]
    labels = sorted(s.label for s in plan("u", ImportOptions(), files, "P", NOW))
    assert labels == ["E1", "E1_2", "E1_3"]


def test_composed_labels_fit_the_catalogue() -> None:
    # A header's or the upload's label may be 64 characters already: what is added to it must
    # not make it longer than the catalogue holds (the upload could never be finished).
    long = "L" * 64
    files = [dcm(f"{i}.dcm", f"1.9.{i}", f"1.9.{i}.1", session=long, scan=long,
                 series=f"1.2.3.{i % 2}") for i in range(3)]
    files += [dcm("x.dcm", "1.9.0", "1.9.0.2", session=long, scan=long, series="1.2.3.7")]
    files += [photo("p.jpg", "p" * 32)]
    sessions = plan("u1234567890", ImportOptions(subject=long), files, "P", NOW)
    labels = [s.label for s in sessions]
    scans = [p.scan for s in sessions for p in s.placements]
    assert len(set(labels)) == len(labels) == 4 and len(set(scans)) >= 3
    assert all(len(label) <= 64 for label in labels + scans), labels + scans


def test_two_studies_explicit_session_still_distinct() -> None:
    files = [dcm("a.dcm", "1.1", "1.1.1"), dcm("b.dcm", "2.2", "2.2.1")]
    opts = ImportOptions(project="PX", subject="SX", session="EX")
    sessions = plan("u", opts, files, "P", NOW)
    assert sorted(s.label for s in sessions) == ["EX", "EX_2"]
    assert {(s.project, s.subject) for s in sessions} == {("PX", "SX")}


def test_explicit_options_win_over_hints() -> None:
    files = [dcm("a.dcm", "1.5", "1.5.1", project="HP", subject="HS", session="HE")]
    [s] = plan("u", ImportOptions(project="OP", subject="OS", session="OE"), files, "DEF", NOW)
    assert (s.project, s.subject, s.label) == ("OP", "OS", "OE")
    assert s.placements[0].key.startswith("archive/OP/OS/OE/scans/")
    # partially explicit: the rest still comes from the hints (a project that exists)
    [s] = plan("u", ImportOptions(subject="OS"), files, "DEF", NOW, projects={"HP": rules()})
    assert (s.project, s.subject, s.label) == ("HP", "OS", "HE")


def test_a_project_no_one_created_sends_the_session_to_unassigned_prearchive() -> None:
    files = [dcm("a.dcm", "1.5", "1.5.1", project="NOPE", auto_archive=True)]
    [s] = plan("u", ImportOptions(), files, "Unassigned", NOW, projects={"HP": rules()})
    assert (s.project, s.archived) == ("Unassigned", False)
    assert s.uri.startswith("/data/prearchive/projects/Unassigned/")
    # a hinted project's own setting routes its sessions
    files = [dcm("a.dcm", "1.5", "1.5.1", project="HP")]
    [s] = plan("u", ImportOptions(), files, "Unassigned", NOW,
               projects={"HP": rules("manual", quarantine=True)})
    assert (s.project, s.archived, s.quarantined) == ("HP", False, True)


def test_a_project_the_uploader_may_not_send_into_is_unassigned() -> None:
    files = [dcm("a.dcm", "1.5", "1.5.1", project="HP")]
    [s] = plan("u", ImportOptions(), files, "Unassigned", NOW, projects={"HP": rules()},
               allowed=["OTHER"])
    assert (s.project, s.archived) == ("Unassigned", False)
    [s] = plan("u", ImportOptions(), files, "Unassigned", NOW, projects={"HP": rules()},
               allowed=["HP"])
    assert (s.project, s.archived) == ("HP", True)
    [s] = plan("u", ImportOptions(), files, "Unassigned", NOW, projects={"HP": rules()},
               allowed=None)  # an administrator
    assert s.project == "HP"


def test_gradual_sends_wait_receiving_and_are_built_once_idle_for_their_project() -> None:
    assert gradual(ImportOptions(import_handler="gradual-DICOM"))
    assert not gradual(ImportOptions(import_handler="DICOM-zip")) and not gradual(ImportOptions())
    [s] = plan("u", ImportOptions(project="P"), [dcm("a.dcm", "1.5", "1.5.1")], "U", NOW)
    assert s.archived
    to_prearchive(s, "RECEIVING", "20240101_000000000")
    assert (s.archived, s.state) == (False, "RECEIVING")
    assert s.placements[0].key == (
        "prearchive/P/20240101_000000000/E1/scans/1/resources/DICOM/files/1.5.1.dcm")
    last = datetime(2024, 1, 2, 3, 0, 0)
    receiving = [("a", "FAST", last), ("b", "SLOW", last), ("c", "OTHER", last)]
    at = datetime(2024, 1, 2, 3, 0, 10)
    assert idle_entries(receiving, {"FAST": 5.0, "SLOW": 300.0}, 60.0, at) == ["a"]
    assert idle_entries(receiving, {"FAST": 5.0, "SLOW": 300.0}, 10.0, at) == ["a", "c"]


def test_a_dest_naming_an_entry_merges_into_it() -> None:
    assert dest_entry(ImportOptions(dest="/prearchive/projects/P/20240101_000000000/E1")) == (
        "P", "20240101_000000000", "E1")
    assert dest_entry(ImportOptions(dest="/prearchive/projects/P")) is None
    assert dest_entry(ImportOptions(dest="/archive/projects/P/subjects/S")) is None
    assert dest_entry(ImportOptions()) is None


def test_defaults_without_hints() -> None:
    f = dcm("a.dcm", "1.2.840.113619.2.55.3.604688119", "9.9", subject=None, session=None,
            scan=None)
    [s] = plan("upload-1234", ImportOptions(), [f], "DEF", NOW)
    assert (s.project, s.subject) == ("DEF", "unassigned")
    assert s.label == "study_" + "1.2.840.113619.2.55.3.604688119"[-12:].replace(".", "_")
    assert s.placements[0].scan == "1"  # no scan label: scan 1
    assert s.placements[0].key == "archive/DEF/unassigned/" + s.label + \
        "/scans/1/resources/DICOM/files/9.9.dcm"


def test_dicom_without_sop_uses_file_id() -> None:
    f = ValidFile(file_id="abcdef0123456789abcdef0123456789", staged_key="k", path="x.dcm",
                  kind=FileKind.dicom, hints=SessionHints(study_uid="1.2", session="E"),
                  size=1, sha256="0" * 64)
    [s] = plan("u", ImportOptions(), [f], "P", NOW)
    assert s.placements[0].name == "abcdef0123456789abcdef0123456789.dcm"


@pytest.mark.parametrize("opts", [ImportOptions(auto_archive=False),
                                  ImportOptions(dest="/prearchive"),
                                  ImportOptions(dest="/prearchive/projects/P")])
def test_prearchive_layout(opts: ImportOptions) -> None:
    files = [dcm("a.dcm", "1.7", "1.7.1", scan="3")]
    [s] = plan("u", opts, files, "P", NOW)
    assert s.archived is False
    assert s.timestamp == TS
    assert s.prefix == f"prearchive/P/{TS}/E1/"
    assert s.uri == f"/data/prearchive/projects/P/{TS}/E1"
    assert s.id == f"prearchive/P/{TS}/E1"
    assert s.placements[0].key == f"prearchive/P/{TS}/E1/scans/3/resources/DICOM/files/1.7.1.dcm"
    assert re.fullmatch(r"\d{8}_\d{9}", s.timestamp)


def test_auto_archive_hint_false_sends_only_that_session_to_prearchive() -> None:
    files = [dcm("a.dcm", "1.1", "1.1.1", session="A", auto_archive=False),
             dcm("b.dcm", "2.2", "2.2.1", session="B")]
    sessions = {s.label: s for s in plan("u", ImportOptions(), files, "P", NOW)}
    assert sessions["A"].archived is False
    assert sessions["A"].prefix.startswith("prearchive/")
    assert sessions["B"].archived is True
    assert sessions["B"].prefix == "archive/P/S1/B/"


def test_archive_dest_and_true_auto_archive_archive() -> None:
    files = [dcm("a.dcm", "1.1", "1.1.1")]
    for opts in (ImportOptions(auto_archive=True), ImportOptions(dest="/archive/projects/P")):
        [s] = plan("u", opts, files, "P", NOW)
        assert s.archived is True


def test_photos_go_into_one_session_one_scan_per_image() -> None:
    files = [photo("trip/b.jpg", "bbbbbbbb" + "1" * 24),
             photo("a.jpg", "aaaaaaaa" + "2" * 24),
             photo("other/a.jpg", "cccccccc" + "3" * 24)]
    [s] = plan("u", ImportOptions(), files, "P", NOW)
    assert (s.project, s.subject, s.label) == ("P", "unassigned", "unassigned_images_u")
    assert s.study_uid is None and s.modalities == []
    at = "archive/P/unassigned/unassigned_images_u/scans/"
    assert [p.key for p in s.placements] == [
        at + "a/resources/PHOTO/files/a.jpg",
        at + "a_2/resources/PHOTO/files/a.jpg",  # two images of one name: two scans
        at + "b/resources/PHOTO/files/b.jpg",
    ]


def test_two_series_of_one_number_are_two_scans() -> None:
    files = [dcm("a.dcm", "1.1", "1.1.1", series="1.2.9"), dcm("b.dcm", "1.1", "1.1.2",
                                                                series="1.2.8"),
             dcm("c.dcm", "1.1", "1.1.3", series="1.2.9"), dcm("d.dcm", "1.1", "1.1.4",
                                                                scan="2", series="1.2.7")]
    [s] = plan("u", ImportOptions(), files, "P", NOW)
    scans = {p.file.hints.sop_instance_uid: p.scan for p in s.placements}
    assert scans == {"1.1.1": "1_2", "1.1.2": "1", "1.1.3": "1_2", "1.1.4": "2"}


def test_the_images_of_two_uploads_are_two_sessions() -> None:
    """Unnamed, each upload's photos make a session of their own: the second upload's are
    not a CONFLICT with the first's, archived before."""
    [first] = plan("0123456789abcdef", ImportOptions(), [photo("a.jpg", "a" * 32)], "P", NOW)
    [second] = plan("fedcba9876543210", ImportOptions(), [photo("a.jpg", "b" * 32)], "P", NOW)
    assert (first.label, second.label) == ("unassigned_images_01234567",
                                           "unassigned_images_fedcba98")


def test_photos_and_slides_of_an_upload_share_its_session() -> None:
    slide = ValidFile("s" * 32, "staging/u/s/x.svs", "x.svs", FileKind.slide, SessionHints(),
                      10, "0" * 64)
    [s] = plan("u", ImportOptions(subject="SUBJ", session="V1"),
               [photo("p.jpg", "f" * 32), slide], "P", NOW)
    assert s.label == "V1" and {p.scan for p in s.placements} == {"p", "x"}
    assert {p.key.split("/resources/")[1] for p in s.placements} == {
        "PHOTO/files/p.jpg", "SLIDE/files/x.svs"}


def test_photos_and_dicom_in_separate_sessions() -> None:
    files = [dcm("x.dcm", "1.1", "1.1.1"), photo("p.jpg", "f" * 32)]
    sessions = plan("u", ImportOptions(subject="SUBJ"), files, "P", NOW)
    assert len(sessions) == 2
    labels = {s.study_uid: s.label for s in sessions}
    assert labels == {"1.1": "E1", None: "SUBJ_images_u"}


# --- routing, quarantine and overwrite -------------------------------------------------------


def rules(auto_archive: str = "auto", quarantine: bool = False) -> ProjectRules:
    return ProjectRules(project="P", accepted_kinds=list(FileKind), auto_archive=auto_archive,
                        quarantine=quarantine, updated_at=NOW)


@pytest.mark.parametrize(("options", "hint", "project", "archived"), [
    ({}, None, None, True),
    ({}, None, "manual", False),
    ({}, None, "auto-overwrite", True),
    ({}, True, "manual", True),  # the DICOM's AA hint beats the project
    ({"auto_archive": False}, True, "auto", False),  # the upload's AA beats the hint
    ({"dest": "/prearchive/projects/P", "auto_archive": True}, True, "auto", False),
    ({"dest": "/archive/projects/P", "auto_archive": False}, False, "manual", True),
])
def test_routing_order(options: dict, hint: bool | None, project: str | None,
                       archived: bool) -> None:
    assert to_archive(ImportOptions(**options), hint,
                      rules(project) if project else None) is archived


def test_overwrite_mode_and_quarantine_from_the_project() -> None:
    assert overwrite_mode(ImportOptions(), rules("auto-overwrite")) == "delete"
    assert overwrite_mode(ImportOptions(overwrite="append"), rules("auto-overwrite")) == "append"
    assert overwrite_mode(ImportOptions(), rules()) == "none"
    [s] = plan("u", ImportOptions(), [dcm("x.dcm", "1.1", "1.1.1")], "P", NOW,
               rules(quarantine=True))
    assert s.quarantined
    [s] = plan("u", ImportOptions(quarantine=False), [dcm("x.dcm", "1.1", "1.1.1")], "P", NOW,
               rules(quarantine=True))
    assert not s.quarantined


def existing_of(s, files: dict[str, str] | None = None, **kw) -> Existing:
    return Existing(id=s.id, uri=s.uri, subject=kw.get("subject", s.subject),
                    study_uid=kw.get("study_uid", s.study_uid),
                    modalities=kw.get("modalities", s.modalities), files=files or {})


def two_instances():
    [s] = plan("u", ImportOptions(), [dcm("a.dcm", "1.1", "1.1.1"),
                                      dcm("b.dcm", "1.1", "1.1.2")], "P", NOW)
    return s


def test_nothing_archived_yet_adds_everything() -> None:
    s = two_instances()
    land(s, None, "none")
    assert s.archived and [p.action for p in s.placements] == ["add", "add"]


@pytest.mark.parametrize("mode", ["none", "append", "delete"])
def test_identical_resend_changes_nothing_in_any_mode(mode: str) -> None:
    s = two_instances()
    land(s, existing_of(s, {p.key: p.digest for p in s.placements}), mode)
    assert s.archived and s.state == "READY"
    assert [p.action for p in s.placements] == ["keep", "keep"]


def test_overwrite_none_with_new_content_is_a_conflict_in_the_prearchive() -> None:
    s = two_instances()
    first = s.placements[0]
    uri = s.uri
    land(s, existing_of(s, {first.key: first.digest}), "none")
    assert not s.archived and s.state == "CONFLICT" and s.existing_uri == uri
    assert s.reason is not None and s.reason.code == "session.exists"
    assert "overwrite=append" in s.reason.message
    assert all(p.key.startswith(f"prearchive/P/{s.timestamp}/{s.label}/scans/")
               for p in s.placements)


def test_append_adds_new_files_and_keeps_what_is_there() -> None:
    s = two_instances()
    a, _b = s.placements
    land(s, existing_of(s, {a.key: "9" * 64}), "append")
    assert s.archived and [p.action for p in s.placements] == ["keep", "add"]


def test_delete_replaces_what_differs() -> None:
    s = two_instances()
    a, b = s.placements
    land(s, existing_of(s, {a.key: "9" * 64, b.key: b.digest}), "delete")
    assert s.archived and [p.action for p in s.placements] == ["replace", "keep"]


@pytest.mark.parametrize(("other", "code"), [
    ({"subject": "someone_else"}, "session.subject_mismatch"),
    ({"study_uid": "9.9"}, "session.study_mismatch"),
    ({"modalities": ["MR"]}, "session.modality_mismatch"),
])
@pytest.mark.parametrize("mode", ["none", "append", "delete"])
def test_mismatches_conflict_whatever_the_mode(other: dict, code: str, mode: str) -> None:
    s = two_instances()
    land(s, existing_of(s, **other), mode)
    assert s.state == "CONFLICT" and s.reason is not None and s.reason.code == code


def test_plan_is_deterministic_regardless_of_input_order() -> None:
    files = [dcm(f"{i}.dcm", f"1.{i % 2}", f"1.{i % 2}.{i}") for i in range(6)]
    a = plan("u", ImportOptions(), files, "P", NOW)
    b = plan("u", ImportOptions(), list(reversed(files)), "P", NOW)
    assert [(s.label, [p.key for p in s.placements]) for s in a] == \
        [(s.label, [p.key for p in s.placements]) for s in b]


def test_plan_of_nothing_is_empty() -> None:
    assert plan("u", ImportOptions(), [], "P", NOW) == []


def test_prearchive_sessions_of_different_subjects_do_not_collide() -> None:
    files = [dcm("a.dcm", "1.1", "1.1.1", subject="S1", session="E1"),
             dcm("b.dcm", "2.2", "2.2.1", subject="S2", session="E1")]
    sessions = plan("u", ImportOptions(auto_archive=False), files, "P", NOW)
    assert len(sessions) == 2
    assert len({s.id for s in sessions}) == 2
    assert len({s.prefix for s in sessions}) == 2


# --- multi-file slides ----------------------------------------------------------------------------


def slide(path: str, fid: str, parts: tuple[str, ...], upload: str = "u1") -> ValidFile:
    return ValidFile(file_id=fid, staged_key=f"staging/{upload}/members/{fid}/x", path=path,
                     kind=FileKind.slide, hints=SessionHints(subject="S1", session="E1"),
                     size=5, sha256="2" * 64, fileset_format="mrxs", parts=tuple(
                         Part(p, f"staging/{upload}/members/{fid}{i}/y", i + 1, f"{i}" * 64)
                         for i, p in enumerate(parts)))


def test_a_fileset_is_one_scan_in_the_vendors_layout() -> None:
    [s] = plan("u1", ImportOptions(), [slide("a.zip/CMU 1.mrxs", "f1", (
        "CMU 1/Slidedat.ini", "CMU 1/Data0000.dat"))], "P", NOW)
    files = "archive/P/S1/E1/scans/CMU_1/resources/MRXS/files/"
    assert [(p.key, p.source_key, p.size) for p in s.placements] == [
        (files + "CMU 1.mrxs", "staging/u1/members/f1/x", None),
        (files + "CMU 1/Slidedat.ini", "staging/u1/members/f10/y", 1),
        (files + "CMU 1/Data0000.dat", "staging/u1/members/f11/y", 2)]
    assert s.file_ids == ["f1"]  # one image


def test_two_slides_of_one_name_get_two_scans() -> None:
    [s] = plan("u1", ImportOptions(), [slide("a.zip/slide.mrxs", "f1", ("slide/Data.dat",)),
                                       slide("b.zip/slide.mrxs", "f2", ("slide/Data.dat",))],
               "P", NOW)
    assert sorted({p.scan for p in s.placements}) == ["slide", "slide_2"]
    assert len({p.key for p in s.placements}) == 4  # nothing placed over anything


def test_a_part_staged_elsewhere_is_never_placed() -> None:
    odd = slide("a.zip/s.mrxs", "f1", ("s/Data.dat",), upload="someone-else")
    odd = ValidFile(**{**odd.__dict__, "staged_key": "staging/u1/members/f1/x"})
    [s] = plan("u1", ImportOptions(), [odd], "P", NOW)
    assert [p.name for p in s.placements] == ["s.mrxs"]


def test_a_session_made_after_the_upload_was_sent_is_its_twin_and_merges() -> None:
    s = two_instances()
    a, _b = s.placements
    made = Existing(id=s.id, uri=s.uri, subject=s.subject, study_uid=s.study_uid,
                    modalities=s.modalities, files={a.key: a.digest}, created_at=NOW)
    land(s, made, "none", submitted_at=NOW.replace(second=4))  # sent before it was made
    assert s.archived and [p.action for p in s.placements] == ["keep", "add"]
    s = two_instances()
    land(s, made, "none", submitted_at=NOW.replace(second=6))  # sent after: an existing one
    assert s.state == "CONFLICT"


def test_an_upload_too_large_to_list_its_files_still_completes_counting_them() -> None:
    from imgest_contracts import SessionOutcome, UploadCompleted, UploadCounts, Uploader

    ids = [f"{n:032x}" for n in range(3000)]
    done = UploadCompleted(
        upload_id="u", uploader=Uploader(username="a"), outcome="succeeded",
        counts=UploadCounts(files=3000, archived=3000), failures=[], completed_at=NOW,
        sessions=[SessionOutcome(uri="/data/archive/projects/P/subjects/S/experiments/E",
                                 label="E", state="archived", file_ids=ids, files=3000)])
    assert within_budget(done, budget=7 * 1024 * 1024) is done  # (~105 KB: listed whole)
    cut = within_budget(done, budget=100_000)
    assert cut.sessions[0].file_ids == [] and cut.sessions[0].file_count == 3000
    assert len(cut.model_dump_json()) < 1000 and cut.counts == done.counts
