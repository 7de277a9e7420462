"""Throughput of the whole pipeline: files/s from upload to archived, on the embedded stack.

    uv run python bench/pipeline.py --files 500 --runs 3

Starts `imgest up`'s stack (embedded PostgreSQL, Tansu, local store) in a temporary directory,
uploads a zip of N DICOM instances of one study (pydicom's CT_small.dcm, 39 KB each), and times
upload → `archived` as the gateway reports it. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgest.infra import free_port  # noqa: E402
from imgest.stack import SERVICES, Stack, port_env  # noqa: E402


def study_zip(files: int) -> bytes:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(files):
            template.StudyInstanceUID, template.SeriesInstanceUID = study, series
            template.SOPInstanceUID = generate_uid()
            template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
            buf = io.BytesIO()
            template.save_as(buf, enforce_file_format=True)
            zf.writestr(f"IM{i:05d}.dcm", buf.getvalue())
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log", type=Path, help="Keep the services' log here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgest-bench-") as tmp:
        Path(tmp).chmod(0o755)
        env = {port_env(s): str(free_port()) for s in SERVICES}
        log = open(args.log or Path(tmp) / "services.log", "a", buffering=1)  # noqa: SIM115
        stack = Stack(Path(tmp) / "data", env,
                      emit=lambda n, line: log.write(f"{n:<9}| {line}\n"))
        started = time.monotonic()
        stack.start()
        stack.wait_ready(180)
        print(f"stack ready in {time.monotonic() - started:.1f}s")
        http = httpx.Client(base_url=f"http://127.0.0.1:{env['IMGEST_GATEWAY_PORT']}",
                            timeout=120)
        rates = []
        try:
            for run in range(args.runs):
                body = study_zip(args.files)
                t0 = time.monotonic()
                upload = http.post("/api/v1/uploads", params={"filename": "study.zip"},
                                   content=body).json()
                # The list, not the upload's own page: a 500-file status page every 50 ms
                # would load the gateway and distort what is measured.
                while next(u for u in http.get("/api/v1/uploads", params={"limit": 5}).json()
                           if u["id"] == upload["id"])["state"] == "processing":
                    time.sleep(0.05)
                elapsed = time.monotonic() - t0
                state = http.get(f"/api/v1/uploads/{upload['id']}").json()
                assert state["state"] == "archived", state["state"]
                rates.append(args.files / elapsed)
                print(f"run {run + 1}: {args.files} files ({len(body) / 1e6:.1f} MB) archived "
                      f"in {elapsed:.2f}s = {rates[-1]:.0f} files/s")
        finally:
            stack.stop()
        print(f"median {statistics.median(rates):.0f} files/s over {args.runs} runs")


if __name__ == "__main__":
    main()
