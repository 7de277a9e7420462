"""imgest_notifier: the upload-completed email, and the .eml mailer."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from imgest_contracts import (
    Contact,
    FileFailure,
    ProjectSettings,
    ProjectUpdated,
    Reason,
    SessionOutcome,
    SessionRef,
    UploadCompleted,
    UploadCounts,
    Uploader,
)
from imgest_notifier.domain import Contacts, Post
from imgest_notifier.mailer import EmlMailer

UPLOAD_ID = "0123456789abcdef0123456789abcdef"


POST = Post("imgest@example.org", "https://imgest.example.org/")


def completed(*, email_addr: str | None = "alice@example.org", outcome: str = "partial",
              failures: list[FileFailure] | None = None, success_emails: bool = True
              ) -> UploadCompleted:
    return UploadCompleted(
        upload_id=UPLOAD_ID,
        uploader=Uploader(username="alice", email=email_addr, success_emails=success_emails),
        project="P1",
        outcome=outcome,  # type: ignore[arg-type]
        counts=UploadCounts(files=5, archived=2, prearchived=1, rejected=2),
        sessions=[SessionOutcome(uri="/data/archive/projects/P1/subjects/S1/experiments/E1",
                                 label="E1", state="archived", file_ids=["a", "b"]),
                  SessionOutcome(uri="/data/prearchive/projects/P1/20240102_030405678/E2",
                                 label="E2", state="prearchived", file_ids=["c"])],
        failures=failures if failures is not None else [
            FileFailure(file_id="d", path="study.zip/notes.txt",
                        reason=Reason(code="file.unsupported_type", message="Not a file imgest "
                                      "imports.")),
            FileFailure(file_id="e", path="<script>alert(1)</script>.dcm",
                        reason=Reason(code="dicom.malformed", message="Header <b>broken</b> & bad")),
        ],
        completed_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def make(done: UploadCompleted) -> EmailMessage:
    [letter] = POST.upload_completed(done, None)
    return letter.msg


def _parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def test_headers() -> None:
    msg = make(completed())
    assert msg["Subject"] == "[imgest] Upload 01234567 partly imported: 3 of 5 files imported"
    assert msg["To"] == "alice@example.org"
    assert msg["From"] == "imgest@example.org"
    assert re.fullmatch(r"<[0-9a-f-]{36}@imgest>", msg["Message-ID"])
    assert msg["X-Imgest-Upload"] == UPLOAD_ID
    assert msg["X-Imgest-Kind"] == "upload.partial"
    sent = email.utils.parsedate_to_datetime(msg["Date"]).replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 60


@pytest.mark.parametrize(("outcome", "word"), [("succeeded", "archived"),
                                                ("partial", "partly imported"),
                                                ("failed", "failed")])
def test_subject_headline_per_outcome(outcome: str, word: str) -> None:
    msg = make(completed(outcome=outcome))
    assert msg["Subject"].startswith(f"[imgest] Upload 01234567 {word}: ")


def test_message_id_is_deterministic() -> None:
    a, b = make(completed()), make(completed())
    assert a["Message-ID"] == b["Message-ID"]
    again = completed().model_copy(update={"generation": 1})  # completed again after a replay
    assert make(again)["Message-ID"] != a["Message-ID"]
    text_a, html_a = _parts(a)
    assert (text_a, html_a) == _parts(b)


def test_multipart_alternative_with_text_and_html() -> None:
    msg = make(completed())
    assert msg.get_content_type() == "multipart/alternative"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "text/html"]


def test_text_part_lists_sessions_and_failures() -> None:
    text, _ = _parts(make(completed()))
    assert "Hello alice," in text
    assert f"your upload {UPLOAD_ID} partly imported." in text
    assert "5 in all, 2 archived, 1 in the prearchive, 2 rejected" in text
    assert ("  - E1 (archived, 2 files): https://imgest.example.org/data/archive/projects/P1/"
            "subjects/S1/experiments/E1") in text
    assert "  - E2 (prearchived, 1 files)" in text
    assert ("  - study.zip/notes.txt: Not a file imgest imports. [file.unsupported_type]"
            in text)
    # plain text is not HTML-escaped
    assert "<script>alert(1)</script>.dcm: Header <b>broken</b> & bad [dicom.malformed]" in text
    assert f"Details: https://imgest.example.org/api/v1/uploads/{UPLOAD_ID}" in text


def test_html_part_lists_sessions_and_failures() -> None:
    _, html = _parts(make(completed()))
    assert html.startswith("<!doctype html>")
    assert "<p>Hello alice,</p>" in html
    assert "<strong>partly imported</strong>" in html
    assert ('<td><a href="https://imgest.example.org/data/archive/projects/P1/subjects/S1/'
            'experiments/E1">E1</a></td><td>archived</td><td align="right">2</td>') in html
    assert "E2</a></td><td>prearchived</td><td align=\"right\">1</td>" in html
    assert "<li><code>study.zip/notes.txt</code>: Not a file imgest imports. " \
        "<small>[file.unsupported_type]</small></li>" in html
    assert "<small>[dicom.malformed]</small>" in html
    assert f'href="https://imgest.example.org/api/v1/uploads/{UPLOAD_ID}"' in html


def test_failures_not_listed_in_the_event_are_counted_in_both_parts() -> None:
    done = completed().model_copy(update={"failures_omitted": 24000, "skipped_omitted": 7})
    text, html = _parts(make(done))
    assert "  - and 24000 more: see the details below" in text
    assert "<li>and 24000 more: see the details below</li>" in html
    assert "and 7 more" not in text  # (no duplicates listed: no such section)


def test_a_session_whose_files_are_not_listed_counts_them() -> None:
    done = completed()
    done.sessions[0] = done.sessions[0].model_copy(update={"file_ids": [], "files": 200000})
    text, html = _parts(make(done))
    assert "  - E1 (archived, 200000 files)" in text
    assert '<td>archived</td><td align="right">200000</td>' in html


def test_html_part_escapes_user_supplied_text() -> None:
    _, html = _parts(make(completed()))
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.dcm" in html
    assert "Header &lt;b&gt;broken&lt;/b&gt; &amp; bad" in html


def test_no_failures_section_when_all_went_well() -> None:
    done = completed(outcome="succeeded", failures=[])
    text, html = _parts(make(done))
    assert "Files not imported" not in text and "Files not imported" not in html
    assert "Sessions:" in text


def test_no_email_address_no_message() -> None:
    for addr in (None, ""):
        assert POST.upload_completed(completed(email_addr=addr), None) == []


def project(**settings) -> Contacts:
    return Contacts.of(ProjectUpdated(
        project="P1", name="P1", settings=ProjectSettings(**settings), owners=[
            Contact(username="olga", email="olga@example.org"), Contact(username="nomail")],
        updated_at=datetime(2024, 1, 1, tzinfo=UTC)))


def test_success_mails_can_be_turned_off_failures_cannot() -> None:
    assert POST.upload_completed(completed(outcome="succeeded", success_emails=False), None) == []
    for outcome in ("partial", "failed"):
        [letter] = POST.upload_completed(completed(outcome=outcome, success_emails=False), None)
        assert letter.recipients == ["alice@example.org"]


def test_project_recipients_by_kind_get_their_own_letter() -> None:
    contacts = project(notify=["all@example.org"], recipients={
        "upload.failed": ["oncall@example.org", "ALICE@example.org"],
        "session.conflicted": ["pacs@example.org"]})
    letters = POST.upload_completed(completed(outcome="failed"), contacts)
    assert [letter.recipients for letter in letters] == [
        ["alice@example.org"], ["all@example.org", "oncall@example.org"]]  # alice once
    assert len({letter.id for letter in letters}) == 2
    assert "Hello project P1," in _parts(letters[1].msg)[0]
    assert "alice's upload" in _parts(letters[1].msg)[0]
    letters = POST.upload_completed(completed(outcome="succeeded"), contacts)
    assert [letter.recipients for letter in letters] == [["alice@example.org"],
                                                         ["all@example.org"]]


def test_owners_hear_of_sessions_that_need_attention() -> None:
    ref = SessionRef(project="P1", subject="S1", session="E1",
                     uri="/data/prearchive/projects/P1/20240101_000000000/E1")
    reason = Reason(code="session.exists", message="E1 is already archived.")
    contacts = project(recipients={"session.conflicted": ["pacs@example.org"]})
    [letter] = POST.session_attention("session.conflicted", "ev1", "prearchive/P1/x/E1", ref,
                                      reason, contacts, ["u1"])
    assert letter.recipients == ["olga@example.org", "pacs@example.org"]
    assert letter.msg["Subject"] == "[imgest] Session E1 of P1 is in CONFLICT"
    text, html = _parts(letter.msg)
    assert "E1 is already archived. [session.exists]" in text
    assert f"https://imgest.example.org{ref.uri}" in text and f'href="https://imgest.example.org{ref.uri}"' in html
    [quarantined] = POST.session_attention("session.quarantined", "ev2", "P1/S1/E1", ref, None,
                                           project(), [])
    assert quarantined.recipients == ["olga@example.org"]
    assert "releases it" in _parts(quarantined.msg)[0]
    assert POST.session_attention("session.failed", "ev3", "k", ref, reason, None, []) == []


def test_an_operator_overrides_a_template(tmp_path: Path) -> None:
    (tmp_path / "upload_completed.txt.j2").write_text("Custom: {{ u.upload_id }} {{ headline }}\n")
    [letter] = Post("s@example.org", "http://x", tmp_path).upload_completed(completed(), None)
    text, html = _parts(letter.msg)
    assert text.strip() == f"Custom: {UPLOAD_ID} partly imported"
    assert "<p>Hello alice,</p>" in html  # the HTML part is still the shipped one


async def test_eml_mailer_writes_a_parseable_file(tmp_path: Path) -> None:
    mailer = EmlMailer(tmp_path / "mail")
    assert mailer.transport == "eml"
    msg = make(completed())
    await mailer.send(msg, "n-7")
    files = sorted(p.name for p in (tmp_path / "mail").iterdir())
    assert files == ["n-7.eml"]  # no temp file left behind
    parsed = email.message_from_bytes((tmp_path / "mail" / "n-7.eml").read_bytes(),
                                      policy=email.policy.default)
    assert parsed["Message-ID"] == msg["Message-ID"]
    assert parsed["To"] == "alice@example.org"
    assert parsed["Subject"] == msg["Subject"]
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and "study.zip/notes.txt" in text.get_content()
    assert html is not None and "<code>study.zip/notes.txt</code>" in html.get_content()
    assert text.get_content() == msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


async def test_eml_mailer_overwrites_same_name(tmp_path: Path) -> None:
    mailer = EmlMailer(tmp_path)
    await mailer.send(make(completed(outcome="failed")), "n")
    await mailer.send(make(completed(outcome="succeeded")), "n")
    parsed = email.message_from_bytes((tmp_path / "n.eml").read_bytes(),
                                      policy=email.policy.default)
    assert " archived: " in parsed["Subject"]
    assert [p.name for p in tmp_path.iterdir()] == ["n.eml"]


def test_a_gradual_send_is_told_once_per_sender_when_built() -> None:
    ref = SessionRef(project="P1", subject="S1", session="G1",
                     uri="/data/archive/projects/P1/subjects/S1/experiments/G1")
    alice = Uploader(username="alice", email="alice@example.org")
    quiet = Uploader(username="bob", email="bob@example.org", success_emails=False)
    letters = POST.session_built("ev", ref, "archived", None, [(alice, 3, 3), (quiet, 1, 1)])
    [letter] = letters  # bob turned success mails off
    assert letter.recipients == ["alice@example.org"]
    assert letter.msg["Subject"] == (
        "[imgest] Session G1 of P1 is archived: 3 files sent instance by instance")
    text, html = _parts(letter.msg)
    assert "the 3 files you sent instance by instance (3 uploads)" in text
    assert f"https://imgest.example.org{ref.uri}" in text and 'href="https://imgest' in html
    conflict = Reason(code="session.exists", message="G1 is already archived.")
    letters = POST.session_built("ev", ref, "CONFLICT", conflict, [(quiet, 1, 1)])
    assert [letter.recipients for letter in letters] == [["bob@example.org"]]  # always told
    assert "[session.exists]" in _parts(letters[0].msg)[0]
