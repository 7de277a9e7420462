"""Unpack throughput of the unpacker against `unzip` and `tar` on the same machine.

    uv run python bench/unpack.py [--members 1000] [--tar-gb 2]

1. a zip of 1,000 DICOM instances (512×512 16-bit CT, deflated);
2. a tar.gz of `--tar-gb` GB (DICOM-like: 16-bit noise over a smooth background, so it
   compresses as scans do).

Each is unpacked by imgest's unpacker (`unpack()`, the code the service runs, from a local
store into it, each member fsynced as the store does) and by the command-line tool writing
to local disk (no fsync: the tool does not), in a fresh process each, whose peak memory
(ru_maxrss) is reported. Never part of the tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

MB = 1024 * 1024


PIXELS = 512 * 512
_HIGH = bytes((i // 512 + i % 512) // 256 % 4 for i in range(PIXELS))  # a smooth background
_NOISE = bytes(b & 0x3F for b in range(256))  # 6 bits of noise in the low byte


def instance(study: str, series: str, number: int) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    pixels = bytearray(2 * PIXELS)
    pixels[0::2] = os.urandom(PIXELS).translate(_NOISE)
    pixels[1::2] = _HIGH
    ds.PixelData = bytes(pixels)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def build_zip(path: Path, members: int) -> None:
    study, series = generate_uid(), generate_uid()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(members):
            zf.writestr(f"study/IM{i:05d}.dcm", instance(study, series, i))


def build_tar_gz(path: Path, gigabytes: float) -> int:
    study, series = generate_uid(), generate_uid()
    one = instance(study, series, 0)
    count = int(gigabytes * 1024**3 / len(one))
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for i in range(count):
            data = instance(study, series, i)
            info = tarfile.TarInfo(f"study/IM{i:06d}.dcm")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return count


def child_imgest(archive: str, fmt: str, root: str) -> None:
    """Runs in its own process: the unpacker's code, local store → local store."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services/unpacker/src"))
    from imgest_contracts import ObjectStored
    from imgest_runtime.store import LocalStore
    from imgest_unpacker.app import unpack
    from imgest_unpacker.domain import Limits

    store = LocalStore(Path(root))
    size = os.path.getsize(archive)
    with open(archive, "rb") as f:
        put = store.put("staging/bench/archive", f, size)
    obj = ObjectStored(upload_id="bench", object_key="staging/bench/archive", filename="a",
                       size=size, sha256=put.sha256)
    t0 = time.monotonic()
    result = unpack(store, obj, fmt, Limits(10**6, 2 * 1024**4, 1000))
    seconds = time.monotonic() - t0
    print(json.dumps({"seconds": seconds, "members": len(result.members),
                      "bytes": result.bytes,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_imgest(archive: Path, fmt: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(archive), fmt, str(root)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# The tool runs under a small parent of its own, whose only child it is: that parent's
# RUSAGE_CHILDREN is the tool's peak memory alone.
_MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); print(resource.getrusage("
            "resource.RUSAGE_CHILDREN).ru_maxrss)")


def run_tool(argv: list[str], cwd: Path) -> dict:
    cwd.mkdir(parents=True)
    t0 = time.monotonic()
    peak_kb = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=cwd, check=True,
                             capture_output=True, text=True).stdout
    seconds = time.monotonic() - t0
    files = [p for p in cwd.rglob("*") if p.is_file()]
    return {"seconds": seconds, "members": len(files),
            "bytes": sum(p.stat().st_size for p in files), "peak_mb": int(peak_kb) / 1024}


def report(name: str, imgest: dict, tool: dict, tool_name: str) -> None:
    print(f"\n{name}: {imgest['members']} files, {imgest['bytes'] / 1e6:.0f} MB unpacked")
    for who, r in (("imgest unpacker", imgest), (tool_name, tool)):
        print(f"  {who:<16} {r['bytes'] / 1e6 / r['seconds']:7.0f} MB/s "
              f"{r['members'] / r['seconds']:8.0f} files/s   peak {r['peak_mb']:5.0f} MB")
    ratio = tool["seconds"] / imgest["seconds"]
    print(f"  imgest / {tool_name}: {ratio:.0%} of its speed (target: at least 50%; "
          "memory under 200 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000, help="Instances in the zip.")
    parser.add_argument("--tar-gb", type=float, default=2.0, help="Size of the tar.gz's content.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgest-unpack-", dir="/tmp") as tmp:
        root = Path(tmp)
        zipped = root / "study.zip"
        build_zip(zipped, args.members)
        report(f"zip of {args.members} DICOM instances ({zipped.stat().st_size / 1e6:.0f} MB)",
               run_imgest(zipped, "zip", root / "store-zip"),
               run_tool(["unzip", "-q", str(zipped)], root / "unzip"), "unzip")
        tgz = root / "big.tar.gz"
        build_tar_gz(tgz, args.tar_gb)
        report(f"tar.gz of {args.tar_gb} GB ({tgz.stat().st_size / 1e6:.0f} MB compressed)",
               run_imgest(tgz, "tar.gz", root / "store-tgz"),
               run_tool(["tar", "xzf", str(tgz)], root / "tar"), "tar xzf")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_imgest(*sys.argv[2:5])
    else:
        main()
