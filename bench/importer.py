"""How fast the importer commits a study into its session: instances/s, against bare copies.

    uv run python bench/importer.py [--instances 1000] [--runs 1] [--log services.log]

On the embedded stack (local store) in a temporary directory, uploads one zip of a one-study
CT (`--instances` 512×512 16-bit slices, bench/unpack.py's generator) into a project of its own
and waits for the gateway to say `archived`. Meanwhile a thread reads the importer's own row
(`importer.upload`: state, updated_at) every 20 ms and notes when each state was first seen:

  commit             `completing` → `cleaning`: the batch that recorded the last file has
                     committed; the importer plans the session, copies every staged object to
                     its archive key (server-side, one thread), writes the catalogue and the
                     outgoing events in one transaction;
  commit + cleanup   `completing` → `completed`: and empties the upload's staging.

Inside the commit, the archived objects' modification times (local store: each copy writes a
new file) split it into set-up before the first copy, the copies, and the catalogue after the
last one. For comparison, in the same store before the stack stops: the same objects copied
with the store's own `copy()` in one thread to a scratch prefix, then that prefix emptied with
`delete_prefix()`, as the importer empties staging. Never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import gateway_client
from imgest_runtime.settings import RuntimeSettings
from imgest_runtime.store import LocalStore, open_store
from unpack import build_zip

from imgest.infra import exit_on_sigterm, free_port
from imgest.stack import SERVICES, Stack, port_env

POLL = 0.02  # seconds between two looks at the importer's row


def asyncpg_url(env: dict[str, str]) -> str:
    return env["IMGEST_DATABASE_URL"].replace("postgresql+asyncpg", "postgresql")


def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


class StateWatch(threading.Thread):
    """Reads the importer's row of one upload every POLL seconds (one connection, a plain
    select: no lock); `seen[state]` is the wall time (time.time()) it was first seen, and
    `stamped[state]` the row's own updated_at then (the importer's clock, the same host's)."""

    def __init__(self, url: str, upload_id: str):
        super().__init__(daemon=True, name="state-watch")
        self.url, self.upload_id = url, upload_id
        self.seen: dict[str, float] = {}
        self.stamped: dict[str, float] = {}
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._poll())
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
        finally:
            self.done.set()

    async def _poll(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while True:
                row = await conn.fetchrow("select state, updated_at from importer.upload "
                                          "where id = $1", self.upload_id)
                now = time.time()
                if row is not None and row["state"] not in self.seen:
                    self.seen[row["state"]] = now
                    self.stamped[row["state"]] = row["updated_at"].timestamp()
                if row is not None and row["state"] == "completed":
                    return
                await asyncio.sleep(POLL)
        finally:
            await conn.close()


def wait_archived(http, upload_id: str, deadline: float) -> str:
    """The gateway's state of the upload once it is no longer processing."""
    while time.monotonic() < deadline:
        listed = next(u for u in http.get("/api/v1/uploads", params={"limit": 5}).json()
                      if u["id"] == upload_id)
        if listed["state"] not in ("processing", "cancelling"):
            return listed["state"]
        time.sleep(0.05)
    raise TimeoutError(f"upload {upload_id} still processing")


def one_run(run: int, stack: Stack, env: dict[str, str], store: LocalStore, archive: Path,
            args: argparse.Namespace) -> dict[str, float]:
    http = gateway_client(stack, env["IMGEST_GATEWAY_PORT"], timeout=600)
    url = asyncpg_url(env)
    # A project per run: the same zip again in one project would be duplicates, not imports.
    project = f"BENCH{run}"
    created = http.post("/api/v1/projects", json={"id": project, "settings": {
        "max_files_per_upload": max(1500, args.instances + 10)}})
    assert created.status_code == 201, created.text
    t0 = time.monotonic()
    with archive.open("rb") as body:
        response = http.post("/api/v1/uploads", params={"filename": "study.zip",
                                                        "project": project}, content=body)
    assert response.status_code == 201, response.text
    stored = time.monotonic() - t0
    upload_id = response.json()["id"]
    # Started once the POST answered: the importer cannot be near `completing` before the
    # gateway has even submitted the upload.
    watch = StateWatch(url, upload_id)
    watch.start()
    deadline = time.monotonic() + args.timeout
    # No requests to the gateway while the importer works: only the watcher's 20 ms select.
    if not watch.done.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"upload {upload_id}: importer not completed after "
                           f"{args.timeout:.0f}s; seen {sorted(watch.seen)}")
    if watch.error:
        raise watch.error
    state = wait_archived(http, upload_id, deadline)
    archived_after = time.monotonic() - t0
    assert state == "archived", state

    rows = query(url, "select object_key, size from importer.file where upload_id = $1",
                 upload_id)
    keys = [r["object_key"] for r in rows]
    sessions = query(url, "select count(distinct s.session_id) as n from importer.scan s join "
                     "importer.file f on f.scan_id = s.id where f.upload_id = $1", upload_id)
    assert len(keys) == args.instances, f"{len(keys)} catalogued of {args.instances}"
    assert sessions[0]["n"] == 1, f"{sessions[0]['n']} sessions, not 1"
    mtimes = sorted((store.root / key).stat().st_mtime_ns / 1e9 for key in keys)

    # The ceiling: the same objects (now archived, as warm in the page cache as the staged ones
    # were), copied by the store in one thread as the importer does, then the copies deleted
    # as the importer empties staging.
    scratch = f"bench-scratch/{upload_id}/"
    c0 = time.monotonic()
    for i, key in enumerate(keys):
        store.copy(key, f"{scratch}{i:06d}")
    copies = time.monotonic() - c0
    c0 = time.monotonic()
    deleted = store.delete_prefix(scratch)
    deletes = time.monotonic() - c0
    assert deleted == len(keys), deleted

    seen, stamped = watch.seen, watch.stamped
    missed = [s for s in ("completing", "cleaning", "completed") if s not in seen]
    if missed:  # a state shorter than the poll: its boundary cannot be given
        print(f"run {run}: state(s) {', '.join(missed)} not seen (shorter than {POLL * 1000:.0f}"
              " ms)")
    nan = float("nan")
    completing = seen.get("completing", nan)
    cleaning = seen.get("cleaning", nan)
    result = {
        "commit": cleaning - completing,
        "commit_cleanup": seen.get("completed", nan) - completing,
        "commit_cleanup_stamped": stamped.get("completed", nan) - stamped.get("completing", nan),
        "before_copies": mtimes[0] - completing,
        "copies": mtimes[-1] - mtimes[0],
        "after_copies": cleaning - mtimes[-1],
        "bare_copies": copies,
        "bare_copies_delete": copies + deletes,
        "stored": stored,
        "archived": archived_after,
        "bytes": sum(r["size"] for r in rows),
    }
    print(f"run {run}: stored in {stored:.1f}s; archived after {archived_after:.1f}s; "
          f"commit {result['commit']:.2f}s, with cleanup {result['commit_cleanup']:.2f}s; "
          f"bare copies {copies:.2f}s, + delete {deletes:.2f}s")
    return result


ROWS = [  # key, label, rate shown (instances/s)
    ("commit", "importer commit (completing → cleaning)", True),
    ("before_copies", "  before the first copy (plan)", False),
    ("copies", "  first → last copy", False),
    ("after_copies", "  after the last copy (catalogue)", False),
    ("commit_cleanup", "importer commit + cleanup (→ completed)", True),
    ("commit_cleanup_stamped", "  the same by the row's own stamps", True),
    ("bare_copies", "bare store.copy(), one thread", True),
    ("bare_copies_delete", "  + delete_prefix()", True),
    ("archived", "upload → archived (whole pipeline)", True),
]


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000,
                        help="CT slices in the study (512×512, 16-bit).")
    parser.add_argument("--runs", type=int, default=1,
                        help="Uploads of the study, one after the other on one stack.")
    parser.add_argument("--timeout", type=float, default=900, help="Per run, in seconds.")
    parser.add_argument("--log", type=Path, help="Keep the services' log here.")
    args = parser.parse_args()
    if args.instances < 1 or args.runs < 1:
        parser.error("--instances and --runs must be at least 1")
    results = []
    with tempfile.TemporaryDirectory(prefix="imgest-importer-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        archive = root / "study.zip"
        build_zip(archive, args.instances)
        print(f"study: {args.instances} CT instances, zip of "
              f"{archive.stat().st_size / 1e6:.0f} MB (deflated)")
        env = {port_env(s): str(free_port()) for s in SERVICES}
        log = open(args.log or root / "services.log", "a", buffering=1)  # noqa: SIM115
        stack = Stack(root / "data", env, emit=lambda n, line: log.write(f"{n:<9}| {line}\n"))
        try:
            started = time.monotonic()
            resolved = stack.start()
            stack.wait_ready(180)
            print(f"stack ready in {time.monotonic() - started:.1f}s")
            # The store as the services open it (their settings, from the same environment).
            store = open_store(RuntimeSettings(
                **{k[len("IMGEST_"):].lower(): v for k, v in resolved.items()
                   if k.startswith("IMGEST_") and k[len("IMGEST_"):].lower()
                   in RuntimeSettings.model_fields}))
            assert isinstance(store, LocalStore), "the embedded stack's store is local"
            for run in range(1, args.runs + 1):
                results.append(one_run(run, stack, resolved, store, archive, args))
        finally:
            stack.stop()
            log.close()

    n = args.instances
    runs = f", median of {len(results)} runs" if len(results) > 1 else ""
    print(f"\n{n} instances of one study ({results[0]['bytes'] / 1e6:.0f} MB), local store{runs}")
    print(f"{'':<42} {'seconds':>8} {'instances/s':>12}")
    for key, label, rate in ROWS:
        seconds = statistics.median(r[key] for r in results)
        print(f"{label:<42} {seconds:8.2f}" + (f" {n / seconds:12.0f}" if rate else ""))
    commit = statistics.median(r["commit"] for r in results)
    bare = statistics.median(r["bare_copies"] for r in results)
    print(f"the importer's commit runs at {bare / commit:.0%} of the bare copies' rate")


if __name__ == "__main__":
    main()
