"""A multi-GB archive through the embedded stack with a short max_poll_interval: the unpacker
works far longer than the interval, yet stays in its group and unpacks the archive once.

    uv run python bench/big_archive.py --gb 2 --poll-interval-ms 5000

Builds a stored zip of DICOM instances with large pixel data (written to a temporary file,
streamed to the gateway), times upload → archived, and reads the services' log for what
matters: how often the unpacker said it kept polling, whether any commit failed or a group
rebalanced while it worked, and how many times the archive was unpacked. Never part of the
tests.
"""

from __future__ import annotations

import argparse
import io
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

INSTANCE_MB = 16


def build_zip(path: Path, gigabytes: float) -> int:
    """A stored zip of 16 MB CT instances of one study; returns how many."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    side = int((INSTANCE_MB * 1024 * 1024 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    count = max(1, int(gigabytes * 1024 / INSTANCE_MB))
    study, series = generate_uid(), generate_uid()
    pixels = bytes(range(256)) * (side * side * 2 // 256 + 1)
    ds.PixelData = pixels[: side * side * 2]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i in range(count):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buf = io.BytesIO()  # pydicom needs to seek; one instance in memory at a time
            ds.save_as(buf, enforce_file_format=True)
            zf.writestr(f"IM{i:05d}.dcm", buf.getvalue())
    return count


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="archive size in GB")
    parser.add_argument("--poll-interval-ms", type=int, default=5000,
                        help="IMGEST_KAFKA_MAX_POLL_INTERVAL_MS for the run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgest-big-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        archive = root / "big.zip"
        count = build_zip(archive, args.gb)
        size = archive.stat().st_size
        print(f"archive: {count} instances, {size / 1e9:.2f} GB")
        env = {port_env(s): str(free_port()) for s in SERVICES}
        env["IMGEST_KAFKA_MAX_POLL_INTERVAL_MS"] = str(args.poll_interval_ms)
        env["IMGEST_KAFKA_SESSION_TIMEOUT_MS"] = "3000"
        log_path = root / "services.log"
        log = log_path.open("a", buffering=1)
        stack = Stack(root / "data", env, emit=lambda n, line: log.write(f"{n:<9}| {line}\n"))
        try:
            stack.start()
            stack.wait_ready(180)
            http = gateway_client(stack, env["IMGEST_GATEWAY_PORT"], timeout=600)
            t0 = time.monotonic()
            with archive.open("rb") as body:
                upload = http.post("/api/v1/uploads", params={"filename": "big.zip"},
                                   content=body).json()
            stored = time.monotonic() - t0
            while next(u for u in http.get("/api/v1/uploads").json()
                       if u["id"] == upload["id"])["state"] == "processing":
                time.sleep(0.5)
            elapsed = time.monotonic() - t0
            state = http.get(f"/api/v1/uploads/{upload['id']}").json()
        finally:
            stack.stop()
            log.close()
        text = log_path.read_text()
        unpacker = [line for line in text.splitlines() if line.startswith("unpacker")]
        print(f"stored in {stored:.1f}s ({size / 1e6 / stored:.0f} MB/s); {state['state']} "
              f"after {elapsed:.1f}s ({size / 1e6 / elapsed:.0f} MB/s end to end)")
        print(f"unpacker: kept polling {sum('polled to stay in the group' in x for x in unpacker)}"
              f" time(s); unpacked {sum('unpacked:' in x for x in unpacker)} time(s); "
              f"failed commits {text.count('CommitFailedError')}; "
              f"partition assignments {sum('assigned to partitions' in x for x in unpacker)}")
        print(f"files archived: {sum(f['state'] == 'archived' for f in state['files'])} of "
              f"{count}")


if __name__ == "__main__":
    main()
