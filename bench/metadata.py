"""Header extraction by the metadata service against a plain pydicom loop over the same files.

    uv run python bench/metadata.py [--files 1000] [--pixels-kb 512] [--threads 1]
                                    [--stores local,s3]

Writes `--files` DICOM instances to a temporary directory: pydicom's CT_small.dcm and
MR_small.dcm headers in turn, each with a new SOPInstanceUID and `--pixels-kb` KB of 16-bit
pixel data (512 columns × `--pixels-kb` rows: the default is a 512×512 CT slice), so the
header is a small fraction of each file, as in real scans. Then, in files/s:

1. the plain loop: `pydicom.dcmread(path, stop_before_pixels=True)` over the files on disk;
2. for each store adapter (the files put into it first, not timed): `read_headers()`, the
   code the metadata service runs per file.staged event, over the same files; and, to tell
   the parsing from the store's own speed, the store's 64 KiB `read_range` alone.

Every result is checked (DICOM, no reason to refuse, the SOPInstanceUID written), so the bench
cannot time a failure path. The heads read come from the page cache (the local store writes a
file's first 64 KiB through it, the rest by O_DIRECT): this measures the work per file, not the
disk. The S3 adapter talks HTTP to moto's server in this process, as the tests do: no network
latency, but moto's own per-request work (a few ms, whether in this process or its own), so
that row is bounded by moto, not by a real S3; the "reads alone" line under it shows that
bound. With `--threads N` (N > 1) a second table runs both sides in N threads, as the service
does with `asyncio.to_thread`. Never part of the tests. """

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgest_contracts import FileKind, FileStaged, Source
from imgest_metadata.app import read_headers
from imgest_metadata.domain import HEAD_BYTES
from imgest_metadata.settings import Settings
from imgest_runtime.store import LocalStore, ObjectStore, S3Store

from imgest.infra import exit_on_sigterm, free_port

TEMPLATES = ("CT_small.dcm", "MR_small.dcm")  # both explicit VR little endian, uncompressed
COLUMNS = 512
LIMIT = Settings.model_fields["max_header_bytes"].default  # the service's default
FIRST_READ = HEAD_BYTES  # read_headers' first read, enough for these headers
TARGET = 0.5


def write_instances(folder: Path, count: int, pixels_kb: int) -> dict[Path, str]:
    """`count` files in `folder`; returns each one's SOPInstanceUID."""
    templates = [pydicom.dcmread(get_testdata_file(name)) for name in TEMPLATES]
    # The pixels' content does not matter to a header reader: one block of noise for all.
    pixels = os.urandom(pixels_kb * 1024)
    for ds in templates:
        ds.Rows, ds.Columns = pixels_kb, COLUMNS  # a row of 512 16-bit pixels is 1 KB
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = pixels
    uids = {}
    for i in range(count):
        ds = templates[i % len(templates)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        uids[path] = ds.SOPInstanceUID
    return uids


def files_per_second(work: Callable[[Any], Any], items: list, threads: int) -> tuple[float, list]:
    """Runs `work` over `items` (in `threads` threads); returns files/s and the results."""
    work(items[0])  # warm-up outside the clock: lazy imports, pydicom's dictionary, connections
    t0 = time.perf_counter()
    if threads == 1:
        results = [work(item) for item in items]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(work, items))
    return len(items) / (time.perf_counter() - t0), results


def plain_loop(uids: dict[Path, str], threads: int) -> float:
    paths = list(uids)
    rate, datasets = files_per_second(
        lambda path: pydicom.dcmread(path, stop_before_pixels=True), paths, threads)
    assert all(ds.SOPInstanceUID == uids[p] for p, ds in zip(paths, datasets, strict=True))
    return rate


def stage(store: ObjectStore, uids: dict[Path, str]) -> list[tuple[FileStaged, str]]:
    """Puts the files into the store (not timed) and builds the events the service would get."""
    staged = []
    for path, uid in uids.items():
        key = f"staging/bench/{path.name}"
        size = path.stat().st_size
        with path.open("rb") as f:
            stored = store.put(key, f, size)
        assert stored.sha256 is not None
        staged.append((FileStaged(upload_id="bench", file_id=path.stem, object_key=key,
                                  path=path.name, size=size, sha256=stored.sha256,
                                  source=Source(object_key=key, files_total=1)), uid))
    return staged


def extraction(store: ObjectStore, staged: list[tuple[FileStaged, str]], threads: int) -> float:
    rate, found = files_per_second(
        lambda item: read_headers(store, item[0], LIMIT), staged, threads)
    for (event, uid), result in zip(staged, found, strict=True):
        assert result.reason is None, f"{event.path}: {result.reason}"
        assert result.kind == FileKind.dicom, f"{event.path}: {result.kind}"
        assert result.hints.sop_instance_uid == uid, f"{event.path}: read the wrong object"
    return rate


def bare_reads(store: ObjectStore, staged: list[tuple[FileStaged, str]], threads: int) -> float:
    """The store's side alone: read_headers' first read without the parsing, so a shortfall
    can be told apart from the store's own speed."""
    rate, _ = files_per_second(
        lambda item: store.read_range(item[0].object_key, 0, FIRST_READ), staged, threads)
    return rate


@contextmanager
def local_store(root: Path) -> Iterator[ObjectStore]:
    # No fsync: the puts are setup, not measured, and reads do not depend on it.
    yield LocalStore(root / "store", fsync=False)


@contextmanager
def s3_store(_root: Path) -> Iterator[ObjectStore]:
    # As the tests do it: moto's S3 server over HTTP on a free port, in this process.
    from moto.server import ThreadedMotoServer

    # Its request log would be written by this process, inside the timed loop: not S3's cost.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        store = S3Store(endpoint=f"127.0.0.1:{port}", access_key="test", secret_key="test",
                        bucket="bench", secure=False, region="us-east-1")
        store.ensure_bucket()
        yield store
    finally:
        server.stop()


STORES = {"local": ("local store", local_store), "s3": ("s3 (moto)", s3_store)}


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="How many DICOM instances.")
    parser.add_argument("--pixels-kb", type=int, default=512,
                        help="Pixel data per instance, in KB (512: a 512×512 16-bit CT slice).")
    parser.add_argument("--threads", type=int, default=1,
                        help="If more than 1, also time both sides in this many threads.")
    parser.add_argument("--stores", default="local,s3",
                        help=f"Comma-separated store adapters to time: {', '.join(STORES)}.")
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in stores if s not in STORES]
    if unknown or args.files < 1 or args.pixels_kb < 1 or args.threads < 1:
        parser.error(f"unknown store(s): {', '.join(unknown)}" if unknown
                     else "--files, --pixels-kb and --threads must be at least 1")
    counts = [1] + ([args.threads] if args.threads > 1 else [])

    with tempfile.TemporaryDirectory(prefix="imgest-metadata-", dir="/tmp") as tmp:
        root = Path(tmp)
        folder = root / "files"
        folder.mkdir()
        uids = write_instances(folder, args.files, args.pixels_kb)
        total = sum(p.stat().st_size for p in uids)
        plain = {n: plain_loop(uids, n) for n in counts}
        rates: dict[str, dict[int, float]] = {}
        bare: dict[str, dict[int, float]] = {}
        for name in stores:
            label, open_store = STORES[name]
            with open_store(root) as store:
                staged = stage(store, uids)
                rates[label] = {n: extraction(store, staged, n) for n in counts}
                bare[label] = {n: bare_reads(store, staged, n) for n in counts}

    print(f"\n{args.files} DICOM instances ({', '.join(TEMPLATES)} headers, "
          f"{args.pixels_kb} KB of pixel data each; {total / 1e6:.0f} MB in all)")
    for n in counts:
        print(f"\n{n} thread{'s' if n > 1 else ''}:")
        print(f"  plain dcmread loop, on disk  {plain[n]:8.0f} files/s")
        for label, by_threads in rates.items():
            rate = by_threads[n]
            print(f"  read_headers, {label:<14} {rate:8.0f} files/s   = {rate / plain[n]:.0%} "
                  f"of the plain loop (target: at least {TARGET:.0%})")
            print(f"    {'its 64 KiB reads alone':<26} {bare[label][n]:8.0f} files/s")


if __name__ == "__main__":
    main()
