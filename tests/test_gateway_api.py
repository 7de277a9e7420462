"""The gateway's ways in, through real HTTP and real clients: identity and permissions (the
`imgest` CLI, curl-style Basic auth, tokens). One stack, local store."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import Infra
from .pipeline import Running, started_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def gateway(request, infra: Infra, smtp_server, tmp_path_factory):
    with started_stack(request, infra, smtp_server, tmp_path_factory, "local") as run:
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
