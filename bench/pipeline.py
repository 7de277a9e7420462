"""Throughput of the whole pipeline: files/s from upload to archived, on the embedded stack.

    uv run python bench/pipeline.py --files 500 --runs 3 [--delivery guarded|unguarded|both]

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

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import gateway_client

from imgest.infra import exit_on_sigterm, free_port
from imgest.stack import SERVICES, Stack, port_env


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


def measure(delivery: str, args: argparse.Namespace, tmp: Path) -> list[float]:
    """Files/s of each run on a fresh stack with IMGEST_DELIVERY=delivery."""
    env = {port_env(s): str(free_port()) for s in SERVICES}
    env["IMGEST_DELIVERY"] = delivery
    log = open(args.log or tmp / "services.log", "a", buffering=1)  # noqa: SIM115
    stack = Stack(tmp / f"data-{delivery}", env,
                  emit=lambda n, line: log.write(f"{n:<9}| {line}\n"))
    started = time.monotonic()
    rates = []
    try:
        stack.start()
        stack.wait_ready(180)
        print(f"{delivery}: stack ready in {time.monotonic() - started:.1f}s")
        http = gateway_client(stack, env["IMGEST_GATEWAY_PORT"], timeout=120)
        created = http.post("/api/v1/projects", json={"id": "BENCH", "settings": {
            "auto_archive": "auto", "max_files_per_upload": max(1500, args.files)}})
        assert created.status_code == 201, created.text
        for run in range(args.runs):
            body = study_zip(args.files)
            t0 = time.monotonic()
            upload = http.post("/api/v1/uploads", params={"filename": "study.zip",
                                                          "project": "BENCH"},
                               content=body).json()
            # The list, not the upload's own page: a 500-file status page every 50 ms would
            # load the gateway and distort what is measured.
            while next(u for u in http.get("/api/v1/uploads", params={"limit": 5}).json()
                       if u["id"] == upload["id"])["state"] == "processing":
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            state = http.get(f"/api/v1/uploads/{upload['id']}").json()
            assert state["state"] == "archived", state["state"]
            rates.append(args.files / elapsed)
            print(f"{delivery}: run {run + 1}: {args.files} files ({len(body) / 1e6:.1f} MB) "
                  f"archived in {elapsed:.2f}s = {rates[-1]:.0f} files/s")
    finally:
        stack.stop()
        log.close()
    return rates


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delivery", choices=["guarded", "unguarded", "both"], default="both",
                        help="guarded is imgest as it runs; unguarded drops the inbox, the "
                        "outbox and commit-after-work, to show what they cost")
    parser.add_argument("--log", type=Path, help="Keep the services' log here.")
    args = parser.parse_args()
    modes = ["guarded", "unguarded"] if args.delivery == "both" else [args.delivery]
    results = {}
    with tempfile.TemporaryDirectory(prefix="imgest-bench-") as tmp:
        Path(tmp).chmod(0o755)
        for mode in modes:
            results[mode] = statistics.median(measure(mode, args, Path(tmp)))
    print(f"\n{'delivery':<10} {'files/s':>8}   ({args.files} files a run, median of "
          f"{args.runs})")
    for mode, rate in results.items():
        print(f"{mode:<10} {rate:8.0f}")
    if len(results) == 2:
        print(f"the guarantees cost {1 - results['guarded'] / results['unguarded']:.0%} "
              "of the unguarded rate")


if __name__ == "__main__":
    main()
