"""How fast the importer commits a study into its session: instances/s, against bare copies.

    uv run python bench/importer.py [--instances 1000] [--runs 1] [--log services.log]

On the embedded stack (local store) in a temporary directory, uploads one zip of a one-study
CT (`--instances` 512×512 16-bit slices, bench/unpack.py's generator) into a project of its own
and waits for the gateway to say `archived`. Meanwhile a thread reads the upload's rows in the
database every 20 ms, the importer's (`importer.upload`: state, updated_at) and the gateway's
(its state: the bench sends the gateway no request until the end), and notes when each state
was first seen:

  commit             `completing` → `cleaning`: the batch that recorded the last file has
                     committed; the importer plans the session, copies every staged object to
                     its archive key (server-side, one thread), writes the catalogue and the
                     outgoing events in one transaction;
  commit + cleanup   `completing` → `completed`: and empties the upload's staging.

Inside the commit, the importer's own completion line in the services' log splits it into the
plan, the copies (on the local store, hard links where the file system allows) and the catalogue
transaction. For comparison, in the same store before the stack stops: the same objects copied
with the store's own `copy()` in one thread to a scratch prefix, then that prefix emptied with
`delete_prefix()`, as the importer empties staging. Each run also prints the CPU time each
service, PostgreSQL and the rest of the machine used during the commit (/proc), and says so
if other processes disturbed it. Never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import TICK, gateway_client, proc_stat
from imgest_runtime.settings import RuntimeSettings
from imgest_runtime.store import LocalStore, open_store
from unpack import build_zip

from imgest.infra import exit_on_sigterm, free_port
from imgest.stack import SERVICES, Stack, port_env

POLL = 0.02  # seconds between two looks at the upload's rows
PHASES = re.compile(r"\(plan (?P<plan>[\d.]+)s, copies (?P<copies>[\d.]+)s, catalogue "
                    r"(?P<catalogue>[\d.]+)s\)")  # the importer's completion line
QUIET = 1.0  # CPU seconds other processes (the kernel's included), or the hypervisor (steal),
# may take during the commit before the bench says its figures are disturbed


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




def postmaster_pid(url: str) -> int:
    data_dir = query(url, "select setting from pg_settings where name = 'data_directory'")
    return int((Path(data_dir[0]["setting"]) / "postmaster.pid").read_text().split()[0])


def cpu_seconds(pids: dict[str, int], postmaster: int) -> dict[str, float]:
    """CPU time used so far by each of our processes, by PostgreSQL's (the server and its
    children), by every other process (as "~pid name") and by the whole machine."""
    used = dict.fromkeys([*pids, "postgres"], 0.0)
    names = {pid: name for name, pid in pids.items()}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            comm, ppid, cpu, _ = proc_stat(pid)
        except OSError:  # gone meanwhile
            continue
        if pid in names:
            used[names[pid]] += cpu
        elif postmaster in (pid, ppid):
            used["postgres"] += cpu
        else:
            used[f"~{pid} {comm}"] = cpu
    # user nice system idle iowait irq softirq steal: busy is all but idle, iowait and steal
    # (time the hypervisor gave to other machines, which no process here used).
    cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    used["machine"] = (sum(cpu[:7]) - cpu[3] - cpu[4]) / TICK
    used["steal"] = cpu[7] / TICK
    return used


class StateWatch(threading.Thread):
    """Reads the upload's rows, the importer's and the gateway's, every POLL seconds (one
    connection, plain selects: no lock) until the importer says `completed` and the gateway no
    longer `processing`. `seen[state]` is when a state was first seen (time.time()),
    `stamped[state]` the importer row's own updated_at then (the same host's clock), `cpu[state]`
    the processes' CPU time then; gateway states are seen as `gateway:<state>`."""

    def __init__(self, url: str, upload_id: str, pids: dict[str, int], postmaster: int):
        super().__init__(daemon=True, name="state-watch")
        self.url, self.upload_id = url, upload_id
        self.pids, self.postmaster = pids, postmaster
        self.seen: dict[str, float] = {}
        self.stamped: dict[str, float] = {}
        self.cpu: dict[str, dict[str, float]] = {}
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
                row = await conn.fetchrow(
                    "select i.state, i.updated_at, g.state as gateway from gateway.upload g "
                    "left join importer.upload i on i.id = g.id where g.id = $1",
                    self.upload_id)
                now = time.time()
                if row["state"] is not None and row["state"] not in self.seen:
                    self.seen[row["state"]] = now
                    self.stamped[row["state"]] = row["updated_at"].timestamp()
                    self.cpu[row["state"]] = cpu_seconds(self.pids, self.postmaster)
                self.seen.setdefault(f"gateway:{row['gateway']}", now)
                if row["state"] == "completed" and row["gateway"] not in (
                        "processing", "cancelling"):
                    return
                await asyncio.sleep(POLL)
        finally:
            await conn.close()


def one_run(run: int, stack: Stack, env: dict[str, str], store: LocalStore, archive: Path,
            log_path: Path, args: argparse.Namespace) -> dict[str, float]:
    http = gateway_client(stack, env["IMGEST_GATEWAY_PORT"], timeout=600)
    url = asyncpg_url(env)
    assert stack.supervisor is not None
    pids = {name: child.process.pid for name, child in stack.supervisor.children.items()
            if child.process is not None} | {"bench": os.getpid()}
    # A project per run: the same zip again in one project would be duplicates, not imports.
    project = f"BENCH{run}"
    created = http.post("/api/v1/projects", json={"id": project, "settings": {
        "max_files_per_upload": max(1500, args.instances + 10)}})
    assert created.status_code == 201, created.text
    t0 = time.time()
    with archive.open("rb") as body:
        response = http.post("/api/v1/uploads", params={"filename": "study.zip",
                                                        "project": project}, content=body)
    assert response.status_code == 201, response.text
    stored = time.time() - t0
    upload_id = response.json()["id"]
    # Started once the POST answered: the importer cannot be near `completing` before the
    # gateway has even submitted the upload. No requests to the gateway until it is over:
    # the watcher's selects are all the bench adds to the machine meanwhile.
    watch = StateWatch(url, upload_id, pids, postmaster_pid(url))
    watch.start()
    if not watch.done.wait(args.timeout):
        raise TimeoutError(f"upload {upload_id}: not finished after {args.timeout:.0f}s; "
                           f"seen {sorted(watch.seen)}")
    if watch.error:
        raise watch.error
    state = http.get(f"/api/v1/uploads/{upload_id}").json()["state"]
    assert state == "archived", state

    rows = query(url, "select object_key, size from importer.file where upload_id = $1",
                 upload_id)
    keys = [r["object_key"] for r in rows]
    sessions = query(url, "select count(distinct s.session_id) as n from importer.scan s join "
                     "importer.file f on f.scan_id = s.id where f.upload_id = $1", upload_id)
    assert len(keys) == args.instances, f"{len(keys)} catalogued of {args.instances}"
    assert sessions[0]["n"] == 1, f"{sessions[0]['n']} sessions, not 1"
    deadline = time.monotonic() + 30
    while not (phases := PHASES.search(log_path.read_text().split(
            f"upload {upload_id} completed")[-1])):  # (written once staging is emptied)
        assert time.monotonic() < deadline, "the importer's completion line is not in its log"
        time.sleep(0.1)

    # The ceiling: the same objects (now archived, as warm in the page cache as the staged ones
    # were), copied by the store in one thread as the importer does, then the copies deleted
    # as the importer empties staging.
    scratch = f"bench-scratch/{upload_id}/"
    c0 = time.time()
    for i, key in enumerate(keys):
        store.copy(key, f"{scratch}{i:06d}")
    copies = time.time() - c0
    c0 = time.time()
    deleted = store.delete_prefix(scratch)
    deletes = time.time() - c0
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
        "before_copies": float(phases["plan"]),
        "copies": float(phases["copies"]),
        "after_copies": float(phases["catalogue"]),
        "bare_copies": copies,
        "bare_copies_delete": copies + deletes,
        "stored": stored,
        "to_completing": completing - t0,
        "archived": seen["gateway:archived"] - t0,
        "bytes": sum(r["size"] for r in rows),
    }
    print(f"run {run}: stored in {stored:.1f}s, importer completing after "
          f"{result['to_completing']:.1f}s, gateway archived after {result['archived']:.1f}s; "
          f"commit {result['commit']:.2f}s, with cleanup {result['commit_cleanup']:.2f}s; "
          f"bare copies {copies:.2f}s, + delete {deletes:.2f}s")
    if "completing" in watch.cpu and "cleaning" in watch.cpu:
        before, after = watch.cpu["completing"], watch.cpu["cleaning"]
        # Other processes by pid alone: a kernel worker's name changes with its work.
        earlier = {k.split()[0]: v for k, v in before.items()}
        used = {k: v - earlier.get(k.split()[0], 0.0) for k, v in after.items()}
        machine, steal = used.pop("machine"), used.pop("steal")
        ours = {k: v for k, v in used.items() if not k.startswith("~")}
        others = machine - sum(ours.values())
        result["disturbed"] = max(others, steal)
        print(f"  CPU seconds during the commit ({os.cpu_count()} cores × "
              f"{result['commit']:.2f}s): " + ", ".join(
                  f"{k} {v:.2f}" for k, v in sorted(ours.items(), key=lambda kv: -kv[1]))
              + f", other processes {others:.2f}; machine {machine:.2f}; stolen by the "
              f"hypervisor {steal:.2f}")
        busiest = sorted(((v, k.split(maxsplit=1)[1]) for k, v in used.items()
                          if k.startswith("~")),
                         reverse=True)[:3]
        if busiest and busiest[0][0] >= 0.1:
            print("  busiest other processes: " + ", ".join(
                f"{name} {v:.2f}" for v, name in busiest if v >= 0.1))
        if result["disturbed"] > QUIET:
            print(f"  NOT QUIET: other processes used {others:.1f} CPU seconds during the "
                  f"commit, the hypervisor took {steal:.1f}; its figures are disturbed")
    return result


ROWS = [  # key, label, rate shown (instances/s)
    ("commit", "importer commit (completing → cleaning)", True),
    ("before_copies", "  plan", False),
    ("copies", "  copies", False),
    ("after_copies", "  catalogue, file states and events", False),
    ("commit_cleanup", "importer commit + cleanup (→ completed)", True),
    ("commit_cleanup_stamped", "  the same by the row's own stamps", True),
    ("bare_copies", "bare store.copy(), one thread", True),
    ("bare_copies_delete", "  + delete_prefix()", True),
    ("to_completing", "upload → importer completing", True),
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
        log_path = args.log or root / "services.log"
        log = open(log_path, "a", buffering=1)  # noqa: SIM115
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
                results.append(one_run(run, stack, resolved, store, archive, log_path, args))
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
    busy = sum(r.get("disturbed", 0) > QUIET for r in results)
    if busy:
        print(f"NOT QUIET: other processes were busy during {busy} of {len(results)} commit(s)")


if __name__ == "__main__":
    main()
