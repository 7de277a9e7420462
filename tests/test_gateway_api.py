"""The gateway's ways in, through real HTTP and real clients: identity and permissions (the
`imgest` CLI, curl-style Basic auth, tokens). One stack, local store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import asyncpg
import httpx
import pytest
from imgest_gateway.app import FileNote, _track_files
from imgest_gateway.uploads_api import _ADD_ALL
from imgest_runtime.db import Database

from .conftest import Infra
from .pipeline import Running, started_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def gateway(request, infra: Infra, smtp_server, tmp_path_factory):
    # Two workers whatever the cores: every test here also crosses processes.
    with started_stack(request, infra, smtp_server, tmp_path_factory, "local",
                       IMGEST_MAX_UPLOAD_BYTES=str(1024**3), IMGEST_GATEWAY_WORKERS="2",
                       IMGEST_TUS_IDLE_SECONDS="3", IMGEST_TUS_PATCHES="3") as run:
        yield run


def imgest(run: Running, *args: str, token: str | None = None, stdin: str | None = None
           ) -> subprocess.CompletedProcess:
    """The `imgest` command as a user types it, against this stack."""
    env = {**os.environ, "IMGEST_PUBLIC_URL": run.url,
           "IMGEST_DATA_DIR": str(run.stack.data_dir)}
    env.pop("IMGEST_TOKEN", None)
    if token:
        env["IMGEST_TOKEN"] = token
    return subprocess.run([str(Path(sys.executable).with_name("imgest")), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def as_user(run: Running, token: str | None = None, auth: tuple[str, str] | None = None
            ) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=run.url, timeout=30, headers=headers, auth=auth)


def test_first_start_made_an_administrator_with_a_private_token_file(gateway: Running):
    path = gateway.stack.data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert token.startswith("igt_")
    me = as_user(gateway, token).get("/api/v1/me").json()
    assert me == {"username": "admin", "email": "admin@localhost", "admin": True,
                  "projects": {}}
    log = gateway.log.read_text()
    assert log.count("first start: created the administrator 'admin'") == 1
    assert token in log  # printed that once
    # Only its hash is stored.
    stored = gateway.query("select secret_hash from gateway.api_token where username = 'admin'")
    assert stored and all(token not in row["secret_hash"] for row in stored)


def test_no_or_wrong_credentials_are_401_problems(gateway: Running):
    for client in (as_user(gateway), as_user(gateway, "igt_" + "x" * 43),
                   as_user(gateway, auth=("admin", "wrong password")),
                   httpx.Client(base_url=gateway.url, headers={"Authorization": "Basic %%%"})):
        response = client.get("/api/v1/uploads")
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "Basic" in response.headers["www-authenticate"]
        assert response.json()["detail"]
    # The health and documents stay open: probes and clients read them without a login.
    assert as_user(gateway).get("/healthz").status_code == 200
    assert as_user(gateway).get("/openapi.json").status_code == 200


def test_users_tokens_and_roles_from_the_command_line(gateway: Running, pydicom_file):
    dicom = pydicom_file("CT_small.dcm").read_bytes()
    # An administrator creates a project and two users, from the CLI (admin.token by default).
    assert imgest(gateway, "project", "create", "LIVER", "--name", "Liver study",
                  "--auto-archive", "auto", "--max-files", "200").returncode == 0
    assert imgest(gateway, "project", "create", "OTHER").returncode == 0
    added = imgest(gateway, "user", "add", "ann", "--email", "ann@example.org",
                   "--password-stdin", stdin="ann's secret 1\n")
    assert added.returncode == 0, added.stderr
    added = imgest(gateway, "user", "add", "bob", "--token-create")
    assert added.returncode == 0, added.stderr
    bob = added.stdout.split("token (shown this once): ")[1].strip()
    weak = imgest(gateway, "user", "add", "cy", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "at least 8 characters" in weak.stderr
    changed = imgest(gateway, "project", "set", "LIVER", "--member", "ann=uploader",
                     "--member", "bob=member", "--required-field", "view")
    assert changed.returncode == 0, changed.stderr
    shown = imgest(gateway, "project", "show", "LIVER").stdout
    assert '"ann"' in shown and '"uploader"' in shown and '"view"' in shown

    # ann logs in as curl and XNAT clients do: Basic with her password...
    ann = as_user(gateway, auth=("ann", "ann's secret 1"))
    assert ann.get("/api/v1/me").json()["projects"] == {"LIVER": "uploader"}
    # ...and makes herself a token, which also works in the password's place.
    created = imgest(gateway, "token", "create", "--name", "laptop",
                     token=_token_via_basic(gateway, "ann", "ann's secret 1"))
    assert created.returncode == 0, created.stderr
    ann_token = created.stdout.strip()
    assert as_user(gateway, auth=("ann", ann_token)).get("/api/v1/me").status_code == 200
    assert as_user(gateway, auth=("bob", ann_token)).get("/api/v1/me").status_code == 401

    # An uploader uploads into her project, not elsewhere, and not into Unassigned.
    upload = ann.post("/api/v1/uploads", params={"filename": "a.dcm", "project": "LIVER"},
                      content=dicom)
    assert upload.status_code == 201, upload.text
    assert upload.json()["uploader"] == "ann"
    for params, status in [({"project": "OTHER"}, 403), ({}, 403), ({"project": "NOPE"}, 403)]:
        refused = ann.post("/api/v1/uploads", params={"filename": "a.dcm", **params},
                           content=dicom)
        assert refused.status_code == status, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
    assert gateway.http.post("/api/v1/uploads", params={"filename": "a.dcm", "project": "NOPE"},
                             content=dicom).status_code == 404  # an admin learns it is missing
    # She sees her own upload; bob (a member) sees every upload of LIVER; an admin's upload
    # without a project (Unassigned) is seen by admins only.
    bobs = as_user(gateway, bob)
    by_bob = bobs.post("/api/v1/uploads", params={"filename": "b.dcm", "project": "LIVER"},
                       content=dicom).json()["id"]
    unassigned = gateway.upload("c.dcm", dicom)["id"]
    assert ann.get(f"/api/v1/uploads/{upload.json()['id']}").status_code == 200
    assert ann.get(f"/api/v1/uploads/{by_bob}").status_code == 403
    assert bobs.get(f"/api/v1/uploads/{upload.json()['id']}").status_code == 200
    assert bobs.get(f"/api/v1/uploads/{unassigned}").status_code == 403
    assert {u["id"] for u in ann.get("/api/v1/uploads").json()} == {upload.json()["id"]}
    assert {u["id"] for u in bobs.get("/api/v1/uploads").json()} == {upload.json()["id"], by_bob}
    assert unassigned in {u["id"] for u in gateway.http.get("/api/v1/uploads").json()}
    # Only owners and admins change a project; only admins make projects and users.
    assert bobs.patch("/api/v1/projects/LIVER", json={"name": "x"}).status_code == 403
    assert bobs.post("/api/v1/projects", json={"id": "MINE"}).status_code == 403
    assert bobs.get("/api/v1/users").status_code == 403
    assert bobs.get("/api/v1/projects/OTHER").status_code == 403
    assert [p["id"] for p in bobs.get("/api/v1/projects").json()] == ["LIVER"]
    bad = gateway.http.patch("/api/v1/projects/LIVER", json={"settings": {
        "auto_archive": "sometimes"}})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"][-2:] == ["settings",
                                                                            "auto_archive"]

    # A revoked token stops working at once; a deactivated user's tokens all stop.
    listed = imgest(gateway, "token", "list", "ann", "--json").stdout.splitlines()
    laptop = [line for line in listed if '"laptop"' in line]
    assert len(laptop) == 1 and ann_token not in laptop[0]
    token_id = laptop[0].split('"id": "')[1].split('"')[0]
    assert imgest(gateway, "token", "revoke", token_id, "--user", "ann").returncode == 0
    assert as_user(gateway, ann_token).get("/api/v1/me").status_code == 401
    assert imgest(gateway, "user", "set", "bob", "--deactivate").returncode == 0
    assert bobs.get("/api/v1/me").status_code == 401
    # An administrator cannot lock themself out.
    assert gateway.http.patch("/api/v1/users/admin", json={"active": False}).status_code == 403

    # Each worker keeps who a token is, and forgets it once anything about users, tokens or
    # memberships changes, whoever changes it: here an administrator's own SQL.
    added = imgest(gateway, "user", "add", "dee", "--token-create")
    dee = added.stdout.split("token (shown this once): ")[1].strip()
    assert imgest(gateway, "project", "set", "LIVER", "--member", "dee=member").returncode == 0

    def dee_sees() -> list[Any]:  # new connections: the requests go to either worker
        return [(r.status_code, r.json().get("projects")) for r in
                (as_user(gateway, dee).get("/api/v1/me") for _ in range(6))]

    def soon(expected: Any) -> None:  # the notice travels with the commit: milliseconds
        deadline = time.monotonic() + 3
        while (seen := dee_sees()) != [expected] * 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [expected] * 6, seen

    soon((200, {"LIVER": "member"}))
    gateway.query("update gateway.membership set role = 'owner' where username = 'dee'")
    soon((200, {"LIVER": "owner"}))
    gateway.query('update gateway."user" set active = false where username = \'dee\'')
    soon((401, None))
    # The worker that revokes a token forgets it at the commit: the next request on the same
    # connection (so to the same worker) is refused, without waiting for the notice.
    made = gateway.http.post("/api/v1/users/admin/tokens", json={"name": "once"}).json()
    as_once = {"Authorization": f"Bearer {made['token']}"}
    assert gateway.http.get("/api/v1/me", headers=as_once).status_code == 200  # kept now
    assert gateway.http.delete(f"/api/v1/users/admin/tokens/{made['id']}").status_code == 204
    assert gateway.http.get("/api/v1/me", headers=as_once).status_code == 401


def test_cli_says_clearly_what_is_wrong(gateway: Running):
    no_token = subprocess.run(
        [str(Path(sys.executable).with_name("imgest")), "project", "list"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "IMGEST_PUBLIC_URL": gateway.url, "IMGEST_DATA_DIR": "/nonexistent"})
    assert no_token.returncode == 1 and "no token" in no_token.stderr
    wrong = imgest(gateway, "project", "list", token="igt_" + "y" * 43)
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Traceback" not in wrong.stderr
    exists = imgest(gateway, "project", "create", "LIVER2")
    again = imgest(gateway, "project", "create", "LIVER2")
    assert exists.returncode == 0 and again.returncode == 1 and "exists" in again.stderr


def _token_via_basic(run: Running, user: str, password: str) -> str:
    """A user with only a password gets a first token over Basic auth."""
    response = as_user(run, auth=(user, password)).post(f"/api/v1/users/{user}/tokens",
                                                         json={"name": "bootstrap"})
    assert response.status_code == 201, response.text
    return response.json()["token"]


# --- upload sessions -----------------------------------------------------------------------------


def _dicom(pydicom_file, patient: str) -> bytes:
    """A DICOM file of its own (new UIDs): distinct content for each call."""
    import pydicom
    from pydicom.uid import generate_uid

    from .pipeline import dicom_bytes

    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = ds.PatientName = patient
    return dicom_bytes(ds)


def test_upload_session_fields_duplicates_cap_progress_and_listing(gateway: Running,
                                                                   pydicom_file):
    import json
    import threading

    http = gateway.http
    gateway.project("SLIDES", required_fields=["view_name", "capture_date"],
                    max_files_per_upload=3)
    missing = http.post("/api/v1/projects/SLIDES/uploads", json={"fields": {"view_name": "AP"}})
    assert missing.status_code == 422, missing.text
    assert "capture_date" in missing.json()["detail"]
    assert missing.json()["errors"] == [{"loc": ["body", "fields", "capture_date"],
                                         "msg": "Field required"}]
    # Fields travel in upload.submitted, which the broker must take: 10,000 of 1,000
    # characters made it 10 MB, never sent, and the upload never ended.
    crowded = http.post("/api/v1/projects/SLIDES/uploads", json={"fields": {
        "view_name": "AP", "capture_date": "2026-11-26",
        **{f"f{i}": "x" * 1000 for i in range(10_000)}}})
    assert crowded.status_code == 422, crowded.text
    [error] = crowded.json()["errors"]
    assert error["loc"] == ["body", "fields"] and "at most 100" in error["msg"], crowded.text
    created = http.post("/api/v1/projects/SLIDES/uploads", json={
        "fields": {"view_name": "AP", "capture_date": "2026-11-26"}, "subject": "S1"})
    assert created.status_code == 201, created.text
    upload = created.json()
    assert upload["state"] == "open" and upload["options"]["fields"]["view_name"] == "AP"
    files = f"/api/v1/uploads/{upload['id']}/files"

    a, b, c, d = (_dicom(pydicom_file, f"SESS{i}") for i in range(4))
    first = http.post(files, params={"filename": "a.dcm"}, content=a)
    assert first.status_code == 201 and first.json()["added"] == 1, first.text
    # Many at once (multipart): one is the same content as a.dcm, so it is skipped and said so.
    many = http.post(files, files=[("file", ("again.dcm", a)), ("file", ("b.dcm", b)),
                                   ("file", ("c.dcm", c))])
    assert many.status_code == 201, many.text
    assert (many.json()["added"], many.json()["duplicates"]) == (2, 1)
    skipped = [f for f in many.json()["files"] if f["state"] == "duplicate"]
    assert skipped[0]["filename"] == "again.dcm"
    assert skipped[0]["reason"]["code"] == "upload.duplicate" and "a.dcm" in skipped[0][
        "reason"]["message"]
    # The project allows 3 files per upload.
    over = http.post(files, params={"filename": "d.dcm"}, content=d)
    assert over.status_code == 409 and "max_files_per_upload" in over.json()["detail"]
    listed = http.get("/api/v1/projects/SLIDES/uploads").json()
    mine = [u for u in listed if u["id"] == upload["id"]]
    assert mine and mine[0]["state"] == "open" and mine[0]["objects"] == {"added": 3,
                                                                          "duplicate": 1}

    # Live progress while it is processed (Server-Sent Events), then the per-file status.
    events: list[tuple[str, dict]] = []

    def follow() -> None:
        with httpx.stream("GET", f"{gateway.url}/api/v1/uploads/{upload['id']}/events",
                          headers={"Authorization": f"Bearer {gateway.token}"},
                          timeout=120) as stream:
            if not stream.headers["content-type"].startswith("text/event-stream"):
                events.append(("unexpected", {"status": stream.status_code,
                                              "body": stream.read().decode()}))
                return
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: ") and name:
                    events.append((name, json.loads(line[len("data: "):])))

    reader = threading.Thread(target=follow)
    reader.start()
    submitted = http.post(f"/api/v1/uploads/{upload['id']}/submit")
    assert submitted.status_code == 200 and submitted.json()["state"] == "processing"
    assert http.post(f"/api/v1/uploads/{upload['id']}/submit").status_code == 200  # idempotent
    reader.join(timeout=120)
    assert events and events[-1][0] == "done", events
    assert events[0][1]["state"] in ("open", "processing")
    assert events[-1][1]["state"] == "archived" and events[-1][1]["files"] == {"archived": 3}
    state = gateway.wait(upload["id"])
    assert state["counts"]["archived"] == 3
    duplicate = [o for o in state["objects"] if o["state"] == "duplicate"]
    assert len(duplicate) == 1 and duplicate[0]["reason"]["code"] == "upload.duplicate"
    assert http.post(files, params={"filename": "late.dcm"}, content=d).status_code == 409

    # A second upload with content already archived in the project: skipped, and said where.
    again = http.post("/api/v1/projects/SLIDES/uploads", json={
        "fields": {"view_name": "PA", "capture_date": "2026-11-26"}}).json()
    known = http.post(f"/api/v1/uploads/{again['id']}/files", params={"filename": "x.dcm"},
                      content=b)
    assert known.status_code == 200 and known.json()["added"] == 0
    assert known.json()["files"][0]["reason"]["code"] == "upload.already_archived"
    nothing = http.post(f"/api/v1/uploads/{again['id']}/submit")
    assert nothing.status_code == 409 and "no files" in nothing.json()["detail"]


def test_clients_adding_at_once_add_the_same_content_once_and_keep_the_cap(
        gateway: Running, pydicom_file):
    """Files added by many clients at the same moment: the same content is added once (the
    others are duplicates, whichever path decided), and no more than the project's cap get in,
    the rest refused with nothing left of them."""
    http = gateway.http
    gateway.project("RACE", max_files_per_upload=5)
    upload = http.post("/api/v1/projects/RACE/uploads", json={}).json()
    files = f"/api/v1/uploads/{upload['id']}/files"
    same = _dicom(pydicom_file, "RACE")
    others = [_dicom(pydicom_file, f"RACE{i}") for i in range(10)]

    def add(i_data: tuple[int, bytes]) -> httpx.Response:
        with httpx.Client(base_url=gateway.url, timeout=60, headers={
                "Authorization": f"Bearer {gateway.token}"}) as client:
            return client.post(files, params={"filename": f"f{i_data[0]}.dcm"},
                               content=i_data[1])

    with ThreadPoolExecutor(12) as pool:
        twins = list(pool.map(add, enumerate([same] * 12)))
    assert sorted(r.status_code for r in twins) == [200] * 11 + [201], [r.text for r in twins]
    assert sum(r.json()["added"] for r in twins) == 1
    with ThreadPoolExecutor(10) as pool:
        rest = list(pool.map(add, enumerate(others, start=100)))
    assert sorted(r.status_code for r in rest) == [201] * 4 + [409] * 6, [r.text for r in rest]
    state = gateway.status(upload["id"])
    assert sorted(o["state"] for o in state["objects"]) == ["added"] * 5 + ["duplicate"] * 11
    # Duplicates and refused files are deleted.
    assert len(list(gateway.store.list(f"staging/{upload['id']}/"))) == 5


def _upload_row(gateway: Running, upload_id: str, project: str, state: str = "open") -> None:
    gateway.query("insert into gateway.upload (id, state, project, uploader, options, "
                  "created_at, files_added, redrives) values ($1, $2, $3, 'admin', '{}', now(), "
                  "0, 0)", upload_id, state, project)


def _add_all_args(upload_id: str, project: str, shas: list[str], cap: int = 100) -> list[Any]:
    keys = [f"staging/{upload_id}/{os.urandom(6).hex()}-f.dcm" for _ in shas]
    return _ADD_ALL.args({
        "upload_id": upload_id, "project": project, "added": len(shas), "cap": cap,
        "shas": shas, "object_keys": keys, "filenames": ["f.dcm"] * len(shas),
        "sizes": [1] * len(shas), "sha256s": shas, "content_types": [None] * len(shas)})


def test_the_one_statement_add_adds_only_what_is_new_with_room_in_an_open_upload(
        gateway: Running):
    """`_ADD_ALL`, straight on the database: what it adds (n) and what it leaves to the locked
    path (0): content archived in the project (its own look-up, not the updated upload's),
    already in the upload, no room, an upload no longer open; and, while it waits on the
    upload's row, what the holder did meanwhile."""
    tag = os.urandom(3).hex()
    p, q = f"P{tag}", f"Q{tag}"
    archived, open_p, open_q = f"arch-{tag}", f"openp-{tag}", f"openq-{tag}"
    for upload_id, project, state in ((archived, p, "archived"), (open_p, p, "open"),
                                      (open_q, q, "open")):
        _upload_row(gateway, upload_id, project, state)
    old, new, more = (f"{c}{tag}".ljust(64, "0") for c in "abc")
    gateway.query("insert into gateway.upload_file (file_id, upload_id, object_key, path, "
                  "sha256, state, updated_at) values ($1, $2, 'k', 'a.dcm', $3, 'archived', "
                  "now())", f"f-{tag}", archived, old)

    def add(*args: Any, **kw: Any) -> int:
        return gateway.query(_ADD_ALL.sql, *_add_all_args(*args, **kw))[0][0]

    assert add(open_p, p, [old]) == 0  # archived in P
    assert add(open_p, p, [new, old]) == 0  # one of two archived: neither
    assert add(open_q, q, [old]) == 1  # archived in another project only
    assert add(open_p, p, [new]) == 1
    assert add(open_p, p, [new]) == 0  # already in the upload: no unique violation logged
    assert add(open_p, p, [more], cap=1) == 0  # no room
    assert add(open_p, p, [more], cap=2) == 1  # exactly at the cap
    assert gateway.query("select files_added from gateway.upload where id = $1",
                         open_p)[0][0] == 2
    gateway.query("update gateway.upload set state = 'processing' where id = $1", open_q)
    assert add(open_q, q, [new]) == 0

    async def waiting(holder_sql: str, holder_args: list[Any], *args: Any, **kw: Any) -> Any:
        url = gateway.env["IMGEST_DATABASE_URL"].replace("postgresql+asyncpg", "postgresql")
        holder, waiter = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            held = holder.transaction()
            await held.start()
            await holder.fetch(holder_sql, *holder_args)
            second = asyncio.ensure_future(waiter.fetchval(_ADD_ALL.sql, *_add_all_args(
                *args, **kw)))
            await asyncio.sleep(0.3)
            assert not second.done()  # it waits on the upload's row
            await held.commit()
            try:
                return await second
            except asyncpg.UniqueViolationError as e:
                return type(e).__name__
        finally:
            await holder.close()
            await waiter.close()

    same, last, shut = f"same-{tag}", f"last-{tag}", f"shut-{tag}"
    for upload_id in (same, last, shut):
        _upload_row(gateway, upload_id, p)
    x, y, z = (f"{c}{tag}".ljust(64, "1") for c in "xyz")
    assert asyncio.run(waiting(_ADD_ALL.sql, _add_all_args(same, p, [x]), same, p, [x])) == (
        "UniqueViolationError")  # the same content, added while it waited
    assert asyncio.run(waiting(_ADD_ALL.sql, _add_all_args(last, p, [y], cap=1), last, p, [z],
                               cap=1)) == 0  # the last place taken while it waited
    assert asyncio.run(waiting("update gateway.upload set state = 'processing' where id = $1",
                               [shut], shut, p, [z])) == 0  # submitted while it waited
    assert gateway.query("select count(*) from gateway.upload_object where upload_id = $1",
                         shut)[0][0] == 0


def test_one_file_sent_as_a_form_is_its_bytes(gateway: Running, pydicom_file):
    """`curl -F file=@x` to the one-file endpoints stores the file, not the form around it; a
    form of two files is refused, nothing of it kept; a media type's case does not matter."""
    http = gateway.http
    gateway.project("FORM1")
    data = _dicom(pydicom_file, "FORM1")
    one = http.post("/api/v1/uploads", params={"filename": "x.dcm", "project": "FORM1"},
                    files={"file": ("x.dcm", data, "application/dicom")})
    assert one.status_code == 201, one.text
    [obj] = gateway.status(one.json()["id"])["objects"]
    assert (obj["filename"], obj["size"]) == ("x.dcm", len(data))
    two = http.post("/api/v1/uploads", params={"filename": "y.dcm", "project": "FORM1"},
                    files=[("file", ("a.dcm", data)), ("file", ("b.dcm", data))])
    assert two.status_code == 400 and "exactly one file" in two.json()["detail"]
    xnat = http.post("/data/services/import", params={"PROJECT_ID": "FORM1"},
                     files=[("file", ("a.zip", b"PK")), ("file", ("b.zip", b"PK"))])
    assert xnat.status_code == 400 and "exactly one file" in xnat.text
    assert not [o for o in gateway.store.list("staging/")
                if o.key.endswith(("/y.dcm", "/a.zip", "/b.zip"))]
    upload = http.post("/api/v1/projects/FORM1/uploads", json={}).json()
    shouted = http.post(f"/api/v1/uploads/{upload['id']}/files", content=(
        b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.dcm\"\r\n\r\n"
        + data + b"\r\n--B--\r\n"), headers={"Content-Type": "Multipart/Form-Data; boundary=B"})
    assert shouted.status_code == 201 and shouted.json()["files"][0]["filename"] == "s.dcm"


def test_a_refused_one_file_upload_leaves_no_folder(gateway: Running, pydicom_file):
    """An empty body, or a form of two files, to the one-file endpoints: refused, and its new
    upload's staging folder goes with the file."""
    http = gateway.http
    gateway.project("NOFOLDER")
    staging = gateway.store.root / "staging"
    before = set(staging.glob("*"))
    empty = http.post("/api/v1/uploads", params={"filename": "e.dcm", "project": "NOFOLDER"},
                      content=b"")
    assert empty.status_code == 400 and "empty" in empty.json()["detail"], empty.text
    data = _dicom(pydicom_file, "NOFOLDER")
    two = http.post("/api/v1/uploads", params={"filename": "t.dcm", "project": "NOFOLDER"},
                    files=[("file", ("a.dcm", data)), ("file", ("b.dcm", data))])
    assert two.status_code == 400, two.text
    xnat = http.post("/data/services/import", params={"PROJECT_ID": "NOFOLDER"}, content=b"",
                     headers={"Content-Type": "application/zip"})
    assert xnat.status_code == 400, xnat.text
    assert not set(staging.glob("*")) - before


def test_many_files_in_one_form_are_streamed_and_each_gets_a_verdict(gateway: Running,
                                                                    pydicom_file):
    http = gateway.http
    gateway.project("FORMS", max_files_per_upload=4)
    upload = http.post("/api/v1/projects/FORMS/uploads", json={}).json()
    files = f"/api/v1/uploads/{upload['id']}/files"
    a, b, c = (_dicom(pydicom_file, f"FORM{i}") for i in range(3))
    # A nameless part (what a browser sends for an empty file input) and an empty file are
    # refused on their own; the others are added; a text field is read and dropped.
    boundary = "b0undary"

    def part(name: str, filename: str | None, data: bytes) -> bytes:
        named = f'; filename="{filename}"' if filename is not None else ""
        return (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{named}\r\n'
                "\r\n").encode() + data + b"\r\n"

    form_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    sent = http.post(files, headers=form_type, content=b"".join([
        part("note", None, b"hello"), part("file", "a.dcm", a), part("file", "", b"stray"),
        part("file", "empty.dcm", b""), part("file", "b.dcm", b), f"--{boundary}--\r\n".encode()]))
    assert sent.status_code == 201, sent.text
    verdicts = {f["filename"]: f for f in sent.json()["files"]}
    assert (sent.json()["added"], sent.json()["refused"]) == (2, 2)
    assert verdicts[""]["reason"]["code"] == "upload.bad_file_name"
    assert verdicts["empty.dcm"]["reason"]["code"] == "upload.empty_file"
    assert {verdicts["a.dcm"]["state"], verdicts["b.dcm"]["state"]} == {"added"}
    keys = sorted(o.key for o in gateway.store.list(f"staging/{upload['id']}/"))
    assert keys == sorted([verdicts["a.dcm"]["object_key"], verdicts["b.dcm"]["object_key"]])

    # A form that breaks off is refused whole: nothing of it stays in the store or the upload.
    broken = http.post(files, headers=form_type, content=part("file", "c.dcm", c) + part(
        "file", "d.dcm", c)[:700])
    assert broken.status_code == 400, broken.text
    assert broken.headers["content-type"] == "application/problem+json"
    assert "broke off" in broken.json()["detail"]
    assert sorted(o.key for o in gateway.store.list(f"staging/{upload['id']}/")) == keys

    # Past the cap (4): the form's files beyond it are refused, each saying why.
    over = http.post(files, files=[("file", (f"{i}.dcm", _dicom(pydicom_file, f"OVER{i}")))
                                   for i in range(3)])
    assert over.status_code == 201 and over.json()["added"] == 2, over.text
    assert over.json()["files"][2]["reason"]["code"] == "upload.too_many_files"
    full = http.post(files, files=[("file", ("late.dcm", c))])
    assert full.status_code == 409 and "max_files_per_upload" in full.json()["detail"]
    assert full.json()["files"][0]["state"] == "refused"
    assert len(list(gateway.store.list(f"staging/{upload['id']}/"))) == 4


def test_cancel_an_open_upload_and_retry_failed_files(gateway: Running, pydicom_file):
    http = gateway.http
    gateway.project("RETRY")
    # Cancel: the files go, nothing is processed, nothing more can be added.
    upload = http.post("/api/v1/projects/RETRY/uploads", json={}).json()
    http.post(f"/api/v1/uploads/{upload['id']}/files", params={"filename": "a.dcm"},
              content=_dicom(pydicom_file, "CANCEL"))
    assert list(gateway.store.list(f"staging/{upload['id']}/"))
    cancelled = http.post(f"/api/v1/uploads/{upload['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert not list(gateway.store.list(f"staging/{upload['id']}/"))
    assert http.post(f"/api/v1/uploads/{upload['id']}/files", params={"filename": "b.dcm"},
                     content=b"x").status_code == 409

    # Retry: a file the pipeline gave up on (the metadata service's table of seen files away)
    # is processed again once the cause is fixed. (A staged copy gone is refused at once.)
    upload = http.post("/api/v1/projects/RETRY/uploads", json={}).json()
    http.post(f"/api/v1/uploads/{upload['id']}/files", params={"filename": "r.dcm"},
              content=_dicom(pydicom_file, "RETRY"))
    gateway.query("alter table metadata.seen_file rename to seen_file_away")
    try:
        http.post(f"/api/v1/uploads/{upload['id']}/submit")
        failed = gateway.wait(upload["id"], timeout=120)
    finally:
        gateway.query("alter table metadata.seen_file_away rename to seen_file")
    assert failed["state"] == "failed" and failed["files"][0]["reason"]["code"] == (
        "pipeline.failed")
    assert http.post(f"/api/v1/uploads/{upload['id']}/cancel").status_code == 409
    retried = http.post(f"/api/v1/uploads/{upload['id']}/retry")
    assert retried.status_code == 200 and retried.json()["retried"] == 1, retried.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and gateway.status(upload["id"])["state"] != "archived":
        time.sleep(0.2)
    assert gateway.status(upload["id"])["state"] == "archived"
    assert http.post(f"/api/v1/uploads/{upload['id']}/retry").status_code == 409


def test_an_upload_cancelled_while_a_file_streams_in_says_so(gateway: Running):
    """The cancel deletes the upload's folder under the file being written: the answer is the
    upload's state (409), not a store failure (a 503, which clients retry)."""
    http = gateway.http
    gateway.project("CANCELMID")
    upload = http.post("/api/v1/projects/CANCELMID/uploads", json={}).json()
    other = httpx.Client(base_url=gateway.url, headers=http.headers, timeout=30)

    def body():
        for i in range(5):
            if i == 3:
                cancelled = other.post(f"/api/v1/uploads/{upload['id']}/cancel")
                assert cancelled.status_code == 200, cancelled.text
            yield os.urandom(1024 * 1024)

    added = http.post(f"/api/v1/uploads/{upload['id']}/files", params={"filename": "big.bin"},
                      content=body())
    assert added.status_code == 409 and added.json()["title"] == "Upload not open", added.text
    assert "cancelled" in added.json()["detail"]
    assert not list(gateway.store.list(f"staging/{upload['id']}/"))


def test_cancel_an_upload_being_processed(gateway: Running, pydicom_file):
    http = gateway.http
    gateway.project("STOP")
    upload = http.post("/api/v1/projects/STOP/uploads", json={}).json()
    http.post(f"/api/v1/uploads/{upload['id']}/files", files=[
        ("file", (f"{i}.dcm", _dicom(pydicom_file, f"STOP{i}"))) for i in range(3)])
    supervisor = gateway.stack.supervisor
    supervisor.hold("metadata")  # the files stop half-way: staged, not yet checked
    try:
        http.post(f"/api/v1/uploads/{upload['id']}/submit")
        gateway.wait_files(upload["id"], {"staged"}, 3)
        cancel = http.post(f"/api/v1/uploads/{upload['id']}/cancel")
        assert cancel.status_code == 202 and cancel.json()["state"] == "cancelling", cancel.text
        again = http.post(f"/api/v1/uploads/{upload['id']}/cancel")
        assert again.status_code == 202 and again.json()["state"] == "cancelling"
        done = gateway.wait(upload["id"], timeout=60)
    finally:
        supervisor.release("metadata")
    # Nothing was placed; the files say why; staging is emptied, also of what was still on its
    # way (checked by metadata after the cancel).
    assert done["state"] == "cancelled" and done["outcome"] == "cancelled", done
    assert {f["state"] for f in done["files"]} == {"cancelled"}
    assert done["files"][0]["reason"]["code"] == "upload.cancelled"
    assert not gateway.query("select 1 from importer.file where upload_id = $1", upload["id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and list(gateway.store.list(f"staging/{upload['id']}/")):
        time.sleep(0.2)
    assert not list(gateway.store.list(f"staging/{upload['id']}/"))
    assert gateway.status(upload["id"])["state"] == "cancelled"
    # The files gone from staging were refused at once by metadata, not retried (each retry
    # holds up the files behind it).
    def told() -> list[str]:
        return [line for line in gateway.log.read_text().splitlines()
                if f"imgest.metadata: upload {upload['id']}: " in line]

    while time.monotonic() < deadline and len(told()) < 3:
        time.sleep(0.2)
    assert len(told()) == 3 and all("removed before it could be checked" in t
                                    for t in told()), told()

    # Once an upload finished, it is too late.
    finished = http.post("/api/v1/projects/STOP/uploads", json={}).json()
    http.post(f"/api/v1/uploads/{finished['id']}/files", params={"filename": "f.dcm"},
              content=_dicom(pydicom_file, "FINISHED"))
    http.post(f"/api/v1/uploads/{finished['id']}/submit")
    assert gateway.wait(finished["id"])["state"] == "archived"
    late = http.post(f"/api/v1/uploads/{finished['id']}/cancel")
    assert late.status_code == 409 and "finished" in late.json()["detail"]


# --- XNAT compatibility --------------------------------------------------------------------------


def _two_study_zip(pydicom_file) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("one.dcm", _dicom(pydicom_file, "ZIPONE"))
        zf.writestr("two.dcm", _dicom(pydicom_file, "ZIPTWO"))
    return out.getvalue()


def _curl(*args: str) -> tuple[int, str, str]:
    """curl as a user types it: (status, content type, body)."""
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}",
                          *args], capture_output=True, text=True, timeout=120, check=True)
    body, _, tail = out.stdout.rpartition("\n")
    status, _, content_type = tail.partition(" ")
    return int(status), content_type, body


def test_xnat_import_with_curl(gateway: Running, pydicom_file, tmp_path):
    gateway.project("XP")
    token = gateway.token
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(_dicom(pydicom_file, "CURL1"))
    url = f"{gateway.url}/data/services/import"
    # One file, archived where the parameters say (Basic auth with a token as the password).
    status, kind, body = _curl("-u", f"admin:{token}", "-X", "POST", "--data-binary",
                               f"@{scan}", "-H", "Content-Type: application/dicom",
                               f"{url}?PROJECT_ID=XP&SUBJECT_ID=S1&EXPT_LABEL=E1&dest=/archive")
    assert (status, kind.split(";")[0]) == (200, "text/plain"), body
    assert body.strip() == "/data/archive/projects/XP/subjects/S1/experiments/E1"
    # A zip of two studies into the prearchive: two URIs, as text/uri-list.
    zipped = tmp_path / "two.zip"
    zipped.write_bytes(_two_study_zip(pydicom_file))
    status, kind, body = _curl("-u", f"admin:{token}", "-F", f"file=@{zipped}",
                               f"{url}?project=XP&dest=/prearchive&import-handler=DICOM-zip")
    assert status == 200 and kind.startswith("text/uri-list"), body
    lines = body.splitlines()  # CRLF on the wire (text mode reads both as one)
    assert len(lines) == 2 and all(line.startswith("/data/prearchive/projects/XP/")
                                   for line in lines), body
    # SI takes one session: the same zip is refused (its sessions are named).
    status, _, body = _curl("-u", f"admin:{token}", "-X", "POST", "--data-binary",
                            f"@{zipped}", "-H", "Content-Type: application/zip",
                            f"{url}?project=XP&import-handler=SI&overwrite=append")
    assert status == 400 and "SI" in body
    # XNAT's errors: plain text and its codes.
    for args, expected in [((f"{url}?import-handler=NOPE",), 404),
                           ((f"{url}?dest=/elsewhere",), 400),
                           ((f"{url}?project=NOSUCH",), 404)]:
        status, kind, body = _curl("-u", f"admin:{token}", "-X", "POST", "--data-binary",
                                   f"@{scan}", *args)
        assert status == expected and kind.startswith("text/plain"), (args, status, body)
    status, kind, body = _curl("-X", "POST", "--data-binary", f"@{scan}", url)
    assert status == 401 and kind.startswith("text/plain") and "application/problem" not in kind
    # Progress under http-session-listener, and an earlier upload imported by src.
    upload = gateway.http.post("/api/v1/projects/XP/uploads", json={}).json()
    gateway.http.post(f"/api/v1/uploads/{upload['id']}/files", params={"filename": "s.dcm"},
                      content=_dicom(pydicom_file, "SRC1"))
    status, _, body = _curl("-u", f"admin:{token}", "-X", "POST",
                            f"{url}?src={upload['id']}&project=XP&SUBJECT_ID=SRC"
                            "&EXPT_LABEL=SRC_E&dest=/archive&http-session-listener=L1")
    assert status == 200 and body.strip() == (
        "/data/archive/projects/XP/subjects/SRC/experiments/SRC_E"), body
    status, _, body = _curl("-u", f"admin:{token}", f"{gateway.url}/data/status/L1")
    assert status == 200 and body.startswith("archived"), body


def test_xnat_python_client_logs_in_and_imports(gateway: Running, pydicom_file, tmp_path):
    import pydicom
    import xnat

    gateway.project("XPY")
    assert imgest(gateway, "user", "add", "xuser", "--password-stdin",
                  stdin="xnat password 1\n").returncode == 0
    assert imgest(gateway, "project", "set", "XPY", "--member", "xuser=member").returncode == 0
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(_dicom(pydicom_file, "XNATPY"))
    # Connects as XNAT's users do: logs in (PUT /data/services/auth, GET /data/auth), builds
    # its object model from imgest's schema (/xapi/schemas), imports, reads, downloads.
    with xnat.connect(gateway.url, user="xuser", password="xnat password 1") as session:
        assert session.logged_in_user == "xuser"
        experiment = session.services.import_(scan, project="XPY", subject="PY1",
                                              experiment="PY1_CT", destination="/archive")
        assert type(experiment).__name__ == "CtSessionData"
        assert (experiment.label, experiment.project, experiment.subject_id,
                experiment.modality) == ("PY1_CT", "XPY", "XPY.PY1", "CT")  # (an ID)
        assert experiment.subject.label == "PY1"
        assert [p.id for p in session.projects.values()] == ["XPY"]  # what xuser may see
        browsed = session.projects["XPY"].subjects["PY1"].experiments["PY1_CT"]
        assert browsed.uid == pydicom.dcmread(scan).StudyInstanceUID
        (series,) = browsed.scans.values()
        assert type(series).__name__ == "CtScanData" and series.modality == "CT"
        (resource,) = series.resources.values()
        (one,) = resource.files.values()
        assert resource.label == "DICOM" and resource.file_count == 1
        one.download(tmp_path / "back.dcm", verbose=False)
        assert (tmp_path / "back.dcm").read_bytes() == scan.read_bytes()
        browsed.download(tmp_path / "session.zip", verbose=False)
        with zipfile.ZipFile(tmp_path / "session.zip") as zf:
            member = f"PY1_CT/scans/{series.id}/resources/DICOM/files/{one.id}"
            assert zf.namelist() == [member]
        second = tmp_path / "second.dcm"
        second.write_bytes(_dicom(pydicom_file, "XNATPY2"))
        entry = session.services.import_(second, project="XPY", subject="PY2",
                                         experiment="PY2_MR", destination="/prearchive")
        assert entry.uri.startswith("/data/prearchive/projects/XPY/"), entry.uri
        assert entry.uri.endswith("/PY2_MR") and entry.status == "READY"
        # The entry browsed before archiving: its scans, resources and files.
        (pre_scan,) = entry.scans.values()
        (pre_file,) = pre_scan.files.values()
        assert pre_scan.resources["DICOM"].file_count == 1
        assert pre_file.open().read() == second.read_bytes()
        # Archived under another subject and label (XNAT's subject and session parameters).
        archived = entry.archive(subject="PY3", experiment="PY3_CT")
        assert (type(archived).__name__, archived.label, archived.subject.label) == (
            "CtSessionData", "PY3_CT", "PY3")
        third = tmp_path / "third.dcm"
        third.write_bytes(_dicom(pydicom_file, "XNATPY3"))
        doomed = session.services.import_(third, project="XPY", destination="/prearchive")
        # The client's prearchive listing finds it, and each entry it lists can be browsed.
        listed = session.prearchive.sessions(project="XPY")
        assert doomed.uri in [e.uri for e in listed]
        assert all(len(e.scans) == 1 for e in listed)
        doomed.delete()  # XNAT's /data/services/prearchive/delete
        assert doomed.uri not in [e.uri for e in session.prearchive.sessions()]
        jsession = session.jsession
    # The session it used is gone after the client closed it.
    assert httpx.get(f"{gateway.url}/data/auth",
                     cookies={"JSESSIONID": jsession}).status_code == 401
    # A token in the password's place (XNAT's alias tokens) works the same way.
    token = _token_via_basic(gateway, "xuser", "xnat password 1")
    with xnat.connect(gateway.url, user="xuser", password=token) as session:
        assert session.logged_in_user == "xuser"
    # Wrong password: the client's own login error.
    with pytest.raises(xnat.exceptions.XNATLoginFailedError):
        xnat.connect(gateway.url, user="xuser", password="wrong", no_parse_model=True)


# --- resumable uploads (tus) ---------------------------------------------------------------------

TUS_CLIENT = """
import sys
from tusclient import client

url, token, path, upload_id, stop_at, resume = sys.argv[1:7]
tus = client.TusClient(url + "/api/v1/tus/", headers={"Authorization": "Bearer " + token})
if resume:
    uploader = tus.uploader(path, url=resume, chunk_size=4 * 1024 * 1024)
else:
    uploader = tus.uploader(path, chunk_size=4 * 1024 * 1024,
                            metadata={"upload": upload_id, "filename": "slide.svs"})
uploader.upload(stop_at=int(stop_at) if stop_at else None)
print(uploader.url, uploader.offset)
"""


def _tus_process(run: Running, path, upload_id: str, stop_at: int | None = None,
                 resume: str = "") -> tuple[str, int]:
    """tuspy in a process of its own, as a separate client would be."""
    done = subprocess.run([sys.executable, "-c", TUS_CLIENT, run.url, run.token, str(path),
                           upload_id, str(stop_at or ""), resume], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    url, offset = done.stdout.split()
    return url, int(offset)


def test_tus_upload_interrupted_then_resumed_by_another_process_after_a_restart(
        gateway: Running, tmp_path):
    import hashlib

    http = gateway.http
    gateway.project("TUS")
    upload = http.post("/api/v1/projects/TUS/uploads", json={}).json()
    big = tmp_path / "slide.svs"
    big.write_bytes(os.urandom(20 * 1024 * 1024 + 12345))
    # The first client sends 8 MiB and stops (its process ends: a closed laptop).
    url, offset = _tus_process(gateway, big, upload["id"], stop_at=8 * 1024 * 1024)
    assert offset >= 8 * 1024 * 1024 and url.startswith(f"{gateway.url}/api/v1/tus/")
    # The gateway goes down hard and comes back: what it had is still there.
    gateway.stack.supervisor.kill("gateway")
    time.sleep(1)
    gateway.stack.wait_ready(timeout=120)
    tus = {"Tus-Resumable": "1.0.0"}
    head = http.head(url, headers=tus)
    assert head.status_code == 200 and int(head.headers["upload-offset"]) == offset
    assert head.headers["upload-length"] == str(big.stat().st_size)
    assert "upload-expires" in head.headers and "filename" in head.headers["upload-metadata"]
    # Another process resumes from there and finishes.
    _, final = _tus_process(gateway, big, upload["id"], resume=url)
    assert final == big.stat().st_size
    files = [o for o in gateway.status(upload["id"])["objects"] if o["state"] == "added"]
    assert len(files) == 1 and files[0]["filename"] == "slide.svs"
    assert files[0]["size"] == big.stat().st_size
    assert files[0]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    stored = gateway.store.read_range(files[0]["object_key"], 0, 10**9)
    assert stored == big.read_bytes()
    assert not list(gateway.store.list(".tus/"))  # the segments are gone


def _workers(run: Running) -> list[int]:
    parent = run.stack.supervisor.children["gateway"].process.pid  # type: ignore[union-attr]
    return [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]


def _answered_by(run: Running, want: set[int]) -> set[int]:
    """The workers new connections reached (until all of `want`, or 30 s: a worker just
    started answers once its start-up is done)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while not seen >= want and time.monotonic() < deadline:
        seen.add(httpx.get(f"{run.url}/healthz").json()["pid"])  # a new connection each
    return seen


def _on_each_worker(run: Running, workers: list[int], ask, each: int = 3) -> dict[int, list]:
    """`ask(client)` on connections to each worker, `each` times per worker: a new connection
    is kept once /healthz says which worker holds it."""
    answers: dict[int, list] = {pid: [] for pid in workers}
    for _ in range(400):
        with httpx.Client(base_url=run.url, headers=run.http.headers) as client:
            pid = client.get("/healthz").json()["pid"]
            if len(answers[pid]) < each:
                answers[pid].append(ask(client))
        if all(len(a) == each for a in answers.values()):
            break
    return answers


def _tus_upload(run: Running, project: str, filename: str, size: int) -> tuple[dict, str]:
    """A new upload session of `project` and a tus upload of `size` bytes in it: (the
    session, the tus upload's URL)."""
    import base64

    upload = run.http.post(f"/api/v1/projects/{project}/uploads", json={}).json()
    meta = (f"upload {base64.b64encode(upload['id'].encode()).decode()},"
            f"filename {base64.b64encode(filename.encode()).decode()}")
    created = run.http.post("/api/v1/tus/", headers={
        "Tus-Resumable": "1.0.0", "Upload-Length": str(size), "Upload-Metadata": meta})
    return upload, urljoin(run.url, created.headers["location"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gateway_workers_share_its_port(gateway: Running):
    import re

    workers = _workers(gateway)
    assert len(workers) == 2
    assert _answered_by(gateway, set(workers)) == set(workers)
    http = gateway.http
    gateway.project("WRK")

    # One PATCH at a time per tus upload, on whichever worker it lands.
    size = 8 * 1024 * 1024
    _, location = _tus_upload(gateway, "WRK", "w.bin", size)
    tus = {"Tus-Resumable": "1.0.0"}
    patch = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
    first_bytes, asked = threading.Event(), threading.Event()

    def slowly():
        yield b"x" * (256 * 1024)
        first_bytes.set()
        asked.wait(30)  # the upload stays held until every worker has been asked
        for _ in range(size // (256 * 1024) - 1):
            yield b"x" * (256 * 1024)

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http.patch, location, content=slowly(), headers=patch, timeout=60)
        try:
            assert first_bytes.wait(10)
            time.sleep(0.3)  # the first PATCH holds the upload
            others = _on_each_worker(gateway, workers, lambda client: client.patch(
                location, content=b"y" * 10, headers=patch))
        finally:
            asked.set()
        assert slow.result().status_code == 204
    assert {(r.status_code, r.json()["title"]) for a in others.values() for r in a} == {
        (409, "Upload in progress")}
    assert all(len(a) == 3 for a in others.values())  # each worker refused
    assert http.head(location, headers=tus).headers["upload-offset"] == str(size)

    # /metrics sums every worker's figures: asked of either worker, the same totals, which
    # count what both published (a project made through each worker: one event each).
    def published(client: httpx.Client) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text
                   .splitlines() if line.startswith("faststream_published_messages_total{")
                   and 'destination="imgest.project.updated"' in line)

    def totals() -> set[float]:
        for _ in range(20):  # (until the relays are quiet)
            seen = {t for a in _on_each_worker(gateway, workers, published, 2).values()
                    for t in a}
            if len(seen) == 1:
                return seen
            time.sleep(0.5)
        return seen

    [before] = totals()
    made = iter(range(100))
    _on_each_worker(gateway, workers, lambda client: client.post(
        "/api/v1/projects", json={"id": f"WRK{next(made)}"}).raise_for_status(), 2)
    assert totals() == {before + 4}
    text = httpx.get(f"{gateway.url}/metrics").text  # and each process's own figures
    assert all(f'process_cpu_seconds_total{{pid="{pid}"}}' in text for pid in workers)

    # A worker that dies is started again; the other serves on meanwhile.
    victim, survivor = workers
    os.kill(victim, signal.SIGKILL)  # (its connections go with it: the ones below are new)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(_workers(gateway)) < 2
                                           or victim in _workers(gateway)):
        assert httpx.get(f"{gateway.url}/api/v1/me", headers=http.headers).status_code == 200
        time.sleep(0.1)
    now = _workers(gateway)
    assert len(now) == 2 and victim not in now and survivor in now
    assert _answered_by(gateway, set(now)) == set(now)
    assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL; starting it again",
                     gateway.log.read_text())


def test_a_stalled_tus_patch_is_ended_and_frees_the_upload(gateway: Running):

    http = gateway.http
    gateway.project("TUS3")
    body = os.urandom(2 * 1024 * 1024)
    upload, location = _tus_upload(gateway, "TUS3", "s.bin", len(body))
    tus = {"Tus-Resumable": "1.0.0"}
    patch = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}

    def stalls():
        yield body[:1024 * 1024]
        time.sleep(12)  # sends nothing, and stays connected (IMGEST_TUS_IDLE_SECONDS=3)

    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(lambda: httpx.patch(location, content=stalls(), timeout=30,
                                                  headers={**patch, **dict(http.headers)}))
        time.sleep(5)  # past the idle bound, well before the client gives up
        offset = http.head(location, headers=tus).headers["upload-offset"]
        resumed = http.patch(location, content=body[int(offset):],
                             headers={**patch, "Upload-Offset": offset})
        assert resumed.status_code == 204, resumed.text  # not 409 "Upload in progress"
        assert resumed.headers["upload-offset"] == str(len(body))
        with contextlib.suppress(httpx.HTTPError):
            stalled.result()
    assert "no bytes for 3 s; PATCH ended at the stored offset" in gateway.log.read_text()
    added = [o for o in gateway.status(upload["id"])["objects"] if o["state"] == "added"]
    assert [(o["filename"], o["size"]) for o in added] == [("s.bin", len(body))]


def test_a_tus_upload_terminated_during_a_patch_leaves_nothing(gateway: Running):
    """A DELETE comes while a PATCH is still running (its first bytes in, the rest on their
    way): it waits for the PATCH to end, then drops every byte, also those written after it
    came."""
    http = gateway.http
    gateway.project("TUS4")
    body = os.urandom(20 * 1024 * 1024)  # more than a segment (16 MiB)
    _, location = _tus_upload(gateway, "TUS4", "t.bin", 2 * len(body))
    tus_id = location.rstrip("/").rsplit("/", 1)[-1]
    patch = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream",
             "Upload-Offset": "0"}
    go_on = threading.Event()

    def sends_some_then_the_rest_then_lets_go():
        yield body[:1000]
        go_on.wait(30)
        yield from (body[i:i + 1024 * 1024] for i in range(1000, len(body), 1024 * 1024))
        time.sleep(0.5)
        raise ConnectionAbortedError("the client lets go")

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: httpx.patch(
            location, content=sends_some_then_the_rest_then_lets_go(), timeout=30,
            headers={**patch, **dict(http.headers)}))
        time.sleep(1)  # the PATCH holds the upload
        threading.Timer(1.0, go_on.set).start()  # the rest goes while the DELETE is on its way
        terminated = http.delete(location, headers=patch)
        go_on.set()
        with contextlib.suppress(Exception):
            running.result()
    assert terminated.status_code == 204, terminated.text
    assert http.head(location, headers=patch).status_code == 404
    assert list(gateway.store.list(f".tus/{tus_id}/")) == []


def test_a_tus_file_its_session_refuses_at_the_end_is_not_left_looking_whole(
        gateway: Running):
    """The session filled up (or was closed) while the file's bytes came: the last PATCH is
    refused with the reason, and the tus upload is gone. Kept with all its bytes counted, its
    HEAD said it was whole, and a client resuming after the refusal reported success for a
    file that was never added. A full session refuses the next tus upload at once."""
    import base64

    http = gateway.http
    gateway.project("TUSCAP", max_files_per_upload=1)
    upload = http.post("/api/v1/projects/TUSCAP/uploads", json={}).json()
    tus = {"Tus-Resumable": "1.0.0"}
    meta = (f"upload {base64.b64encode(upload['id'].encode()).decode()},"
            f"filename {base64.b64encode(b'late.bin').decode()}")
    created = http.post("/api/v1/tus/", headers={**tus, "Upload-Length": "3000",
                                                  "Upload-Metadata": meta})
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    added = http.post(f"/api/v1/uploads/{upload['id']}/files", params={"filename": "a.bin"},
                      content=os.urandom(100))
    assert added.status_code == 201 and added.json()["added"] == 1, added.text
    last = http.patch(location, content=os.urandom(3000), headers={
        **tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"})
    assert last.status_code == 409 and "max_files_per_upload" in last.json()["detail"], last.text
    assert http.head(location, headers=tus).status_code == 404
    state = http.get(f"/api/v1/uploads/{upload['id']}").json()
    assert [o["filename"] for o in state["objects"]] == ["a.bin"], state
    staged = [o.key for o in gateway.store.list(f"staging/{upload['id']}/")]
    assert len(staged) == 1 and staged[0].endswith("a.bin"), staged
    full = http.post("/api/v1/tus/", headers={**tus, "Upload-Length": "3000",
                                               "Upload-Metadata": meta})
    assert full.status_code == 409 and "max_files_per_upload" in full.json()["detail"]
    # A whole file is in its session: terminating it cannot take it back out (it said 204,
    # and the file went on to be archived).
    roomy = http.post("/api/v1/projects/TUSCAP/uploads", json={}).json()
    meta = (f"upload {base64.b64encode(roomy['id'].encode()).decode()},"
            f"filename {base64.b64encode(b'whole.bin').decode()}")
    whole = http.post("/api/v1/tus/", content=os.urandom(100), headers={
        **tus, "Upload-Length": "100", "Upload-Metadata": meta,
        "Content-Type": "application/offset+octet-stream"})
    assert whole.status_code == 201 and whole.headers["upload-offset"] == "100", whole.text
    terminated = http.delete(whole.headers["location"], headers=tus)
    assert terminated.status_code == 409 and "cancel the upload" in terminated.json()["detail"]


def test_tus_patches_at_once_are_bounded(gateway: Running):
    """Each PATCH holds a database connection of its own (its upload's lock): unbounded, 75
    stalled clients used up PostgreSQL's, and every service failed with them. Past
    IMGEST_TUS_PATCHES in a process (3 here, in each of 2): 503 with Retry-After; the others
    go on."""
    import base64
    import threading
    from concurrent.futures import ThreadPoolExecutor

    http = gateway.http
    gateway.project("TUSMANY")
    upload = http.post("/api/v1/projects/TUSMANY/uploads", json={}).json()
    tus = {"Tus-Resumable": "1.0.0"}
    locations = []
    for i in range(7):
        meta = (f"upload {base64.b64encode(upload['id'].encode()).decode()},"
                f"filename {base64.b64encode(f'{i}.bin'.encode()).decode()}")
        created = http.post("/api/v1/tus/", headers={**tus, "Upload-Length": "200",
                                                      "Upload-Metadata": meta})
        assert created.status_code == 201, created.text
        locations.append(created.headers["location"])
    all_sent = threading.Barrier(7, timeout=10)

    def stalled(location: str) -> httpx.Response:
        def body():
            yield b"x" * 100
            with contextlib.suppress(threading.BrokenBarrierError):
                all_sent.wait()  # every PATCH is in before any ends
            time.sleep(0.5)
            yield b"x" * 100

        with httpx.Client(base_url=gateway.url, headers=http.headers, timeout=30) as c:
            return c.patch(location, content=body(), headers={
                **tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"})

    with ThreadPoolExecutor(7) as pool:
        answers = list(pool.map(stalled, locations))
    busy = [a for a in answers if a.status_code == 503]
    assert busy and all(a.headers["retry-after"] == "5" for a in busy), [
        a.status_code for a in answers]
    assert all(a.status_code == 204 for a in answers if a.status_code != 503), [
        (a.status_code, a.text) for a in answers]


def test_tus_protocol_details(gateway: Running):
    import base64
    import hashlib

    http = gateway.http
    gateway.project("TUS2")
    upload = http.post("/api/v1/projects/TUS2/uploads", json={}).json()
    options = http.options("/api/v1/tus/")
    assert options.status_code == 204
    assert set(options.headers["tus-extension"].split(",")) == {
        "creation", "creation-with-upload", "termination", "expiration", "checksum"}
    meta = (f"upload {base64.b64encode(upload['id'].encode()).decode()},"
            f"filename {base64.b64encode(b'a.bin').decode()}")
    tus = {"Tus-Resumable": "1.0.0"}
    body = os.urandom(3000)
    # creation-with-upload: the first bytes come with the POST.
    created = http.post("/api/v1/tus/", content=body[:1000], headers={
        **tus, "Upload-Length": "3000", "Upload-Metadata": meta,
        "Content-Type": "application/offset+octet-stream"})
    assert created.status_code == 201 and created.headers["upload-offset"] == "1000"
    assert "upload-expires" in created.headers
    location = created.headers["location"]
    patch = {**tus, "Content-Type": "application/offset+octet-stream"}
    # A wrong offset is a conflict; a wrong checksum keeps nothing (460).
    assert http.patch(location, content=body[1000:2000],
                      headers={**patch, "Upload-Offset": "0"}).status_code == 409
    wrong = http.patch(location, content=body[1000:2000], headers={
        **patch, "Upload-Offset": "1000",
        "Upload-Checksum": "sha1 " + base64.b64encode(hashlib.sha1(b"x").digest()).decode()})
    assert wrong.status_code == 460
    assert http.head(location, headers=tus).headers["upload-offset"] == "1000"
    right = http.patch(location, content=body[1000:], headers={
        **patch, "Upload-Offset": "1000",
        "Upload-Checksum": "sha256 " + base64.b64encode(
            hashlib.sha256(body[1000:]).digest()).decode()})
    assert right.status_code == 204 and right.headers["upload-offset"] == "3000"
    # Whole: the last PATCH repeated (a client that missed the answer) is told the same; bytes
    # past the end are refused; the upload stays as it is.
    again = http.patch(location, content=b"", headers={**patch, "Upload-Offset": "3000"})
    assert again.status_code == 204 and again.headers["upload-offset"] == "3000"
    past = http.patch(location, content=b"x", headers={**patch, "Upload-Offset": "3000"})
    assert past.status_code == 413 and past.headers["tus-resumable"] == "1.0.0"
    assert http.head(location, headers=tus).headers["upload-offset"] == "3000"
    # Another tus version: 412 naming the one spoken (tus 1.0); none: 422 (a required
    # header); too long for the server: 413. Refused before any byte. Every answer says
    # Tus-Resumable, the errors of authentication and of unknown uploads too.
    for version, status in (({}, 422), ({"Tus-Resumable": "0.2.2"}, 412)):
        old = http.patch(location, content=b"x", headers={
            **version, "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": "3000"})
        assert old.status_code == status, old.text
    assert old.headers["tus-version"] == "1.0.0"
    huge = http.post("/api/v1/tus/", headers={**tus, "Upload-Length": str(2**60),
                                               "Upload-Metadata": meta})
    assert huge.status_code == 413 and huge.headers["tus-resumable"] == "1.0.0"
    unknown = http.delete("/api/v1/tus/" + "0" * 32, headers=tus)
    assert unknown.status_code == 404 and unknown.headers["tus-resumable"] == "1.0.0"
    assert httpx.head(gateway.url + location, headers=tus).headers["tus-resumable"] == "1.0.0"
    assert http.post("/api/v1/tus/", headers={**tus, "Upload-Length": "10", "Upload-Metadata":
                                               "filename " + base64.b64encode(b"x").decode()}
                     ).status_code == 404
    # On the local store the file is written where it lies: if those bytes are gone (a store
    # restored from an older backup), resuming says so, and never fills the gap with zeros.
    lost = http.post("/api/v1/tus/", content=body[:1000], headers={
        **tus, "Upload-Length": "3000", "Upload-Metadata": meta,
        "Content-Type": "application/offset+octet-stream"})
    tus_id = lost.headers["location"].rstrip("/").rsplit("/", 1)[-1]
    gateway.store.delete(f".tus/{tus_id}/data")
    gone = http.patch(lost.headers["location"], content=body[1000:],
                      headers={**patch, "Upload-Offset": "1000"})
    assert gone.status_code == 410 and "create the upload again" in gone.json()["detail"]
    assert http.head(lost.headers["location"], headers=tus).status_code == 404
    # Termination: the bytes go, the upload is no more.
    other = http.post("/api/v1/tus/", headers={**tus, "Upload-Length": "10",
                                               "Upload-Metadata": meta})
    # (through X-HTTP-Method-Override, as clients that can only POST send it)
    assert http.post(other.headers["location"], headers={
        **tus, "X-HTTP-Method-Override": "DELETE"}).status_code == 204
    assert http.head(other.headers["location"], headers=tus).status_code == 404
    # Someone else's tus upload is not theirs to read or write.
    assert as_user(gateway).head(location, headers=tus).status_code == 401


def test_file_states_only_move_forward_whatever_order_events_come_in(gateway: Running):
    """The gateway's view of each file merges events of different topics, which arrive in any
    order: a state moves forward only (terminal states share a rank, unknown ones rank
    lowest), details missing are filled in, and a late failure does not mark a placed file."""
    cases = [  # (the state the file is in, the state an event tells, the state after)
        ("staged", "validated", "validated"), ("staged", "rejected", "rejected"),
        ("validated", "archived", "archived"), ("validated", "prearchived", "prearchived"),
        ("validated", "failed", "failed"), ("staged", "staged", "staged"),
        ("validated", "staged", "validated"), ("archived", "validated", "archived"),
        ("archived", "staged", "archived"), ("rejected", "validated", "rejected"),
        ("prearchived", "archived", "archived"), ("archived", "prearchived", "prearchived"),
        ("failed", "archived", "archived"), ("staged", "bogus", "staged"),
        ("bogus", "staged", "staged")]
    db = Database(gateway.env["IMGEST_DATABASE_URL"])
    upload = f"states-{os.getpid()}"

    async def track(*notes: FileNote) -> None:
        async with db.session() as session:
            await _track_files(session, list(notes))

    async def run() -> None:
        try:
            for i, (current, told, _) in enumerate(cases):
                await track(FileNote(upload, f"{upload}-{i}", current, path=f"f{i}"))
                await track(FileNote(upload, f"{upload}-{i}", told, reason={"code": told}))
            # Details arrive late and fill in; a reason, once there, stays.
            await track(FileNote(upload, f"{upload}-d", "staged"))
            await track(FileNote(upload, f"{upload}-d", "archived", object_key="k", path="a.dcm",
                                 kind="dicom", session_uri="/data/archive/x"))
            await track(FileNote(upload, f"{upload}-d", "failed", reason={"code": "late"}))
            # Two events of one file in one batch: in their order.
            await track(FileNote(upload, f"{upload}-b", "staged", path="b"),
                        FileNote(upload, f"{upload}-b", "validated"))
        finally:
            await db.close()

    asyncio.run(run())
    rows = {r["file_id"]: r for r in gateway.query(
        "select file_id, state, path, object_key, kind, session, reason::text as reason "
        "from gateway.upload_file where upload_id = $1", upload)}
    assert [rows[f"{upload}-{i}"]["state"] for i in range(len(cases))] == [
        after for _, _, after in cases]
    assert rows[f"{upload}-0"]["path"] == "f0"  # not blanked by an event that lacks it
    assert rows[f"{upload}-0"]["reason"] == '{"code": "validated"}'
    assert rows[f"{upload}-7"]["reason"] == "null"  # not advanced: its reason not taken
    d = rows[f"{upload}-d"]
    assert (d["state"], d["object_key"], d["path"], d["kind"], d["session"], d["reason"]) == (
        "archived", "k", "a.dcm", "dicom", "/data/archive/x", "null")
    assert rows[f"{upload}-b"]["state"] == "validated"


def test_a_worker_forgets_callers_at_its_own_identity_commits(gateway: Running):
    """What `Callers.forget_at_own_commits` counts as a change, on the gateway's own tables:
    what the triggers tell of, no more (a new login session, a rolled-back change)."""
    from imgest_gateway.auth import Callers
    from imgest_gateway.models import LoginSession, User
    from sqlalchemy import delete, update

    callers = Callers()
    callers.listen_state(True)  # as if listening: only this process's own commits act here
    callers.forget_at_own_commits()
    db = Database(gateway.env["IMGEST_DATABASE_URL"])
    name = f"forget-{os.getpid()}"

    def keep() -> None:
        callers.keep("token k", "row", callers.generation)

    async def run() -> list[bool]:
        seen = []
        try:
            now = datetime.now(UTC)
            keep()
            async with db.session() as session:  # a new user and login session: nothing
                session.add(User(username=name, created_at=now))
                session.add(LoginSession(id_hash=name, username=name, created_at=now,
                                         expires_at=now))
            seen.append(callers.get("token k") is not None)
            async with db.session() as session:  # an ORM change of a user: forgotten
                user = await session.get(User, name)
                assert user is not None
                user.email = "f@example.org"
                session.add(user)
            seen.append(callers.get("token k") is not None)
            keep()
            with contextlib.suppress(RuntimeError):
                async with db.session() as session:  # rolled back: nothing
                    await session.execute(update(User).where(User.username == name)
                                          .values(active=False))
                    raise RuntimeError("changed my mind")
            seen.append(callers.get("token k") is not None)
            async with db.session() as session:  # a delete statement: forgotten
                await session.execute(delete(LoginSession).where(LoginSession.id_hash == name))
            seen.append(callers.get("token k") is not None)
        finally:
            await db.close()
        return seen

    assert asyncio.run(run()) == [True, False, True, False]
