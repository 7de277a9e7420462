"""Upload throughput of the gateway against writing the same bytes straight to the store.

    uv run python bench/upload.py [--gb 2] [--files 1000] [--file-kb 256] [--clients 4]

On the embedded stack (local store) in a temporary directory:

1. one big file (2 GB of random bytes, from disk) through `POST /api/v1/uploads/{id}/files`,
   against the same file written with the store's own `put`; with the gateway's peak memory
   during the upload (the PSS of its processes, `common.peak_watch`: read when their resident
   size grows, checked every 50 ms, and every second);
2. 1,000 small files by 4 clients at once through the same endpoint, one request per file and
   then as multipart forms of `--batch` files, against 4 threads putting the same files into
   the store.

Each figure is the median of `--rounds` rounds; within a round the direct write and the
gateway run back to back, with the stack up for both, and each starts from a synced disk
(`os.sync()` first): neither pays for the writeback of what the other left dirty.

The files are added to an upload session and not submitted: this measures the way in, not the
pipeline (bench/pipeline.py does that). Never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import gateway_client, memory_kb, peak_watch
from imgest_runtime.store import LocalStore

from imgest.infra import exit_on_sigterm, free_port
from imgest.stack import SERVICES, Stack, port_env

MB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MB)
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def file_body(path: Path):
    with path.open("rb") as f:
        while chunk := f.read(MB):
            yield chunk


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="Size of the big file.")
    parser.add_argument("--files", type=int, default=1000, help="How many small files.")
    parser.add_argument("--file-kb", type=int, default=256, help="Size of each small file.")
    parser.add_argument("--clients", type=int, default=4, help="Clients sending small files.")
    parser.add_argument("--batch", type=int, default=50, help="Files per multipart form.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Rounds; each runs the direct write and the gateway back to back.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgest-upload-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        big = root / "big.bin"
        size = int(args.gb * 1024**3)
        make_file(big, size)
        small = [os.urandom(args.file_kb * 1024) for _ in range(args.files)]
        # The forms are encoded before the clock starts, as the single files are made: the
        # client's multipart encoding (a third of a core here) is not the gateway's work.
        forms = []
        for first in range(0, args.files, args.batch):
            form = httpx.Request("POST", "http://bench/", files=[
                ("file", (f"{i}.bin", small[i]))
                for i in range(first, min(first + args.batch, args.files))])
            forms.append((form.read(), form.headers["Content-Type"]))
        direct = LocalStore(root / "direct")  # a store of the same kind, on the same disk

        env = {port_env(s): str(free_port()) for s in SERVICES}
        env["IMGEST_MAX_UPLOAD_BYTES"] = str(size + MB)
        log = (root / "services.log").open("a", buffering=1)
        stack = Stack(root / "data", env, emit=lambda n, line: log.write(f"{n:<9}| {line}\n"))
        # name: one figure per round (MB/s or files/s). Direct and gateway alternate within a
        # round, with the stack running throughout: this disk's speed drifts by the minute,
        # so figures taken apart would compare the disk with itself.
        figures: dict[str, list[float]] = {k: [] for k in (
            "direct_big", "gateway_big", "direct_small", "gateway_small", "gateway_forms")}
        peaks: list[int] = []
        try:
            stack.start()
            stack.wait_ready(180)
            port = env["IMGEST_GATEWAY_PORT"]
            http = gateway_client(stack, port, timeout=600)
            http.post("/api/v1/projects", json={"id": "BENCH", "settings": {
                "max_files_per_upload": 2 * args.files + 10}})
            pid = stack.supervisor.children["gateway"].process.pid  # type: ignore[union-attr]
            before = memory_kb(pid)
            clients = [gateway_client(stack, port) for _ in range(args.clients)]

            def new_upload() -> str:
                return http.post("/api/v1/projects/BENCH/uploads", json={}).json()["id"]

            for r in range(args.rounds):
                os.sync()
                t0 = time.monotonic()
                with big.open("rb") as f:
                    direct.put("big/big.bin", f, size)
                figures["direct_big"].append(size / (time.monotonic() - t0))
                direct.delete("big/big.bin")

                upload = new_upload()
                stop, peak = threading.Event(), [before]
                watcher = threading.Thread(target=peak_watch, args=(pid, stop, peak))
                watcher.start()
                os.sync()
                t0 = time.monotonic()
                added = http.post(f"/api/v1/uploads/{upload}/files",
                                  params={"filename": "big.bin"}, content=file_body(big),
                                  headers={"Content-Length": str(size)})
                figures["gateway_big"].append(size / (time.monotonic() - t0))
                stop.set()
                watcher.join()
                peaks.append(peak[0])
                assert added.status_code == 201, added.text
                print(f"round {r + 1}: big file direct {figures['direct_big'][-1] / 1e6:.0f}, "
                      f"gateway {figures['gateway_big'][-1] / 1e6:.0f} MB/s", flush=True)

            for r in range(args.rounds):
                os.sync()
                t0 = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(lambda i: direct.put(
                        f"small/{i}.bin", _Bytes(small[i]), len(small[i])), range(args.files)))
                figures["direct_small"].append(args.files / (time.monotonic() - t0))
                direct.delete_prefix("small/")

                upload = new_upload()

                def send(i: int, upload: str = upload) -> None:
                    response = clients[i % args.clients].post(
                        f"/api/v1/uploads/{upload}/files", params={"filename": f"{i}.bin"},
                        content=small[i])
                    assert response.status_code == 201, response.text

                os.sync()
                t0 = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(send, range(args.files)))
                figures["gateway_small"].append(args.files / (time.monotonic() - t0))

                upload = new_upload()

                def send_form(k: int, upload: str = upload) -> None:
                    body, content_type = forms[k]
                    response = clients[k % args.clients].post(
                        f"/api/v1/uploads/{upload}/files", content=body,
                        headers={"Content-Type": content_type})
                    assert response.status_code == 201, response.text

                os.sync()
                t0 = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(send_form, range(len(forms))))
                figures["gateway_forms"].append(args.files / (time.monotonic() - t0))
                print(f"round {r + 1}: small files direct {figures['direct_small'][-1]:.0f}, "
                      f"one per request {figures['gateway_small'][-1]:.0f}, forms "
                      f"{figures['gateway_forms'][-1]:.0f} files/s", flush=True)
        finally:
            stack.stop()
            log.close()

    m = {k: statistics.median(v) for k, v in figures.items()}

    def spread(key: str, scale: float = 1) -> str:
        return f"({min(figures[key]) / scale:.0f}-{max(figures[key]) / scale:.0f})"

    print(f"\nmedians of {args.rounds} rounds (range in brackets)")
    print(f"\none {size / 1e9:.2f} GB file:")
    print(f"  straight to the store  {m['direct_big'] / 1e6:8.0f} MB/s "
          f"{spread('direct_big', 1e6)}")
    print(f"  through the gateway    {m['gateway_big'] / 1e6:8.0f} MB/s "
          f"{spread('gateway_big', 1e6)}  = {m['gateway_big'] / m['direct_big']:.0%} of direct "
          "(target: at least 70%)")
    print(f"  gateway memory: {before / 1024:.0f} MB before, peak {max(peaks) / 1024:.0f} MB "
          "during the uploads (target: under 300 MB)")
    print(f"\n{args.files} files of {args.file_kb} KB, {args.clients} clients:")
    print(f"  straight to the store  {m['direct_small']:8.0f} files/s {spread('direct_small')} "
          f"({m['direct_small'] * args.file_kb / 1024:.0f} MB/s)")
    print(f"  through the gateway    {m['gateway_small']:8.0f} files/s {spread('gateway_small')}"
          f"  = {m['gateway_small'] / m['direct_small']:.0%} of direct (one request per file)")
    print(f"  through the gateway    {m['gateway_forms']:8.0f} files/s {spread('gateway_forms')}"
          f"  = {m['gateway_forms'] / m['direct_small']:.0%} of direct (forms of {args.batch} "
          "files; target: at least 70%)")


class _Bytes:
    """A readable over bytes (the store reads streams)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        return chunk


if __name__ == "__main__":
    main()
