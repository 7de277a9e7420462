"""Reading the archive through the gateway, which asks the importer's catalogue and streams the
bytes from its own store: listings at each level (JSON and XNAT's), the files' metadata, one
file's bytes (whole and in ranges), a session as a zip, a prearchive entry, and the refusals.
Runs once with the local-directory store and once with S3: the bytes come from either.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import httpx
import pydicom
import pytest

from .pipeline import Running, dicom_bytes, jpeg_with_exif, study_zip

pytestmark = pytest.mark.timeout(600)

PASSWORD = "viewer password 1"


@dataclass
class Archive:
    """What the module uploaded, and who reads it."""

    study: dict[str, dict[str, bytes]]  # scan → file name → the bytes sent
    photo: bytes
    entry: str  # the prearchive entry's address, /data/prearchive/projects/CATPRE/TS/LABEL
    entry_files: dict[str, bytes]
    unassigned: str  # an entry in Unassigned
    viewer: httpx.Client  # a member of CAT and CATPRE
    viewer_token: str
    stranger: httpx.Client  # no role anywhere


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def client(run: Running, token: str | None) -> httpx.Client:
    return httpx.Client(base_url=run.url, timeout=30,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


def user(run: Running, username: str, *projects: str) -> str:
    """A user with a password, a member of the projects; their token."""
    made = run.http.post("/api/v1/users", json={"username": username, "password": PASSWORD})
    assert made.status_code == 201, made.text
    for project in projects:
        assert run.http.put(f"/api/v1/projects/{project}/members/{username}",
                            json={"role": "member"}).status_code == 200
    return run.http.post(f"/api/v1/users/{username}/tokens", json={}).json()["token"]


def one_dicom(pydicom_file, patient: str) -> bytes:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), "1.2.3.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = ds.PatientName = patient
    return dicom_bytes(ds)


@pytest.fixture(scope="module")
def archive(running: Running, pydicom_file) -> Archive:
    running.project("CAT", quarantine=True)
    running.project("CATPRE", auto_archive="manual")
    body, _ = study_zip(pydicom_file("CT_small.dcm"), instances=4, series=2)
    study: dict[str, dict[str, bytes]] = {}
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        for member in zf.namelist():
            if member.endswith(".dcm") and not member.startswith("__MACOSX"):
                data = zf.read(member)
                ds = pydicom.dcmread(io.BytesIO(data))
                study.setdefault(str(ds.SeriesNumber), {})[f"{ds.SOPInstanceUID}.dcm"] = data
    photo = jpeg_with_exif()
    entry_body = one_dicom(pydicom_file, "PRE1")
    uploads = [running.upload("study.zip", body, project="CAT", subject="SUB1",
                              session="SESS1")["id"],
               running.upload("photo.jpg", photo, project="CAT", subject="SUB1",
                              session="PHOTOS1")["id"],
               running.upload("pre.dcm", entry_body, project="CATPRE", subject="SUB2",
                              session="PRE1")["id"],
               running.upload("lost.dcm", one_dicom(pydicom_file, "LOST1"), project=None)["id"]]
    states = [running.wait(u) for u in uploads]
    assert [s["state"] for s in states] == ["archived", "archived", "prearchived",
                                            "prearchived"], states
    entry, unassigned = (s["sessions"][0]["uri"] for s in states[2:])
    entry_sop = pydicom.dcmread(io.BytesIO(entry_body)).SOPInstanceUID
    viewer_token = user(running, "viewer", "CAT", "CATPRE")
    return Archive(study, photo, entry, {f"{entry_sop}.dcm": entry_body}, unassigned,
                   client(running, viewer_token), viewer_token,
                   client(running, user(running, "stranger")))


SESSION = "/api/v1/projects/CAT/subjects/SUB1/sessions/SESS1"
XNAT_SESSION = "/data/projects/CAT/subjects/SUB1/experiments/SESS1"
XNAT_ARCHIVE_SESSION = "/data/archive/projects/CAT/subjects/SUB1/experiments/SESS1"  # (also XNAT's)


def rows(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    result = response.json()["ResultSet"]
    assert result["totalRecords"] == str(len(result["Result"]))
    return result["Result"]


# --- listings ------------------------------------------------------------------------------------


def test_listings_at_each_level_json_and_xnat(running: Running, archive: Archive):
    http = archive.viewer
    subjects = http.get("/api/v1/projects/CAT/subjects")
    assert subjects.status_code == 200, subjects.text
    assert [(s["subject"], s["sessions"]) for s in subjects.json()] == [("SUB1", 2)]
    for prefix in ("/data", "/data/archive"):  # XNAT takes both
        assert [(r["ID"], r["label"], r["URI"]) for r in rows(http.get(
            f"{prefix}/projects/CAT/subjects", params={"format": "json"}))] == [
            ("CAT.SUB1", "SUB1", "/data/projects/CAT/subjects/SUB1")]  # (IDs: site-unique)
    experiments = rows(http.get("/data/projects/CAT/experiments"))
    assert {(r["label"], r["subject_label"], r["xsiType"]) for r in experiments} == {
        ("SESS1", "SUB1", "xnat:ctSessionData"), ("PHOTOS1", "SUB1", "xnat:imageSessionData")}
    assert rows(http.get("/data/projects/CAT/subjects/SUB1/experiments")) == experiments
    assert rows(http.get("/data/projects/CAT/subjects/NOBODY/experiments")) == []
    # Only archived sessions are experiments: the prearchive entry is not one.
    assert rows(http.get("/data/projects/CATPRE/experiments")) == []

    scans = rows(http.get(f"{XNAT_SESSION}/scans"))
    assert [(r["ID"], r["modality"], r["xsiType"], r["file_count"]) for r in scans] == [
        ("1", "CT", "xnat:ctScanData", "2"), ("2", "CT", "xnat:ctScanData", "2")]
    assert [r["URI"] for r in scans] == [f"{XNAT_SESSION}/scans/1", f"{XNAT_SESSION}/scans/2"]
    [resource] = rows(http.get(f"{XNAT_SESSION}/scans/1/resources"))
    sent = archive.study["1"]
    assert (resource["label"], resource["file_count"], resource["file_size"]) == (
        "DICOM", "2", str(sum(len(b) for b in sent.values())))
    files = rows(http.get(f"{XNAT_SESSION}/scans/1/resources/DICOM/files"))
    assert {r["Name"]: (r["Size"], r["sha256"]) for r in files} == {
        name: (str(len(data)), sha(data)) for name, data in sent.items()}
    assert all(r["URI"] == f"{XNAT_SESSION}/scans/1/resources/DICOM/files/{r['Name']}"
               for r in files)
    # One object, as XNAT's format=json sends it: items with data_fields, meta and children.
    [item] = http.get(XNAT_SESSION, params={"format": "json"}).json()["items"]
    assert item["meta"]["xsi:type"] == "xnat:ctSessionData"
    assert {k: item["data_fields"][k] for k in ("ID", "label", "project", "subject_ID")} == {
        "ID": "CAT.SESS1", "label": "SESS1", "project": "CAT", "subject_ID": "CAT.SUB1"}
    [scan_children] = item["children"]
    assert scan_children["field"] == "scans/scan"
    assert [c["data_fields"]["ID"] for c in scan_children["items"]] == ["1", "2"]
    [scan_item] = http.get(f"{XNAT_SESSION}/scans/2").json()["items"]
    assert (scan_item["meta"]["xsi:type"], scan_item["data_fields"]["ID"]) == (
        "xnat:ctScanData", "2")
    for url in ("/data/projects/CAT/subjects/SUB1", "/data/subjects/SUB1",
                "/data/subjects/CAT.SUB1", "/data/projects/CAT/subjects/CAT.SUB1"):
        [subject_item] = http.get(url).json()["items"]
        assert subject_item["data_fields"] == {"ID": "CAT.SUB1", "label": "SUB1",
                                               "project": "CAT"}, url
    [project_item] = http.get("/data/projects/CAT").json()["items"]
    assert (project_item["meta"]["xsi:type"], project_item["data_fields"]["ID"]) == (
        "xnat:projectData", "CAT")
    assert "CAT" in [r["ID"] for r in rows(http.get("/data/projects"))]
    every = rows(http.get(f"{XNAT_SESSION}/scans/ALL/files"))
    assert sorted(r["Name"] for r in every) == sorted(
        name for scan in archive.study.values() for name in scan)


def test_a_session_shows_its_scans_files_metadata_and_quarantine(running: Running,
                                                                 archive: Archive):
    response = archive.viewer.get(SESSION)
    assert response.status_code == 200, response.text
    session = response.json()
    assert (session["uri"], session["quarantined"], session["modalities"]) == (
        "/data/archive/projects/CAT/subjects/SUB1/experiments/SESS1", True, ["CT"])
    assert [c["scan"] for c in session["scans"]] == ["1", "2"]
    for scan in session["scans"]:
        sent = archive.study[scan["scan"]]
        assert {f["name"]: f["sha256"] for f in scan["files"]} == {
            n: sha(b) for n, b in sent.items()}
        for f in scan["files"]:
            assert f["resource"] == "DICOM" and f["metadata"]["Modality"] == "CT"
            assert f["metadata"]["SOPInstanceUID"] == f["sop_instance_uid"]
            assert f["url"] == f"{SESSION}/scans/{scan['scan']}/files/{f['name']}"
    photos = archive.viewer.get("/api/v1/projects/CAT/subjects/SUB1/sessions/PHOTOS1").json()
    [scan] = photos["scans"]
    [photo] = scan["files"]
    assert (scan["scan"], photo["name"], photo["resource"]) == ("photo", "photo.jpg", "PHOTO")
    assert photo["metadata"]["Make"] == "imgest-camera"
    assert photo["metadata"]["DateTimeOriginal"] == "2026:11:26 10:00:00"


# --- bytes ---------------------------------------------------------------------------------------


def test_one_file_downloads_as_it_was_sent_whole_and_in_ranges(running: Running,
                                                               archive: Archive, tmp_path):
    name, data = next(iter(archive.study["2"].items()))
    url = f"{SESSION}/scans/2/files/{name}"
    got = archive.viewer.get(url)
    assert got.status_code == 200, got.text
    assert sha(got.content) == sha(data)
    assert got.headers["content-type"] == "application/dicom"
    assert got.headers["content-length"] == str(len(data))
    assert got.headers["content-disposition"].startswith(f'attachment; filename="{name}"')
    assert got.headers["etag"] == f'"{sha(data)}"'
    # Byte ranges: a slice, the last bytes, a stale If-Range (the whole file), past the end.
    part = archive.viewer.get(url, headers={"Range": "bytes=128-131"})
    assert (part.status_code, part.content) == (206, data[128:132])
    assert part.headers["content-range"] == f"bytes 128-131/{len(data)}"
    tail = archive.viewer.get(url, headers={"Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, data[-10:])
    stale = archive.viewer.get(url, headers={"Range": "bytes=0-1", "If-Range": '"other"'})
    assert (stale.status_code, len(stale.content)) == (200, len(data))
    past = archive.viewer.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    # XNAT's path to the same file, with its client's Basic auth (a token as the password).
    xnat = httpx.get(f"{running.url}{XNAT_SESSION}/scans/2/resources/DICOM/files/{name}",
                     auth=("viewer", archive.viewer_token))
    assert xnat.status_code == 200 and xnat.content == data
    photo = archive.viewer.get("/data/archive/projects/CAT/subjects/SUB1/experiments/PHOTOS1"
                               "/scans/photo/resources/PHOTO/files/photo.jpg")
    assert (photo.status_code, photo.headers["content-type"]) == (200, "image/jpeg")
    assert photo.content == archive.photo
    # curl, as a user types it.
    out = tmp_path / "photo.jpg"
    photos = f"{running.url}/api/v1/projects/CAT/subjects/SUB1/sessions/PHOTOS1"
    curl = subprocess.run(["curl", "-sS", "-f", "-o", str(out), "-H",
                           f"Authorization: Bearer {archive.viewer_token}",
                           f"{photos}/scans/photo/files/photo.jpg"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert curl.returncode == 0, curl.stderr
    assert sha(out.read_bytes()) == sha(archive.photo)


def zip_members(response: httpx.Response) -> dict[str, bytes]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        assert zf.testzip() is None
        return {name: zf.read(name) for name in zf.namelist()}


def test_a_session_downloads_as_a_zip_in_xnats_layout(running: Running, archive: Archive):
    expected = {f"SESS1/scans/{scan}/resources/DICOM/files/{name}": data
                for scan, files in archive.study.items() for name, data in files.items()}
    whole = archive.viewer.get(f"{SESSION}/download")
    assert whole.headers["content-disposition"].startswith('attachment; filename="SESS1.zip"')
    assert zip_members(whole) == expected
    assert zip_members(archive.viewer.get(XNAT_SESSION, params={"format": "zip"})) == expected
    assert zip_members(archive.viewer.get(f"{XNAT_ARCHIVE_SESSION}/scans/ALL/files",
                                          params={"format": "zip"})) == expected
    one_scan = archive.viewer.get(f"{XNAT_SESSION}/scans/1/resources/DICOM/files",
                                  params={"format": "zip"})
    assert zip_members(one_scan) == {k: v for k, v in expected.items() if "/scans/1/" in k}
    # Without format=zip, the experiment as XNAT's items; a format imgest does not serve: 400.
    assert "items" in archive.viewer.get(XNAT_SESSION).json()
    assert archive.viewer.get(XNAT_SESSION, params={"format": "xml"}).status_code == 400


def test_a_prearchive_entry_shows_its_details_and_downloads_as_a_zip(running: Running,
                                                                     archive: Archive):
    project, timestamp, label = archive.entry.removeprefix(
        "/data/prearchive/projects/").split("/")
    base = f"/api/v1/projects/{project}/prearchive/{timestamp}/{label}"
    response = archive.viewer.get(base)
    assert response.status_code == 200, response.text
    entry = response.json()
    assert (entry["uri"], entry["state"], entry["timestamp"], entry["subject"]) == (
        archive.entry, "READY", timestamp, "SUB2")
    [scan] = entry["scans"]
    [f] = scan["files"]
    assert f["metadata"]["PatientID"] == "PRE1" and f["name"] in archive.entry_files
    expected = {f"{label}/scans/{scan['scan']}/resources/DICOM/files/{name}": data
                for name, data in archive.entry_files.items()}
    assert zip_members(archive.viewer.get(f"{base}/download")) == expected
    assert zip_members(archive.viewer.get(archive.entry, params={"format": "zip"})) == expected
    [row] = rows(archive.viewer.get(archive.entry))
    assert (row["url"], row["status"], row["files"]) == (
        archive.entry.removeprefix("/data"), "READY", "1")  # XNAT's url: no /data
    # XNAT's paths into the entry: scans, resources, files, bytes, a scan as a zip.
    xnat_entry = archive.entry
    [pre_scan] = rows(archive.viewer.get(f"{xnat_entry}/scans"))
    assert (pre_scan["ID"], pre_scan["URI"]) == (scan["scan"], f"{xnat_entry}/scans/{scan['scan']}")
    assert "xsiType" not in pre_scan  # (XNAT's client makes its own prearchive scan objects)
    [resource] = rows(archive.viewer.get(f"{pre_scan['URI']}/resources"))
    assert (resource["label"], resource["file_count"]) == ("DICOM", "1")
    [listed] = rows(archive.viewer.get(f"{resource['URI']}/files"))
    assert listed["Name"] == f["name"] and listed["sha256"] == f["sha256"]
    assert archive.viewer.get(listed["URI"]).content == archive.entry_files[f["name"]]
    assert zip_members(archive.viewer.get(pre_scan["URI"], params={"format": "zip"})) == expected
    assert archive.viewer.get(f"{xnat_entry}/scans/99/resources").status_code == 404
    assert archive.stranger.get(f"{xnat_entry}/scans").status_code == 403
    # Not in the archive: its address there is no session.
    assert archive.viewer.get(f"/api/v1/projects/{project}/subjects/SUB2/sessions/"
                              f"{label}").status_code == 404


# --- refusals ------------------------------------------------------------------------------------


def test_who_may_read_what_and_clean_refusals(running: Running, archive: Archive):
    anonymous = client(running, None)
    file_url = f"{SESSION}/scans/1/files/{next(iter(archive.study['1']))}"
    for url in (SESSION, file_url, f"{SESSION}/download", "/api/v1/projects/CAT/subjects"):
        no = anonymous.get(url)
        assert no.status_code == 401 and no.headers["content-type"] == "application/problem+json"
        assert archive.stranger.get(url).status_code == 403
    for url in (f"{XNAT_SESSION}/scans", "/data/projects/CAT/subjects"):
        no = anonymous.get(url)
        assert no.status_code == 401 and no.headers["content-type"].startswith("text/plain")
        forbidden = archive.stranger.get(url)
        assert forbidden.status_code == 403 and forbidden.headers["content-type"].startswith(
            "text/plain")
    # Unknown session, scan, file, resource: 404, problem+json or XNAT's plain text.
    for url in ("/api/v1/projects/CAT/subjects/SUB1/sessions/NOPE",
                f"{SESSION}/scans/9/files/x",
                f"{SESSION}/scans/1/files/nope.dcm",
                "/api/v1/projects/CATPRE/prearchive/20200101_000000000/NOPE"):
        missing = archive.viewer.get(url)
        assert missing.status_code == 404, (url, missing.text)
        assert missing.headers["content-type"] == "application/problem+json"
    for url in (f"{XNAT_SESSION}/scans/9/resources",
                f"{XNAT_SESSION}/scans/1/resources/PHOTO/files",
                f"{XNAT_SESSION}/scans/1/resources/DICOM/files/nope.dcm",
                "/data/projects/CAT/subjects/SUB1/experiments/NOPE/scans",
                f"{XNAT_SESSION}/scans/9", "/data/projects/CAT/subjects/NOBODY",
                "/data/subjects/NOBODY"):
        missing = archive.viewer.get(url)
        assert missing.status_code == 404, (url, missing.text)
        assert missing.headers["content-type"].startswith("text/plain")
    # Names no session, scan or file can have: a clean 4xx, never a 500, nothing outside.
    for url, status in [
        ("/api/v1/projects/CAT/subjects/%2E%2E/sessions/SESS1", 422),
        (f"{SESSION}/scans/..%2F..%2F2/files/x", 404),  # (a slash ends the scan's segment)
        (f"{SESSION}/scans/1/files/..%2F..%2F..%2F2%2Fresources%2FDICOM", 404),
        (f"{SESSION}/scans/1/files/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd", 404),
        (f"{SESSION}/scans/1/files/a%00b", 400),  # (refused before any route: http.head_fault)
        ("/data/projects/CAT/subjects/%2E%2E/experiments", 400),
        (f"{XNAT_SESSION}/scans/1/resources/DICOM/files/%2E%2E%2F%2E%2E%2Fx", 404),
        ("/data/projects/CAT/subjects", 200), ("/data/projects/CAT/subjects?format=xml", 400),
    ]:
        response = archive.viewer.get(url)
        assert response.status_code == status, (url, response.text)
    # Unassigned is for administrators only.
    project, timestamp, label = archive.unassigned.removeprefix(
        "/data/prearchive/projects/").split("/")
    assert project == "Unassigned"
    base = f"/api/v1/projects/Unassigned/prearchive/{timestamp}/{label}"
    assert archive.viewer.get(base).status_code == 403
    assert archive.viewer.get(f"{base}/download").status_code == 403
    assert archive.viewer.get(archive.unassigned).status_code == 403
    assert running.http.get(base).json()["uri"] == archive.unassigned
    assert running.http.get(archive.unassigned, params={"format": "zip"}).status_code == 200


def test_xnats_python_client_browses_and_downloads(running: Running, archive: Archive,
                                                   tmp_path):
    """xnatpy as XNAT's users use it: the object model it builds from imgest's schema, from the
    project down to one file's bytes, and a session as a zip."""
    import xnat

    with xnat.connect(running.url, user="viewer", password=PASSWORD) as session:
        subject = session.projects["CAT"].subjects["SUB1"]
        assert {e.label: type(e).__name__ for e in subject.experiments.values()} == {
            "SESS1": "CtSessionData", "PHOTOS1": "ImageSessionData"}
        study = subject.experiments["SESS1"]
        assert study.subject.label == "SUB1" and study.modality == "CT"
        assert sorted(s.id for s in study.scans.values()) == ["1", "2"]
        # Every scan's resource is "DICOM": the client keeps resources by their IDs, so each
        # must have its own (the README's loop got scan 1's files for scan 2).
        for scan in study.scans.values():
            # The type XNAT's scripts pick scans by: the series' description.
            assert (scan.type, scan.series_description) == (f"Axial {scan.id} mm",) * 2
            resource = scan.resources["DICOM"]
            assert sorted(resource.files.keys()) == sorted(archive.study[scan.id]), scan.id
            resource.download(tmp_path / f"scan-{scan.id}.zip", verbose=False)
            with zipfile.ZipFile(tmp_path / f"scan-{scan.id}.zip") as zf:
                assert sorted(PurePosixPath(n).name for n in zf.namelist()) == sorted(
                    archive.study[scan.id]), scan.id
        files = study.scans["1"].resources["DICOM"].files
        assert sorted(files.keys()) == sorted(archive.study["1"])
        name = min(archive.study["1"])
        files[name].download(tmp_path / name, verbose=False)
        assert (tmp_path / name).read_bytes() == archive.study["1"][name]
        study.download(tmp_path / "session.zip", verbose=False)
    with zipfile.ZipFile(tmp_path / "session.zip") as zf:
        assert len(zf.namelist()) == sum(len(files) for files in archive.study.values())


def test_the_same_labels_in_two_projects_stay_apart_in_xnats_client(running: Running,
                                                                     archive: Archive,
                                                                     pydicom_file):
    """XNAT's subject and session IDs are unique across the site, and xnatpy keeps objects by
    them: with labels for IDs, CAT's SUB1/SESS1 was answered by CAT2's (its address too)."""
    import xnat

    running.project("CAT2")
    body, _ = study_zip(pydicom_file("CT_small.dcm"), instances=2, series=1)
    upload = running.upload("other.zip", body, project="CAT2", subject="SUB1", session="SESS1")
    assert running.wait(upload["id"])["state"] == "archived"
    user(running, "both", "CAT", "CAT2")
    with xnat.connect(running.url, user="both", password=PASSWORD) as session:
        ours, theirs = (session.projects[p].subjects["SUB1"] for p in ("CAT", "CAT2"))
        assert (ours.id, theirs.id) == ("CAT.SUB1", "CAT2.SUB1") and ours is not theirs
        mine, other = ours.experiments["SESS1"], theirs.experiments["SESS1"]
        assert (mine.id, mine.project, other.id, other.project) == (
            "CAT.SESS1", "CAT", "CAT2.SESS1", "CAT2")
        assert "/projects/CAT/" in mine.uri and "/projects/CAT2/" in other.uri
        assert sorted(s.id for s in mine.scans.values()) == ["1", "2"]
        [scan] = other.scans.values()
        names = set(scan.resources["DICOM"].files.keys())
        assert len(names) == 2 and not names & {n for f in archive.study.values() for n in f}
        # A path by ID reads as by label; another project's ID is no subject of this one.
        assert session.get(f"/data/subjects/{ours.id}").status_code == 200
    stranger = running.http.get("/data/projects/CAT/subjects/CAT2.SUB1")
    assert stranger.status_code in (400, 404), stranger.text


# --- without a stack ----------------------------------------------------------------------------


async def test_without_the_importer_the_catalogue_is_unavailable():
    """Nothing listens where the importer should be: 503, as problem+json or XNAT's text, with
    Retry-After (the gateway's real router and error handlers; only the caller is given)."""
    from fastapi import FastAPI
    from imgest_gateway.auth import authenticated
    from imgest_gateway.catalogue_api import catalogue_router
    from imgest_gateway.identity import Caller
    from imgest_gateway.settings import Settings
    from imgest_gateway.xnat_api import plain_http_errors
    from imgest_runtime.service import add_problem_handlers

    from .conftest import free_port

    app = FastAPI()
    add_problem_handlers(app)
    app.include_router(catalogue_router(None, Settings(  # type: ignore[arg-type]
        importer_url=f"http://127.0.0.1:{free_port()}")))
    plain_http_errors(app)
    app.dependency_overrides[authenticated] = lambda: Caller("admin", None, True, {})
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        down = await http.get(SESSION)
        assert down.status_code == 503 and down.headers["retry-after"]
        assert down.headers["content-type"] == "application/problem+json"
        assert "does not answer" in down.json()["detail"]
        xnat = await http.get("/data/projects/CAT/subjects")
        assert xnat.status_code == 503 and xnat.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(("header", "size", "wanted"), [
    (None, 10, None), ("bytes=2-5", 10, (2, 5)), ("bytes=5-", 10, (5, 9)),
    ("bytes=5-99", 10, (5, 9)), ("bytes=-3", 10, (7, 9)), ("bytes=-30", 10, (0, 9)),
    # Served whole: a malformed range, several ranges, other units.
    ("bytes=5-2", 10, None), ("bytes=0-1,4-5", 10, None), ("items=0-1", 10, None),
    # Past the end: 416.
    ("bytes=10-", 10, ValueError), ("bytes=-0", 10, ValueError), ("bytes=0-", 0, ValueError),
])
def test_byte_ranges(header: str | None, size: int, wanted: Any):
    from imgest_gateway.catalogue_api import requested_range

    if wanted is ValueError:
        with pytest.raises(ValueError):
            requested_range(header, size)
    else:
        assert requested_range(header, size) == wanted
