"""What the cross-service tests share: a running stack and how to talk to it, and test data."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
from imgest_runtime.settings import RuntimeSettings
from imgest_runtime.store import ObjectStore, open_store
from pydicom.uid import generate_uid

from imgest.stack import SERVICES, Stack, port_env

from .conftest import Broker, Infra, Mailbox, free_port


class Running:
    """A started stack and what the tests need to talk to it."""

    def __init__(self, stack: Stack, env: dict[str, str], mailbox: Mailbox, log: Path,
                 broker: Broker | None):
        self.stack, self.env, self.mailbox, self.log = stack, env, mailbox, log
        self.broker = broker
        self.url = f"http://127.0.0.1:{env['IMGEST_GATEWAY_PORT']}"
        self._e2e_project = ""
        # The administrator's token, as the first start wrote it for scripts.
        self.token = (stack.data_dir / "admin.token").read_text().strip()
        self.http = httpx.Client(base_url=self.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.token}"})
        self.store: ObjectStore = open_store(RuntimeSettings(
            **{k[len("IMGEST_"):].lower(): v for k, v in env.items()
               if k.startswith("IMGEST_") and k[len("IMGEST_"):].lower()
               in RuntimeSettings.model_fields}))

    def upload(self, filename: str, body: bytes, **params: str | None) -> dict[str, Any]:
        """One file as its own upload, into project E2E unless `project` says otherwise (an
        upload without a project goes to Unassigned, held in the prearchive)."""
        if "project" not in params:
            if not self._e2e_project:
                self._e2e_project = self.project("E2E")
            params["project"] = self._e2e_project
        elif params["project"] is None:
            del params["project"]
        response = self.http.post("/api/v1/uploads", params={"filename": filename, **params},
                                  content=body)
        assert response.status_code == 201, response.text
        return response.json()

    def project(self, project_id: str, **settings: Any) -> str:
        """Makes sure the project exists (created by the administrator) with these settings."""
        created = self.http.post("/api/v1/projects", json={"id": project_id,
                                                          "settings": settings})
        if created.status_code == 409:
            changed = self.http.patch(f"/api/v1/projects/{project_id}",
                                      json={"settings": settings})
            assert changed.status_code == 200, changed.text
        else:
            assert created.status_code == 201, created.text
        return project_id

    def wait(self, upload_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.status(upload_id) or state
            if not state:
                continue
            # The status view is eventually consistent: per-file details (kind, path) and what
            # became of each object (unpacked, staged) come from other topics than the
            # completion and may land a moment after it.
            if state["state"] not in ("processing", "cancelling") and (
                    state["state"] == "cancelled"  # its files may never be looked at
                    or (all(f["kind"] and f["path"] for f in state["files"])
                        and all(o["state"] != "stored" for o in state["objects"]))):
                return state
            time.sleep(0.1)
        raise AssertionError(f"upload {upload_id} still processing after {timeout}s:\n"
                             f"{state}\n--- service logs ---\n{self.tail()}")

    def status(self, upload_id: str) -> dict[str, Any] | None:
        """The upload's status, or None while the gateway is away (restarting)."""
        try:
            response = self.http.get(f"/api/v1/uploads/{upload_id}")
        except httpx.TransportError:
            time.sleep(0.2)
            return None
        return response.json() if response.status_code == 200 else None

    def wait_files(self, upload_id: str, states: set[str], at_least: int,
                   timeout: float = 60) -> None:
        """Until `at_least` files of the upload are in one of `states` (a point mid-flight)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.status(upload_id)
            if state and sum(f["state"] in states for f in state["files"]) >= at_least:
                return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {at_least} files {states} after {timeout}s")

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def refuse(self, table: str, when: str) -> Callable[[], None]:
        """A fault of ours, injected: the database refuses rows of `table` (schema.name) for
        which `when` holds (SQL over `new`). Returns what takes it away."""
        schema = table.split(".")[0]
        self.query(f"""create function {schema}.refuse() returns trigger language plpgsql as $$
            begin if {when} then raise exception 'injected fault'; end if; return new; end $$""")
        self.query(f"create trigger refuse before insert or update on {table} "
                   f"for each row execute function {schema}.refuse()")
        return lambda: self.query(f"drop function {schema}.refuse() cascade")

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        url = self.env["IMGEST_DATABASE_URL"].replace("postgresql+asyncpg", "postgresql")

        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(url)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(run())


@contextmanager
def started_stack(request, infra: Infra, smtp_server, tmp_path_factory, store: str,
                  **env: str) -> Iterator[Running]:
    """The whole stack on the session's PostgreSQL server (a database of its own), a broker of
    its own and the given store; its log is printed if a test failed."""
    data_dir = tmp_path_factory.mktemp(f"stack-{store}")
    broker = infra.kafka()
    database = f"imgest_{data_dir.name.replace('-', '_')}"
    env = {
        "IMGEST_DATABASE_URL": infra.database_url(database),
        "IMGEST_KAFKA_BOOTSTRAP": broker.bootstrap,
        "IMGEST_EPOCH_CHECK_SECONDS": "1",
        "IMGEST_KAFKA_IDEMPOTENCE": str(infra.idempotence).lower(),
        "IMGEST_STORE": store,
        "IMGEST_S3_BUCKET": f"imgest-{uuid.uuid4().hex[:8]}",
        "IMGEST_SMTP_URL": smtp_server.url,
        "IMGEST_RETRY_BASE_SECONDS": "0.05",
        "IMGEST_PROGRESS_SECONDS": "0.001",  # every archive tells its progress
        "IMGEST_MAX_UPLOAD_BYTES": str(3 * 1024 * 1024),
        "IMGEST_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "IMGEST_BUILD_CHECK_SECONDS": "0.5",  # gradual sends' entries, built once idle
        **infra.s3,
        **{port_env(s): str(free_port()) for s in SERVICES},
        **env,
    }
    env["IMGEST_PUBLIC_URL"] = f"http://127.0.0.1:{env['IMGEST_GATEWAY_PORT']}"
    log = data_dir / "services.log"
    sink = log.open("a", buffering=1)
    stack = Stack(data_dir, env, emit=lambda name, line: sink.closed or sink.write(f"{name:<9}| {line}\n"))
    resolved = stack.start()
    try:
        stack.wait_ready(timeout=180)
    except TimeoutError:
        stack.stop()
        raise AssertionError("stack not ready:\n" + log.read_text()[-5000:]) from None
    run = Running(stack, resolved, smtp_server.mailbox, log, broker)
    try:
        yield run
    finally:
        stack.stop()
        if request.session.testsfailed:
            print(f"--- {store} stack, last service log lines ---\n{run.tail(150)}")
        broker.stop()
        sink.close()


# --- test data ---------------------------------------------------------------------------------


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def study_zip(template: Path, instances: int = 20, series: int = 2) -> tuple[bytes, str]:
    """A zip of `instances` DICOM files of one new study, spread over `series` series."""
    study_uid = generate_uid()
    patient = f"ZIP{uuid.uuid4().hex[:6]}"
    series_uids = [generate_uid() for _ in range(series)]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(instances):
            ds = pydicom.dcmread(template)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uids[i % series]
            ds.SeriesNumber = i % series + 1
            ds.SeriesDescription = f"Axial {i % series + 1} mm"
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            ds.PatientID = patient
            ds.PatientName = patient
            zf.writestr(f"study/series{i % series + 1}/IM{i:04d}.dcm", dicom_bytes(ds))
        zf.writestr("__MACOSX/study/._IM0000.dcm", b"junk")  # skipped, as macOS zips need
    return out.getvalue(), study_uid


def tar_bytes(mode: str, files: dict[str, bytes], odd: dict[str, bytes] | None = None) -> bytes:
    """A tar (`mode`: "w", "w:gz", "w:bz2", "w:xz") of `files`, and of members of other
    types: `odd` maps a name to a tarfile type (a symlink to /etc/shadow, a device…)."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (odd or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/shadow"
            tf.addfile(info)
    return out.getvalue()


def jpeg_with_exif() -> bytes:
    import piexif
    from PIL import Image

    exif = piexif.dump({"0th": {piexif.ImageIFD.Make: b"imgest-camera",
                                piexif.ImageIFD.Model: b"E2E-1"},
                        "Exif": {piexif.ExifIFD.DateTimeOriginal: b"2026:11:26 10:00:00"}})
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, "JPEG", exif=exif)
    return out.getvalue()


