"""imgest's ingestion beside Orthanc's and the machine's ceilings, in one run, against targets.

    uv run python bench/compare.py [--instances 1000] [--clients 4] [--tus-gb 5]
        [--latency-files 200] [--scenarios 1,2,3,4] [--skip-orthanc]
        [--profile SERVICE[,SERVICE]] [--log PATH] [--json PATH]

The data comes from `imgest bench gen`'s generator, in a temporary directory: a study of
`--instances` 512×512 16-bit CT slices (~525 KB each) and its stored zip, a second study as
large (scenario 2, so that it is not a repeat of the first), `--latency-files` one-slice studies
and one `--tus-gb` GiB file of random bytes. Everything is flushed to disk (sync) before each
measurement, so no write-back of the generation lands in one.

First the peers, with nothing of imgest running (bench/peers.py): Orthanc storing the first
study's files through `POST /instances` with one client and with `--clients`, the machine's
ceilings over the same files (fsync'd writes, DICOM headers, sha256, one thread each) and one
file of the tus size written and fsync'd, through the page cache and by O_DIRECT. (Orthanc with
`--clients` runs once more after imgest's scenarios, and the ratios are to the mean of its two
rates: on a shared host the machine's speed drifts within a run.) Then the
embedded stack (local store) once, warmed by one instance sent through it, and each scenario
into a project of its own (auto-archive):

1. the study as one zip through XNAT's import (`POST /data/services/import`,
   `import-handler=DICOM-zip`): instances/s from the first byte to archived, with the stages
   (stored, unpacked, first and every file validated, catalogue committed, archived);
2. the other study as one request per file from `--clients` clients into one upload session
   (create, add each file, submit): instances/s from the first byte to archived;
3. one file through tus (`/api/v1/tus/`, one PATCH): MB/s against the disk's fsync'd write
   rate through the page cache (the target's) and by O_DIRECT (as imgest writes the bulk of a
   big file), with the system CPU each write cost per MiB and the gateway's CPU per MiB; and
   the gateway's peak memory during it (the PSS of its processes, read whenever their resident
   size, checked every 50 ms, passes its largest yet, and every second);
4. `--latency-files` one-instance studies, one after the other, through XNAT's import
   (`import-handler=SI`): p50 and p95 from the first byte to archived.

"Archived" is when the gateway's status says so (every file archived, checked afterwards in
the upload's status and the catalogue): a thread reads the upload's rows in PostgreSQL every
20 ms, as bench/importer.py does, and notes when each state was first seen; so a figure may be
up to 20 ms late. Scenario 4 also gives the XNAT request's own time, which includes the
endpoint's wait for the outcome.

`--profile gateway,importer` records those services with py-spy (100 Hz, every thread) during
scenarios 1 and 2 and writes bench/results/profile-<service>-<scenario>.txt (samples by thread,
the top frames by own and by inclusive time) and .raw (collapsed stacks, for flamegraph tools),
and profile-kinds-<scenario>.txt: the working samples of every service profiled, by the kind of
work (hashing, files, unpacking, DICOM, SQL, the driver, JSON, Kafka, HTTP…) and by service.
A profile slows what it records: compare figures taken without one.

Below the table: the CPU seconds each part (every service, PostgreSQL, Tansu, the bench with its
clients, watcher, Orthanc and py-spy) used in each phase; and, per scenario and for Orthanc, the
CPU used per instance and the rate the cores would allow for that much work. No overlap of the
stages can beat that rate by much: a target above it needs less work, not better scheduling. (It
counts all the stack did during the scenario, its idle polling and the PostgreSQL side of the
watcher's queries too, about 0.1-0.3 of a core; Orthanc's CPU is counted while its clients send.)

Prints each figure, its target and MET/MISSED, and writes it all as JSON (default
bench/results/compare-<timestamp>.json). The bench's clients share the machine's cores with the
services, as Orthanc's do with Orthanc. Never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import peers
from common import TICK, ProcStat, gateway_client, memory_kb, peak_watch, proc_stat

from imgest.benchgen import write_study, write_zip
from imgest.infra import die_with_parent, exit_on_sigterm, free_port
from imgest.stack import SERVICES, Stack, port_env

MB = 1e6  # decimal, as the other benches print MB/s
GIB = 1024**3
POLL = 0.02  # seconds between two looks at an upload's rows
RESULTS = Path(__file__).resolve().parent / "results"
TERMINAL = {"archived", "prearchived", "partial", "failed", "cancelled"}
SUBJECT, SESSION = "SUBJ01", "SESS01"
STAGES = [  # scenario 1's stages: what the watcher sees, and what it means
    ("gateway:processing", "stored (the zip in the store, upload submitted)"),
    ("unpacked", "unpacked (every member staged)"),
    ("validated", "first file validated (the importer has it)"),
    ("importer:completing", "every file validated"),
    ("importer:cleaning", "catalogue committed"),
    ("gateway:archived", "archived (the gateway's status)"),
]


# --- watching uploads in PostgreSQL ---------------------------------------------------------


@dataclass
class Follow:
    """One upload being watched, by its id or its XNAT http-session-listener."""

    key: str
    upload_id: str | None = None
    state: str | None = None
    seen: dict[str, float] = field(default_factory=dict)  # state → time.time() first seen
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float, log: Path) -> None:
        if not self.done.wait(timeout):
            raise TimeoutError(f"upload {self.upload_id or self.key}: not finished after "
                               f"{timeout:.0f}s; seen {sorted(self.seen)}\n{tail(log)}")
        if self.state != "archived":
            raise RuntimeError(f"upload {self.upload_id}: {self.state}, not archived\n"
                               f"{tail(log)}")


class Watch(threading.Thread):
    """Reads the rows of the uploads followed every POLL seconds on one connection (plain
    selects: no lock): the gateway's state, the importer's, whether an archive of the upload is
    unpacked and whether the importer has a file's outcome; notes when each was first seen,
    until the gateway's state is terminal."""

    QUERY = ("select g.id, g.state, i.state as importer, exists(select 1 from "
             "gateway.upload_object o where o.upload_id = g.id and o.state = 'unpacked') as "
             "unpacked, exists(select 1 from importer.upload_file f where f.upload_id = g.id) "
             "as validated from gateway.upload g left join importer.upload i on i.id = g.id "
             "where g.id = $1 or g.options->>'listener' = $1")

    def __init__(self, url: str):
        super().__init__(daemon=True, name="upload-watch")
        self.url = url
        self.follows: list[Follow] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def follow(self, key: str) -> Follow:
        if self.error:
            raise self.error
        followed = Follow(key)
        with self.lock:
            self.follows.append(followed)
        return followed

    def run(self) -> None:
        try:
            asyncio.run(self._poll())
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            with self.lock:
                for followed in self.follows:
                    followed.state = f"unknown (the watch failed: {e!r})"
                    followed.done.set()

    async def _poll(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not self.stopping.is_set():
                with self.lock:
                    follows = list(self.follows)
                for followed in follows:
                    await self._look(conn, followed)
                await asyncio.sleep(POLL)
        finally:
            await conn.close()

    async def _look(self, conn: asyncpg.Connection, followed: Follow) -> None:
        row = await conn.fetchrow(self.QUERY, followed.upload_id or followed.key)
        now = time.time()
        if row is None:
            return
        followed.upload_id, followed.state = row["id"], row["state"]
        for key in (f"gateway:{row['state']}", f"importer:{row['importer']}",
                    "unpacked" if row["unpacked"] else None,
                    "validated" if row["validated"] else None):
            if key and not key.endswith(":None"):
                followed.seen.setdefault(key, now)
        if row["state"] in TERMINAL:
            with self.lock:
                self.follows.remove(followed)
            followed.done.set()


def tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "--- the services' log ends ---\n" + "\n".join(text)


# --- whether the machine was quiet -----------------------------------------------------------

QUIET = 0.05  # share of the machine (cores × seconds) others may use before a figure is flagged


def cpu_snapshot(roots: dict[int, str]
                 ) -> tuple[float, dict[str, float], dict[int, tuple[str, float]]]:
    """The machine's busy CPU seconds so far; ours by part: `roots` (pid → part: each service
    and Tansu as the bench's stack started them, PostgreSQL's server, started by us but
    daemonised) and their descendants, and "bench" for this process and its other descendants
    (clients, watcher, Orthanc, py-spy), each process counting its reaped children (an Orthanc
    that exited; a service restarted meanwhile: see `Quiet.phase`); and every other process's
    own, by pid (name, seconds)."""
    procs: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                procs[int(entry.name)] = proc_stat(entry.name)
            except OSError:  # gone meanwhile
                continue
    part: dict[int, str] = {}
    todo = [(os.getpid(), "bench"), *roots.items()]
    while todo:
        pid, name = todo.pop()
        part[pid] = roots.get(pid, name)
        todo += [(child, part[pid]) for child, p in procs.items()
                 if p.ppid == pid and child not in part]
    # user nice system: what processes used. Not irq and softirq, which no process is charged
    # with: among them the loopback network the bench's own uploads cross.
    cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]]
    machine = sum(cpu) / TICK
    mine: dict[str, float] = {}
    for pid, name in part.items():
        if pid in procs:
            mine[name] = mine.get(name, 0.0) + procs[pid].cpu + procs[pid].reaped
    return machine, mine, {pid: (p.name, p.cpu) for pid, p in procs.items() if pid not in part}


def cores() -> int:
    """The cores this process may run on (its affinity; a cgroup's quota is not seen)."""
    return len(os.sched_getaffinity(0))


SETTLED = 0.35  # cores the stack may use and count as settled (idle, it polls: 0.1–0.3)


def settle(roots: dict[int, str], database_url: str, longest: float = 120) -> float:
    """Waits until the stack is done with the scenario before (its work after the figure:
    staging emptied, statuses, autovacuum) and starts the next from the same state each time:
    PostgreSQL's dirty pages written (a checkpoint) and the page cache's (sync). Seconds it
    took."""
    t0 = time.monotonic()
    mine = sum(cpu_snapshot(roots)[1].values())
    quiet_for = 0
    while quiet_for < 2 and time.monotonic() - t0 < longest:
        time.sleep(0.5)
        now = sum(cpu_snapshot(roots)[1].values())
        quiet_for = quiet_for + 1 if (now - mine) / 0.5 < SETTLED else 0
        mine = now

    async def checkpoint() -> None:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await conn.execute("checkpoint")
        finally:
            await conn.close()

    asyncio.run(checkpoint())
    os.sync()
    return time.monotonic() - t0


class Quiet:
    """What other processes (the kernel's threads included) used while each phase ran."""

    def __init__(self) -> None:
        self.roots: Callable[[], dict[int, str]] = dict  # the stack's processes, when it runs
        self.phases: dict[str, dict[str, Any]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        roots = self.roots()
        machine, mine, others = cpu_snapshot(roots)
        t0 = time.monotonic()
        yield
        seconds = time.monotonic() - t0
        roots2 = self.roots()
        machine2, mine2, others2 = cpu_snapshot(roots2)
        ours = {part: mine2.get(part, 0.0) - mine.get(part, 0.0) for part in mine | mine2}
        used = (machine2 - machine) - sum(ours.values())
        busiest = sorted(((cpu - others.get(pid, ("", 0.0))[1], f"{pid} {comm}")
                          for pid, (comm, cpu) in others2.items()), reverse=True)[:3]
        self.phases[name] = {
            "seconds": seconds, "others_cpu_seconds": used,
            "ours_cpu_seconds": {part: round(cpu, 2) for part, cpu in sorted(
                ours.items(), key=lambda item: -item[1]) if abs(cpu) >= 0.01},
            # A process restarted meanwhile: its CPU went to the bench (which reaped it).
            "restarted": sorted({part for pid, part in roots.items() if pid not in roots2}),
            "others_share": used / (seconds * cores()),
            "busiest_others": {who: round(cpu, 2) for cpu, who in busiest if cpu >= 0.1}}

    def noisy(self) -> list[str]:
        return [f"{name}: other processes used {p['others_share']:.0%} of the machine "
                f"({p['others_cpu_seconds']:.1f} CPU s in {p['seconds']:.1f} s; busiest "
                f"{', '.join(f'{k} {v}s' for k, v in p['busiest_others'].items()) or '-'})"
                for name, p in self.phases.items() if p["others_share"] > QUIET]


# --- profiling ------------------------------------------------------------------------------


def py_spy() -> list[str]:
    """The dev group's py-spy, else uvx's."""
    ours = Path(sys.executable).parent / "py-spy"
    return [str(ours)] if ours.exists() else ["uvx", "py-spy"]


class Profiles:
    """py-spy recording the named services (their pids now) until stopped."""

    def __init__(self, stack: Stack, services: list[str], scratch: Path, scenario: int):
        assert stack.supervisor is not None
        self.scenario = scenario
        self.runs: list[tuple[str, subprocess.Popen, Path]] = []
        for name in services:
            pid = stack.supervisor.children[name].process.pid  # type: ignore[union-attr]
            raw = scratch / f"profile-{name}-{scenario}.raw"
            process = subprocess.Popen(
                [*py_spy(), "record", "-r", "100", "-f", "raw", "--threads", "--subprocesses",
                 "--pid", str(pid),
                 "-o", str(raw)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=die_with_parent())  # noqa: PLW1509 - a system call only
            self.runs.append((name, process, raw))
        time.sleep(1.0)  # py-spy attaches within a few hundred ms; the scenario comes after

    def stop(self) -> dict[str, Path]:
        """SIGINT makes py-spy write what it sampled; returns the summaries written."""
        written, sampled = {}, {}
        for _name, process, _raw in self.runs:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for name, process, raw in self.runs:
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            if not raw.exists():
                print(f"py-spy wrote nothing for {name}: {err.decode(errors='replace')[-500:]}")
                continue
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, RESULTS / raw.name)
            sampled[name] = raw.read_text()
            summary = RESULTS / raw.with_suffix(".txt").name
            summary.write_text(summarise(name, self.scenario, sampled[name]))
            written[name] = summary
        if sampled:
            kinds = RESULTS / f"profile-kinds-{self.scenario}.txt"
            kinds.write_text(work_kinds(sampled, self.scenario))
            written["kinds"] = kinds
        self.runs.clear()
        return written


# Leaves py-spy samples as active that are waits: a thread pool's idle workers, a lock. And the
# event loop itself: uvloop runs in C, so its polling (and its own I/O work) ends in Runner.run.
WAITS = ("Condition.wait (threading.py", "_worker (concurrent/futures/thread.py",
         "Queue.get (queue.py", "Event.wait (threading.py", "_wait_for_tstate_lock (threading.py")
LOOP = "Runner.run (asyncio/runners.py"
# Frames every stack of a thread passes through: left out of the inclusive ranking.
PLUMBING = {"_run_module_as_main (<frozen runpy>)", "_run_code (<frozen runpy>)",
            "Runner.run (asyncio/runners.py)", "run (uvicorn/main.py)",
            "asyncio_run (uvicorn/_compat.py)", "Server.run (uvicorn/server.py)",
            "serve (imgest_runtime/service.py)", "Thread._bootstrap (threading.py)",
            "Thread._bootstrap_inner (threading.py)", "Thread.run (threading.py)",
            "_worker (concurrent/futures/thread.py)"}


def samples(collapsed: str) -> Iterator[tuple[str, list[str], int, str]]:
    """py-spy's collapsed stacks: (thread, frames, samples, kind) per line; kind is waiting,
    the event loop, or Python at work."""
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        head, *frames = stack.split(";")
        while head.startswith("process ") and frames:  # --subprocesses: "process 1:"cmd";
            head, *frames = frames                        # process 2:"cmd";thread (2): …"
        leaf = frames[-1] if frames else ""
        kind = ("no Python frame" if not leaf else
                "waiting (a lock, an idle pool thread)" if leaf.startswith(WAITS) else
                "event loop (uvloop in C: polling, or its own I/O)" if leaf.startswith(LOOP)
                else "working (Python frames, or C called from them)")
        yield head, frames, int(count), kind


# What the work is, by the frame running (the first that matches): the bytes' own work, then
# what moves them between services and records them.
WORK_KINDS = [
    ("sha256 of the bytes", ("_Hashing.read",)),
    ("files: create, write, flush", ("imgest_runtime/store.py",)),
    ("unpacking (crc32, parsing)", ("stream_unzip/", "zipfile.py", "tarfile.py", "zlib")),
    ("DICOM headers (pydicom)", ("pydicom/",)),
    ("SQL statements (SQLAlchemy, SQLModel)", ("sqlalchemy/", "sqlmodel/")),
    ("PostgreSQL driver (asyncpg)", ("asyncpg/",)),
    ("JSON, pydantic, jsonschema", ("pydantic", "json/", "jsonschema", "referencing/")),
    ("Kafka client (aiokafka, FastStream)", ("aiokafka/", "faststream/", "fast_depends/")),
    ("HTTP (uvicorn, Starlette, FastAPI)",
     ("uvicorn/", "httptools", "starlette/", "fastapi/", "multipart/")),
    ("imgest's own code", ("imgest_",)),
    ("asyncio, threads", ("asyncio/", "threading.py", "concurrent/", "anyio/", "greenlet")),
    ("paths, os", ("pathlib.py", "os.py", "shutil.py")),
]


def work_kinds(profiles: dict[str, str], scenario: int) -> str:
    """The working samples of every service profiled, by kind of work, with each service's
    share: where the CPU of the whole pipeline goes."""
    by_kind: dict[str, Counter] = {}
    for service, collapsed in profiles.items():
        for _, frames, n, kind in samples(collapsed):
            if kind.startswith("working"):
                leaf = frames[-1]
                work = next((name for name, marks in WORK_KINDS
                             if any(mark in leaf for mark in marks)), "other")
                by_kind.setdefault(work, Counter())[service] += n
    total = sum(sum(c.values()) for c in by_kind.values()) or 1
    lines = [(f"py-spy, 100 Hz, during scenario {scenario}: the working samples of "
              f"{', '.join(profiles)} ({total}), by the kind of work running"),
             "(a thread in a system call counts as working: an fsync's wait is among the files')",
             ""]
    for work, per in sorted(by_kind.items(), key=lambda item: -sum(item[1].values())):
        lines.append(f"  {sum(per.values()) / total:6.1%}  {work:<40}" + "  ".join(
            f"{service} {n}" for service, n in per.most_common()))
    return "\n".join(lines) + "\n"


def summarise(service: str, scenario: int, collapsed: str, top: int = 30) -> str:
    """Samples by thread and by kind (waiting, the event loop, Python at work), then the frames
    of the work where the most samples were taken (own: the frame was running; inclusive: it
    was on the stack, counted once a sample)."""
    threads, kinds, own, inclusive = Counter(), Counter(), Counter(), Counter()
    for head, frames, n, kind in samples(collapsed):
        # "thread (1234): imgest-io_3" → "imgest-io": pools' threads counted together
        threads[head.split(": ", 1)[-1].rstrip("0123456789").rstrip("_-")] += n
        leaf = frames[-1] if frames else ""
        kinds[kind] += n
        if not kind.startswith("working"):
            continue
        own[leaf] += n
        for function in {f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in frames}:
            if function not in PLUMBING and not function.endswith("/__main__.py)"):
                inclusive[function] += n
    total = sum(threads.values()) or 1
    working = sum(own.values()) or 1
    lines = [(f"py-spy, 100 Hz, every thread and worker process, during scenario {scenario}: "
              f"{service}, {total} samples"), "", "by thread:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    lines += ["", "by kind:"] + [f"  {n / total:6.1%}  {k}" for k, n in kinds.most_common()]
    lines += ["", f"working, top {top} by own time (file:line), % of working samples:"]
    lines += [f"  {n / working:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", f"working, top {top} by inclusive time (per function):"]
    lines += [f"  {n / working:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


# --- the stack and its projects -------------------------------------------------------------


@dataclass
class Ctx:
    stack: Stack
    http: httpx.Client
    port: str
    watch: Watch
    log: Path
    timeout: float

    def project(self, project_id: str, files: int) -> str:
        created = self.http.post("/api/v1/projects", json={"id": project_id, "settings": {
            "auto_archive": "auto", "max_files_per_upload": max(1500, files + 10)}})
        assert created.status_code == 201, created.text
        return project_id

    def gateway_pid(self) -> int:
        return self.stack.supervisor.children["gateway"].process.pid  # type: ignore[union-attr]

    def check_archived(self, upload_id: str, project: str, files: int, study_uid: str) -> None:
        """The upload's status and the catalogue both hold every file, in one session."""
        status = self.http.get(f"/api/v1/uploads/{upload_id}").json()
        counts = status["counts"]
        assert status["state"] == "archived" and counts["archived"] == files, counts
        session = self.http.get(
            f"/api/v1/projects/{project}/subjects/{SUBJECT}/sessions/{SESSION}").json()
        catalogued = sum(scan["file_count"] for scan in session["scans"])
        assert session["study_uid"] == study_uid, session["study_uid"]
        assert catalogued == files, f"{catalogued} files catalogued of {files}"


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def chunks(path: Path, size: int = 1024 * 1024):
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def xnat_import(ctx: Ctx, body, length: int, handler: str, project: str, listener: str,
                content_type: str) -> httpx.Response:
    return ctx.http.post("/data/services/import", params={
        "import-handler": handler, "PROJECT_ID": project, "AA": "true",
        "http-session-listener": listener}, content=body,
        headers={"Content-Type": content_type, "Content-Length": str(length)},
        timeout=ctx.timeout)


# --- the scenarios --------------------------------------------------------------------------


def warm_up(ctx: Ctx, path: Path) -> None:
    """One instance through every service: imports, connections and consumer groups settled."""
    project = ctx.project("WARMUP", 1)
    followed = ctx.watch.follow(listener := uuid.uuid4().hex)
    answer = xnat_import(ctx, path.read_bytes(), path.stat().st_size, "SI", project, listener,
                         "application/dicom")
    assert answer.status_code == 200, answer.text
    followed.wait(ctx.timeout, ctx.log)


def scenario_zip(ctx: Ctx, archive: Path, files: list[Path]) -> dict[str, Any]:
    project = ctx.project("CMP1", len(files))
    followed = ctx.watch.follow(listener := uuid.uuid4().hex)
    t0 = time.time()
    answer = xnat_import(ctx, chunks(archive), archive.stat().st_size, "DICOM-zip",
                         project, listener, "application/zip")
    answered = time.time() - t0
    # 504: the endpoint stopped waiting (IMGEST_XNAT_IMPORT_WAIT_SECONDS); the watch goes on.
    assert answer.status_code in (200, 504), f"{answer.status_code} {answer.text}"
    followed.wait(ctx.timeout, ctx.log)
    ctx.check_archived(followed.upload_id, project, len(files), study_uid(files[0]))
    seconds = archived_after(followed, t0, answered if answer.status_code == 200 else None)
    return {"instances": len(files), "bytes": archive.stat().st_size, "seconds": seconds,
            "rate": len(files) / seconds, "xnat_answer": answer.status_code,
            "xnat_seconds": answered,
            "stages": {key: followed.seen[key] - t0 for key, _ in STAGES
                       if key in followed.seen}}


def archived_after(followed: Follow, t0: float, answered: float | None) -> float:
    """Seconds from t0 to archived: when the watch saw it, or when XNAT's import answered
    (it answers once its upload is archived) if that came first (the watch looks every POLL)."""
    seen = followed.seen["gateway:archived"] - t0
    return seen if answered is None else min(seen, answered)


def scenario_files(ctx: Ctx, files: list[Path], clients: int) -> dict[str, Any]:
    project = ctx.project("CMP2", len(files))
    http = [gateway_client(ctx.stack, ctx.port, ctx.timeout) for _ in range(clients)]
    pool = ThreadPoolExecutor(clients, thread_name_prefix="client")
    try:
        t0 = time.time()
        upload = ctx.http.post(f"/api/v1/projects/{project}/uploads",
                               json={"auto_archive": True})
        assert upload.status_code == 201, upload.text
        upload_id = upload.json()["id"]
        followed = ctx.watch.follow(upload_id)

        def add(i: int) -> None:
            response = http[i % clients].post(
                f"/api/v1/uploads/{upload_id}/files", params={"filename": files[i].name},
                content=files[i].read_bytes(), headers={"Content-Type": "application/dicom"})
            assert response.status_code == 201 and response.json()["added"] == 1, response.text

        list(pool.map(add, range(len(files))))
        added = time.time() - t0
        submitted = ctx.http.post(f"/api/v1/uploads/{upload_id}/submit")
        assert submitted.status_code == 200, submitted.text
        answered = time.time() - t0
        followed.wait(ctx.timeout, ctx.log)
    finally:
        pool.shutdown(cancel_futures=True)  # on a failure or Ctrl-C: no more requests
        for client in http:
            client.close()
    ctx.check_archived(upload_id, project, len(files), study_uid(files[0]))
    seconds = followed.seen["gateway:archived"] - t0
    return {"instances": len(files), "bytes": sum(p.stat().st_size for p in files),
            "clients": clients, "seconds": seconds, "rate": len(files) / seconds,
            "all_added": added, "submit_answered": answered}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def scenario_tus(ctx: Ctx, big: Path) -> dict[str, Any]:
    project = ctx.project("CMP3", 1)
    size = big.stat().st_size
    upload_id = ctx.http.post(f"/api/v1/projects/{project}/uploads", json={}).json()["id"]
    pid = ctx.gateway_pid()
    before = memory_kb(pid)
    stop, peak = threading.Event(), [before]
    watcher = threading.Thread(target=peak_watch, args=(pid, stop, peak), daemon=True)
    watcher.start()
    try:
        t0 = time.time()
        created = ctx.http.post("/api/v1/tus/", headers={
            "Tus-Resumable": "1.0.0", "Upload-Length": str(size),
            "Upload-Metadata": f"upload {b64(upload_id)},filename {b64(big.name)}"})
        assert created.status_code == 201, created.text
        patched = ctx.http.patch(created.headers["Location"], content=chunks(big), headers={
            "Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Length": str(size),
            "Content-Type": "application/offset+octet-stream"}, timeout=ctx.timeout)
        seconds = time.time() - t0
    finally:
        stop.set()
        watcher.join()
    assert patched.status_code == 204 and patched.headers["Upload-Offset"] == str(size), (
        patched.status_code, patched.text)
    objects = ctx.http.get(f"/api/v1/uploads/{upload_id}").json()["objects"]
    assert [(o["state"], o["size"]) for o in objects] == [("added", size)], objects
    # Never submitted (random bytes are no image): cancelling deletes the file at once.
    ctx.http.post(f"/api/v1/uploads/{upload_id}/cancel")
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / MB / seconds,
            "memory_before_mb": before / 1024, "memory_peak_mb": peak[0] / 1024}


def scenario_latency(ctx: Ctx, files: list[Path]) -> dict[str, Any]:
    project = ctx.project("CMP4", 1)
    archived, answered, committed = [], [], []
    for path in files:
        followed = ctx.watch.follow(listener := uuid.uuid4().hex)
        body = path.read_bytes()
        t0 = time.time()
        answer = xnat_import(ctx, body, len(body), "SI", project, listener,
                             "application/dicom")
        answered.append(time.time() - t0)
        assert answer.status_code == 200, answer.text
        followed.wait(ctx.timeout, ctx.log)
        archived.append(archived_after(followed, t0, answered[-1]))
        # (a state shorter than POLL may be missed: then the next one)
        done = [followed.seen[k] for k in ("importer:cleaning", "importer:completed")
                if k in followed.seen]
        if done:
            committed.append(min(done) - t0)
    return {"files": len(files), "bytes_each": files[0].stat().st_size,
            **percentiles("archived", archived), **percentiles("xnat", answered),
            **percentiles("committed", committed), "archived_seconds": archived,
            "xnat_seconds": answered, "committed_seconds": committed}


def percentiles(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) < 2:
        return {f"{name}_p50": values[0], f"{name}_p95": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"{name}_p50": statistics.median(values), f"{name}_p95": cuts[94]}


# --- the peers ------------------------------------------------------------------------------


def run_peers(args: argparse.Namespace, files: list[Path], tus_bytes: int, root: Path,
              quiet: Quiet) -> dict[str, Any]:
    found: dict[str, Any] = {}
    (root / "scratch").mkdir()
    if args.scenarios & {1, 2}:
        os.sync()
        print("ceilings over the study's files…", flush=True)
        with quiet.phase("ceilings"):
            found["ceilings"] = peers.ceilings(files, root / "scratch")
        if not args.skip_orthanc:
            for clients in sorted({1, args.clients}):
                run_orthanc(files, clients, root, quiet, found)
    if 3 in args.scenarios:
        os.sync()
        print(f"the disk writing {tus_bytes / GIB:g} GiB…", flush=True)
        with quiet.phase("disk write"):
            found["disk_write"] = peers.disk_write_rate(root / "scratch", tus_bytes)
        with quiet.phase("disk write, O_DIRECT"):
            try:
                found["disk_write_direct"] = peers.disk_write_rate(root / "scratch", tus_bytes,
                                                                   direct=True)
            except OSError as e:  # a file system without O_DIRECT: no such row
                print(f"  the disk refused O_DIRECT writes: {e}")
    return found


def run_orthanc(files: list[Path], clients: int, root: Path, quiet: Quiet,
                found: dict[str, Any], again: bool = False) -> None:
    """Orthanc storing the study with `clients` clients, into found["orthanc_<clients>"] (or,
    `again`, after imgest's scenarios: "..._again")."""
    name, key = f"Orthanc, {clients} client(s)", f"orthanc_{clients}"
    if again:
        name, key = name + ", again", key + "_again"
    os.sync()
    print(f"{name}…", flush=True)
    try:
        with quiet.phase(name):
            result = peers.orthanc_ingest(files, clients, root / key)
        found[key] = {**asdict(result), "rate": result.rate}
    except Exception as e:  # noqa: BLE001 - said in the table; imgest still runs
        found[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  Orthanc failed: {e}")
    # (Its storage is kept until the run ends: see peers.ceilings.)


def orthanc_rate(found: dict[str, Any], clients: int) -> tuple[float, str] | None:
    """Orthanc's rate with `clients` clients, for the ratios: the mean of its runs before and
    after imgest's (the machine's speed drifts on a shared host: 339-494/s across this VM's
    runs), and how it was made."""
    rates = [found[key]["rate"] for key in (f"orthanc_{clients}", f"orthanc_{clients}_again")
             if "rate" in found.get(key, {})]
    if not rates:
        return None
    if len(rates) == 1:
        return rates[0], f"{rates[0]:.0f}/s"
    return sum(rates) / 2, f"{rates[0]:.0f}, then {rates[1]:.0f}/s"


# --- the report -----------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    figure: str
    target: str = ""
    met: bool | None = None  # None: no target, or nothing to compare with

    def line(self) -> str:
        verdict = {True: "MET", False: "MISSED", None: ""}[self.met]
        return f"{self.label:<58}{self.figure:>16}  {self.target:<10}{verdict}"


def ratio_rows(rate: float, found: dict[str, Any], target: float, clients: int) -> list[Row]:
    rows = []
    orthanc = orthanc_rate(found, clients)
    if orthanc:
        ratio = rate / orthanc[0]
        rows.append(Row(f"  ÷ Orthanc, {clients} clients ({orthanc[1]})",
                        f"{ratio:.2f}×", f"≥ {target:g}×", ratio >= target))
    elif "error" in found.get(f"orthanc_{clients}", {}):
        rows.append(Row(f"  ÷ Orthanc, {clients} clients", "failed", f"≥ {target:g}×"))
    for name, figures in found.get("ceilings", {}).items():
        rows.append(Row(f"  ÷ ceiling {name} ({figures['files_per_s']:.0f} files/s)",
                        f"{rate / figures['files_per_s']:.0%}"))
    return rows


def cpu_rows(used: float, instances: int, mark: str = "") -> list[Row]:
    """What the system measured (imgest's services, PostgreSQL and Tansu; or Orthanc) used of
    the cores, per instance; and the rate these cores would allow if that work were spread over
    all of them without a gap: what no change of order or overlap can beat."""
    if not used:
        return []
    return [Row("  CPU used per instance (bench clients apart)",
                f"{used / instances * 1000:.1f} ms" + mark),
            Row(f"  rate {cores()} cores allow for that work",
                f"{instances * cores() / used:.0f}" + mark)]


def imgest_cpu(phase: dict[str, Any] | None) -> float:
    """CPU seconds imgest's services, PostgreSQL and Tansu used in a phase."""
    return sum(v for k, v in (phase or {}).get("ours_cpu_seconds", {}).items() if k != "bench")


def profiled(result: dict[str, Any]) -> str:
    """Marks a figure taken with py-spy attached (slower than without)."""
    return " (py-spy)" if result.get("profiles") else ""


def report(args: argparse.Namespace, found: dict[str, Any], results: dict[str, Any],
           phases: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    if 1 in results:
        r = results[1]
        rows.append(Row(f"1 one zip ({r['bytes'] / MB:.0f} MB) via XNAT import, instances/s",
                        f"{r['rate']:.0f}" + profiled(r)))
        rows += ratio_rows(r["rate"], found, 1.5, args.clients)
        rows += cpu_rows(imgest_cpu(phases.get("scenario 1")), r["instances"], profiled(r))
        rows += [Row(f"  {text}", f"{r['stages'][key]:.2f} s") for key, text in sorted(
            (s for s in STAGES if s[0] in r["stages"]), key=lambda s: r["stages"][s[0]])]
    if 2 in results:
        r = results[2]
        rows.append(Row(f"2 {r['instances']} requests, {r['clients']} clients, upload "
                        "session, instances/s", f"{r['rate']:.0f}" + profiled(r)))
        rows += ratio_rows(r["rate"], found, 1.0, args.clients)
        rows += cpu_rows(imgest_cpu(phases.get("scenario 2")), r["instances"], profiled(r))
        rows.append(Row("  every file added (first byte → last 201)", f"{r['all_added']:.2f} s"))
        rows.append(Row("  submit answered", f"{r['submit_answered']:.2f} s"))
    if 3 in results:
        r = results[3]
        rows.append(Row(f"3 one {r['bytes'] / GIB:g} GiB file via tus, MB/s",
                        f"{r['mb_per_s']:.0f}"))
        disk = found.get("disk_write")
        if disk:
            share = r["mb_per_s"] / disk["mb_per_s"]
            rows.append(Row(f"  ÷ disk write + fsync ({disk['mb_per_s']:.0f} MB/s)",
                            f"{share:.0%}", "≥ 70 %", share >= 0.7))
            if "kernel_ms_per_mib" in disk:  # what writing itself costs the CPU here
                rows.append(Row("  the disk write's kernel CPU per MiB",
                                f"{disk['kernel_ms_per_mib']:.2f} ms"))
        direct = found.get("disk_write_direct")
        if direct:  # the way imgest writes the bulk of a big file (store._DirectWriter)
            rows.append(Row(f"  ÷ disk write by O_DIRECT + fsync ({direct['mb_per_s']:.0f} MB/s)",
                            f"{r['mb_per_s'] / direct['mb_per_s']:.0%}"))
            rows.append(Row("  that write's kernel CPU per MiB",
                            f"{direct['kernel_ms_per_mib']:.2f} ms"))
        gateway_cpu = phases.get("scenario 3", {}).get("ours_cpu_seconds", {}).get("gateway")
        if gateway_cpu:
            rows.append(Row("  the gateway's CPU per MiB (HTTP, sha256, writing)",
                            f"{gateway_cpu * 1000 / (r['bytes'] / 1024**2):.2f} ms"))
        rows.append(Row(f"  gateway peak memory, all its processes (was "
                        f"{r['memory_before_mb']:.0f} MB before)",
                        f"{r['memory_peak_mb']:.0f} MB", "< 300 MB", r["memory_peak_mb"] < 300))
    if 4 in results:
        r = results[4]
        rows.append(Row(f"4 one instance ({r['bytes_each'] / 1000:.0f} KB), upload → archived, "
                        f"{r['files']} files", ""))
        rows.append(Row("  p50", f"{r['archived_p50'] * 1000:.0f} ms", "< 500 ms",
                        r["archived_p50"] < 0.5))
        rows.append(Row("  p95", f"{r['archived_p95'] * 1000:.0f} ms"))
        if "committed_p50" in r:
            rows.append(Row("  p50 to the catalogue committed (the importer)",
                            f"{r['committed_p50'] * 1000:.0f} ms"))
        rows.append(Row("  p50 of the XNAT request (answers after the outcome)",
                        f"{r['xnat_p50'] * 1000:.0f} ms", "< 500 ms", r["xnat_p50"] < 0.5))
        rows.append(Row("  p95 of the XNAT request", f"{r['xnat_p95'] * 1000:.0f} ms"))
    for clients in sorted({1, args.clients}):
        for key, when in ((f"orthanc_{clients}", ""), (f"orthanc_{clients}_again", ", again")):
            orthanc = found.get(key, {})
            if "rate" in orthanc:
                rows.append(Row(f"Orthanc POST /instances, {clients} client(s){when}, "
                                "instances/s", f"{orthanc['rate']:.0f}"))
                rows += cpu_rows(orthanc.get("cpu", 0.0), orthanc["instances"])
    return rows


def cpu_lines(phases: dict[str, dict[str, Any]]) -> list[str]:
    """CPU seconds by part in each phase, for the table's CPU rows."""
    return [f"{name}: {p['seconds']:.1f} s, CPU s used: " + ", ".join(
                f"{part} {cpu:.2f}" for part, cpu in p["ours_cpu_seconds"].items())
            + (f" (restarted meanwhile, its CPU counted as the bench's: "
               f"{', '.join(p['restarted'])})" if p.get("restarted") else "")
            for name, p in phases.items() if p.get("ours_cpu_seconds")]


def git_state() -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=Path(__file__).parent, check=False,
                              capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000,
                        help="CT slices of the study (scenarios 1, 2 and the peers).")
    parser.add_argument("--clients", type=int, default=4,
                        help="Concurrent clients of scenario 2 and of Orthanc's second run.")
    parser.add_argument("--tus-gb", type=float, default=5.0, help="Scenario 3's file, GiB.")
    parser.add_argument("--latency-files", type=int, default=200,
                        help="One-instance studies sent one after the other (scenario 4).")
    parser.add_argument("--scenarios", default="1,2,3,4", help="Which to run, e.g. 1,3.")
    parser.add_argument("--skip-orthanc", action="store_true", help="No Orthanc runs.")
    parser.add_argument("--profile", default="", metavar="SERVICE[,SERVICE]",
                        help="py-spy these services during scenarios 1 and 2.")
    parser.add_argument("--log", type=Path, help="Keep the services' log here.")
    parser.add_argument("--json", type=Path, help="Where the JSON goes (default "
                        "bench/results/compare-<timestamp>.json).")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="Seconds one upload may take to be archived.")
    args = parser.parse_args()
    try:
        args.scenarios = {int(s) for s in args.scenarios.split(",") if s.strip()}
    except ValueError:
        parser.error("--scenarios: numbers from 1 to 4, e.g. 1,2")
    if not args.scenarios or not args.scenarios <= {1, 2, 3, 4}:
        parser.error("--scenarios: numbers from 1 to 4, e.g. 1,2")
    args.profile = [s for s in args.profile.split(",") if s]
    if set(args.profile) - set(SERVICES):
        parser.error(f"--profile: services are {', '.join(SERVICES)}")
    if args.profile and not args.scenarios & {1, 2}:
        parser.error("--profile records during scenarios 1 and 2, neither of which is run")
    if min(args.instances, args.clients, args.latency_files) < 1 or args.tus_gb <= 0:
        parser.error("--instances, --clients, --latency-files and --tus-gb must be positive")
    return args


def generate(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    data: dict[str, Any] = {"warm": write_study(root / "warm", 1, seed=9, project="WARMUP",
                                                session=SESSION)}
    if args.scenarios & {1, 2}:
        data["study"] = write_study(root / "s1", args.instances, seed=1, project="CMP1",
                                    subject=SUBJECT, session=SESSION)
        data["zip"] = write_zip(data["study"], root / "study.zip", SESSION)
    if 2 in args.scenarios:
        data["study2"] = write_study(root / "s2", args.instances, seed=2, project="CMP2",
                                     subject=SUBJECT, session=SESSION)
    if 4 in args.scenarios:
        # A study each: onto an archived session a second file would be a CONFLICT.
        data["latency"] = [write_study(root / "lat" / f"{i}", 1, seed=4, project="CMP4",
                                       subject=SUBJECT, session=f"LAT{i:04d}")[0]
                           for i in range(args.latency_files)]
    if 3 in args.scenarios:
        data["big"] = root / "big.bin"
        block = os.urandom(8 * 1024 * 1024)
        with data["big"].open("wb") as f:
            for left in range(int(args.tus_gb * GIB), 0, -len(block)):
                f.write(block[:left])
    os.sync()
    size = sum(p.stat().st_size for p in data.get("study", []))
    print(f"data generated in {time.monotonic() - t0:.0f}s (the study: {size / MB:.0f} MB)",
          flush=True)
    return data


def run_imgest(args: argparse.Namespace, data: dict[str, Any], root: Path, log_path: Path,
               quiet: Quiet) -> dict[int, Any]:
    env = {port_env(s): str(free_port()) for s in SERVICES}
    env["IMGEST_MAX_UPLOAD_BYTES"] = str(int(args.tus_gb * GIB) + 1024**2)
    log = log_path.open("a", buffering=1)
    stack = Stack(root / "data", env, emit=lambda n, line: log.write(f"{n:<9}| {line}\n"))
    results: dict[int, Any] = {}
    watch: Watch | None = None
    try:
        started = time.monotonic()
        resolved = stack.start()
        stack.wait_ready(180)
        assert stack.postgres is not None, "the embedded stack's PostgreSQL"
        postmaster = int((stack.postgres.directory / "postmaster.pid").read_text()
                         .split()[0])
        supervisor = stack.supervisor
        assert supervisor is not None
        quiet.roots = lambda: {postmaster: "postgres", **{
            child.process.pid: name for name, child in supervisor.children.items()
            if child.process is not None}}
        watch = Watch(resolved["IMGEST_DATABASE_URL"].replace("postgresql+asyncpg",
                                                               "postgresql"))
        watch.start()
        port = resolved["IMGEST_GATEWAY_PORT"]
        ctx = Ctx(stack, gateway_client(stack, port, args.timeout), port, watch, log_path,
                  args.timeout)
        warm_up(ctx, data["warm"][0])
        print(f"stack ready and warm in {time.monotonic() - started:.1f}s", flush=True)
        scenarios = {1: lambda: scenario_zip(ctx, data["zip"], data["study"]),
                     2: lambda: scenario_files(ctx, data["study2"], args.clients),
                     3: lambda: scenario_tus(ctx, data["big"]),
                     4: lambda: scenario_latency(ctx, data["latency"])}
        for number in sorted(args.scenarios):
            settled = settle(quiet.roots(), resolved["IMGEST_DATABASE_URL"])
            print(f"scenario {number}… (the stack settled in {settled:.1f}s)", flush=True)
            profiles = (Profiles(stack, args.profile, root, number)
                        if args.profile and number in (1, 2) else None)
            try:
                with quiet.phase(f"scenario {number}"):
                    results[number] = scenarios[number]()
            finally:
                written = profiles.stop() if profiles else {}
            if written:
                results[number]["profiles"] = {name: str(path) for name, path in written.items()}
    finally:
        if watch:
            watch.stopping.set()
            watch.join(5)  # its connection closed before PostgreSQL stops
        stack.stop()
        quiet.roots = dict
        log.close()
    return results


def main() -> None:
    exit_on_sigterm()
    args = parse_args()
    started = datetime.now()
    with tempfile.TemporaryDirectory(prefix="imgest-compare-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        data = generate(args, root)
        quiet = Quiet()
        found = run_peers(args, data.get("study", []), int(args.tus_gb * GIB), root, quiet)
        results = run_imgest(args, data, root, args.log or root / "services.log", quiet)
        if args.scenarios & {1, 2} and not args.skip_orthanc:
            run_orthanc(data["study"], args.clients, root, quiet, found, again=True)

    rows = report(args, found, results, quiet.phases)
    study = (f"; studies of {args.instances} CT instances of 512×512, 16-bit"
             if args.scenarios & {1, 2} else "")
    print(f"\nimgest against Orthanc and the machine ({cores()} cores){study}")
    print(f"{'':<58}{'figure':>16}  {'target':<10}")
    for row in rows:
        print(row.line())
    print("\nCPU by part (\"bench\": its clients, watcher, ceilings, Orthanc and py-spy):")
    for line in cpu_lines(quiet.phases):
        print(f"  {line}")
    for line in quiet.noisy():
        print(f"NOT QUIET: {line}")
    out = args.json or RESULTS / f"compare-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "cores": cores(),
        "git": git_state(), "args": {**vars(args), "scenarios": sorted(args.scenarios),
                                     "log": str(args.log) if args.log else None,
                                     "json": str(out)},
        "peers": found, "scenarios": {str(k): v for k, v in results.items()},
        "quiet": quiet.phases,
        "table": [{"label": r.label.strip(), "figure": r.figure, "target": r.target,
                   "met": r.met} for r in rows]}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
