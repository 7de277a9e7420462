"""imgest_gateway.domain: file names from clients, upload status words (forward-only file states:
tests/test_gateway_api.py, against PostgreSQL)."""

from __future__ import annotations

import pytest
from imgest_contracts import UploadCounts
from imgest_gateway.domain import (
    MAX_FILENAME,
    Arrival,
    BadFilename,
    safe_filename,
    sort_arrivals,
    upload_state,
)

# --- safe_filename -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("scan.dcm", "scan.dcm"),
        ("../../etc/passwd", "passwd"),
        ("/etc/passwd", "passwd"),
        ("a/b/c/image.jpg", "image.jpg"),
        ("..\\..\\Windows\\system.ini", "system.ini"),
        ("C:\\Users\\me\\Desktop\\study.zip", "study.zip"),
        ("dir\\sub/mixed\\file.txt", "file.txt"),
        ("  padded name.dcm  ", "padded name.dcm"),
        ("folder/", "folder"),  # PurePosixPath drops the trailing slash
        ("ünïcödé – файл.dcm", "ünïcödé – файл.dcm"),
        (".hidden", ".hidden"),
        ("...", "..."),
    ],
)
def test_safe_filename_keeps_only_last_component(raw: str, expected: str) -> None:
    assert safe_filename(raw) == expected


@pytest.mark.parametrize("raw", [None, ""])
def test_safe_filename_requires_a_name(raw: str | None) -> None:
    with pytest.raises(BadFilename, match="required"):
        safe_filename(raw)


@pytest.mark.parametrize("raw", [".", "..", "/", "a/..", "../", "..\\", "   ", "dir/  ", "\\"])
def test_a_name_that_is_no_name_becomes_file(raw: str) -> None:
    assert safe_filename(raw) == "file"


@pytest.mark.parametrize(("raw", "expected"), [
    ("a\x00b.dcm", "a_b.dcm"), ("evil\n.dcm", "evil_.dcm"), ("tab\there", "tab_here"),
    ("bell\x07", "bell_"), ("del\x7f", "del_"), ("x\r\nSet-Cookie: y", "x__Set-Cookie: y"),
    ("\x1f", "_")])
def test_control_characters_become_underscores(raw: str, expected: str) -> None:
    assert safe_filename(raw) == expected


def test_a_long_name_is_shortened_to_255_bytes_keeping_its_extension() -> None:
    assert safe_filename("a" * MAX_FILENAME) == "a" * MAX_FILENAME
    assert safe_filename("a" * 300 + ".dcm") == "a" * (MAX_FILENAME - 4) + ".dcm"
    # 128 two-byte characters = 256 bytes although only 128 characters; never half a character
    assert safe_filename("é" * 128) == "é" * 127
    assert safe_filename("é" * 200 + ".zip") == "é" * 125 + ".zip"
    assert len(safe_filename("x" * 10 + "." + "y" * 400).encode()) == MAX_FILENAME


def test_safe_filename_length_counts_only_the_last_component() -> None:
    long_dir = "d" * 1000
    assert safe_filename(f"{long_dir}/short.dcm") == "short.dcm"


def test_bad_filename_is_a_value_error() -> None:
    assert issubclass(BadFilename, ValueError)


# --- upload_state --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (UploadCounts(files=3, archived=3), "archived"),
        (UploadCounts(files=3, prearchived=3), "prearchived"),
        (UploadCounts(files=3, archived=1, prearchived=2), "prearchived"),
        (UploadCounts(files=3, archived=2, rejected=1), "partial"),
        (UploadCounts(files=3, prearchived=1, failed=2), "partial"),
        (UploadCounts(files=2, conflicted=2), "prearchived"),
        (UploadCounts(files=2, archived=1, conflicted=1), "prearchived"),
        (UploadCounts(files=3, rejected=3), "failed"),
        (UploadCounts(files=2, rejected=1, failed=1), "failed"),
        (UploadCounts(files=0), "failed"),
    ],
)
def test_upload_state(counts: UploadCounts, expected: str) -> None:
    assert upload_state(counts) == expected


# --- sort_arrivals -------------------------------------------------------------------------------


def _arrival(name: str, sha: str) -> Arrival:
    return Arrival(f"staging/u/{name}", name, 10, sha)


def test_arrivals_are_added_until_the_cap_then_refused():
    arrivals = [_arrival(f"{i}.dcm", f"sha{i}") for i in range(4)]
    verdicts = sort_arrivals(arrivals, upload_id="u", project="P", in_upload={}, archived={},
                             room=2, cap=3)
    assert [v.state for v in verdicts] == ["added", "added", "refused", "refused"]
    assert verdicts[2].status == 409 and verdicts[2].reason["code"] == "upload.too_many_files"
    assert "max_files_per_upload" in verdicts[2].reason["message"]


def test_duplicates_in_the_upload_in_the_batch_and_in_the_archive_are_skipped_and_named():
    arrivals = [_arrival("a.dcm", "A"), _arrival("b.dcm", "B"), _arrival("b2.dcm", "B"),
                _arrival("c.dcm", "C")]
    verdicts = sort_arrivals(arrivals, upload_id="u", project="P",
                             in_upload={"A": "first.dcm"}, archived={"C": ("x/c.dcm", "u0")},
                             room=10, cap=10)
    assert [v.state for v in verdicts] == ["duplicate", "added", "duplicate", "duplicate"]
    assert verdicts[0].reason["code"] == "upload.duplicate"
    assert "'first.dcm'" in verdicts[0].reason["message"]
    assert "'b.dcm'" in verdicts[2].reason["message"]
    assert verdicts[3].reason["code"] == "upload.already_archived"
    assert "u0" in verdicts[3].reason["message"] and "P" in verdicts[3].reason["message"]


def test_a_duplicate_takes_no_room_under_the_cap():
    arrivals = [_arrival("a.dcm", "A"), _arrival("a2.dcm", "A"), _arrival("b.dcm", "B")]
    verdicts = sort_arrivals(arrivals, upload_id="u", project="P", in_upload={}, archived={},
                             room=2, cap=2)
    assert [v.state for v in verdicts] == ["added", "duplicate", "added"]
