"""The peer and the ceilings imgest's ingestion is compared with: Orthanc, and the machine.

    uv run python bench/peers.py [--instances 1000] [--clients 1 4] [--runs 1] [--disk-gb 1]

Generates `--instances` CT instances (512×512 16-bit, ~525 KB, bench/unpack.py's generator) in
a temporary directory, then:

1. Orthanc (Debian's package, installed with apt-get if missing) fresh and empty for each run,
   its defaults but for ports, paths and authentication: every file POSTed to `/instances` by
   each `--clients` count of threads, one keep-alive connection each;
2. the machine's ceilings over the same files: writing each to disk with an fsync, reading its
   DICOM header (pydicom, up to the pixel data) and its sha256;
3. one big file (`--disk-gb`) written and fsynced, through the page cache and by O_DIRECT: the
   ceilings for a multi-GB tus upload.

bench/compare.py imports this module to set imgest's figures beside them. Never part of the
tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import pydicom
from imgest_runtime.store import DIRECT_ALIGN
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import TICK, proc_stat
from unpack import instance

from imgest.infra import die_with_parent, exit_on_sigterm, free_port

MB = 1e6  # MB/s as the other benches print them: decimal megabytes
MIB = 1024 * 1024
START_TIMEOUT = 60.0  # seconds for Orthanc to answer GET /system
STOP_TIMEOUT = 30.0  # seconds Orthanc has to exit on SIGTERM before SIGKILL


@dataclass
class IngestResult:
    instances: int  # instances Orthanc reports stored after the run
    seconds: float  # from the first byte sent to the last response received
    bytes: int  # bytes sent
    clients: int
    others_cpu: float = 0.0  # CPU seconds other processes (or the hypervisor) took meanwhile
    cpu: float = 0.0  # CPU seconds Orthanc itself used meanwhile

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


class OthersCpu:
    """CPU seconds the machine was busy with anything but this process and `pids` (Orthanc)
    between start() and stop(): other processes, kernel threads, and time the hypervisor gave to
    other machines (steal). Another bench running alongside shows here, not in the figures."""

    def __init__(self, pids: tuple[int, ...] = ()):
        self.pids = pids
        self.seconds = 0.0

    def _now(self) -> float:
        # user nice system idle iowait irq softirq steal; interrupts are left out: ours (the
        # loopback, the disk) would count against the others.
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (cpu[0] + cpu[1] + cpu[2] + cpu[7]) / TICK
        own = os.times()
        mine = own.user + own.system
        return busy - mine - sum(proc_stat(pid).cpu for pid in self.pids)

    def start(self) -> None:
        self.seconds = -self._now()

    def stop(self) -> float:
        self.seconds += self._now()
        return self.seconds


def _orthanc_binary() -> str | None:
    # /usr/sbin is not on every PATH (a non-login shell, a CI runner).
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")


def ensure_orthanc() -> str:
    """The path of the Orthanc binary, installing Debian's `orthanc` package if it is missing."""
    if found := _orthanc_binary():
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError("Orthanc is not installed, and installing Debian's `orthanc` package "
                           "needs apt-get and root")
    # Without systemd here the package cannot start its daemon anyway; a policy-rc.d that says
    # 101 ("action forbidden") keeps its init script from trying, on machines with one too.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "orthanc"]
    try:
        done = subprocess.run(install, check=False, env=env, capture_output=True, text=True)
        if done.returncode != 0:  # most often a stale or empty package list
            subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True)
            done = subprocess.run(install, check=False, env=env, capture_output=True, text=True)
    finally:
        if ours:
            policy.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(install)}` failed ({done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    if found := _orthanc_binary():
        return found
    raise RuntimeError("Debian's `orthanc` package is installed but no Orthanc binary is on "
                       "the PATH or in /usr/sbin")


class Orthanc:
    """A fresh Orthanc on 127.0.0.1, its storage and SQLite index in `workdir` (which should be
    new or empty), its output in `workdir/orthanc.log`. A context manager: started on enter,
    stopped (SIGTERM, then SIGKILL) on exit, whatever ended the block."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, object]:
        # Orthanc's defaults except the ports and paths, and authentication off so the bench
        # POSTs without credentials: the only deviation from the package's defaults. (With
        # remote access off, Orthanc 1.10 leaves authentication off anyway; said here so that
        # it does not depend on that rule.)
        return {
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
        }

    def __enter__(self) -> Self:
        binary = ensure_orthanc()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, str(config)], cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                # Ctrl-C reaches us alone, and we stop it in order; a killed bench kills it.
                start_new_session=True,
                preexec_fn=die_with_parent())  # noqa: PLW1509 - only a system call runs there
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}) on start; "
                                   f"its log ends:\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer GET /system within {START_TIMEOUT:.0f}s; "
                           f"its log ends:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _send_all(url: str, files: list[Path], stop: threading.Event,
              start: threading.Barrier) -> float:
    """One client: POSTs its files one after the other on one keep-alive connection; returns
    when its last response came (time.monotonic())."""
    with httpx.Client(base_url=url, timeout=120) as http:
        start.wait(START_TIMEOUT)
        for path in files:
            if stop.is_set():
                break
            # Read as it is sent, as imgest's clients do: from the page cache, which the files'
            # generation (or a previous run) filled.
            response = http.post("/instances", content=path.read_bytes(),
                                 headers={"Content-Type": "application/dicom"})
            if response.status_code != 200:
                raise RuntimeError(f"Orthanc refused {path}: {response.status_code} "
                                   f"{response.text[:500]}")
            if (status := response.json().get("Status")) != "Success":
                raise RuntimeError(f"Orthanc did not store {path}: Status {status!r}")
        return time.monotonic()


def orthanc_ingest(files: list[Path], clients: int, workdir: Path) -> IngestResult:
    """Every file POSTed to a fresh, empty Orthanc's /instances by `clients` threads, files dealt
    round robin; raises if any is not stored, or if Orthanc does not count them all."""
    size = sum(p.stat().st_size for p in files)
    os.sync()  # what an earlier step left dirty is not written back during this one
    stop = threading.Event()
    t0: list[float] = []
    # The clock starts when every client is ready to send (each connects on its first request:
    # one loopback handshake, part of the figure as it is of imgest's).
    with Orthanc(workdir) as orthanc:
        assert orthanc.process is not None
        pid = orthanc.process.pid
        others, cpu = OthersCpu((pid,)), [0.0]
        start = threading.Barrier(clients, action=lambda: (
            t0.append(time.monotonic()), others.start(), cpu.__setitem__(0, proc_stat(pid).cpu)))
        pool = ThreadPoolExecutor(clients, thread_name_prefix="orthanc-client")
        try:
            ends = [pool.submit(_send_all, orthanc.url, files[i::clients], stop, start)
                    for i in range(clients)]
            last = max(f.result() for f in ends)
            others.stop()
            cpu[0] = proc_stat(pid).cpu - cpu[0]
        finally:
            # On a failure or Ctrl-C the other clients end after their request in flight,
            # before Orthanc is stopped under them.
            stop.set()
            start.abort()
            pool.shutdown(cancel_futures=True)
        count = httpx.get(f"{orthanc.url}/statistics", timeout=30).json()["CountInstances"]
    if count != len(files):
        raise RuntimeError(f"Orthanc counts {count} instances after {len(files)} were stored")
    return IngestResult(instances=count, seconds=last - t0[0], bytes=size, clients=clients,
                        others_cpu=others.seconds, cpu=cpu[0])


def _timed(work, files: list[Path], size: int) -> dict[str, float]:
    os.sync()
    others = OthersCpu()
    others.start()
    t0 = time.monotonic()
    for i, path in enumerate(files):
        work(i, path)
    seconds = time.monotonic() - t0
    return {"seconds": seconds, "files_per_s": len(files) / seconds,
            "mb_per_s": size / MB / seconds, "others_cpu": others.stop()}


def _fsync_write(target: Path):
    def write(i: int, path: Path) -> None:
        fd = os.open(target / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, path.read_bytes())
            os.fsync(fd)  # the file, not its directory: as imgest's store and Orthanc do
        finally:
            os.close(fd)

    return write


def _sha256(_i: int, path: Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)


# What a run writes (Orthanc's storage, the ceilings' files) is deleted only once nothing more is
# measured. On ext4 without a journal (this machine's disk) a new file's inode skips every one
# freed in the last minute, reading each: a file made shortly after a thousand were deleted
# cost 0.3-0.6 ms of system CPU, against 0.03 ms otherwise. Deleting one system's files would
# so slow the next one measured.


def ceilings(files: list[Path], scratch: Path) -> dict[str, dict[str, float]]:
    """What the machine does over the same files, one thread each: "fsync_write" (each file
    written anew under `scratch` and fsynced), "dcmread" (its header, up to the pixel data) and
    "sha256" (streamed in 1 MiB chunks); each as {"seconds", "files_per_s", "mb_per_s"}."""
    size = 0
    for path in files:  # the page cache warmed: no one of them pays for the disk reads
        size += len(path.read_bytes())
    target = scratch / "fsync-write"
    target.mkdir(parents=True)
    # Left for the caller to delete once nothing more is measured (see above).
    write = _timed(_fsync_write(target), files, size)
    return {"fsync_write": write,
            "dcmread": _timed(lambda _i, p: pydicom.dcmread(p, stop_before_pixels=True), files,
                              size),
            "sha256": _timed(_sha256, files, size)}


def disk_write_rate(scratch: Path, total_bytes: int, chunk: int = 8 * MIB, *,
                    direct: bool = False) -> dict[str, float]:
    """One file of `total_bytes` written in `chunk`s and fsynced, then deleted; with the
    system CPU the writing cost per MiB (the file system's own work: on a virtual disk it can
    bound the rate, one core busy in the kernel). With `direct`, by O_DIRECT from one aligned
    buffer (the bytes a whole number of pages), past the page cache as imgest writes the bulk
    of a big upload: on a virtual machine that gives its freed memory back to the host, each
    fresh page of the page cache costs a fault, most of a buffered write's kernel CPU."""
    block = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(chunk))  # random: a compressing file system gains nothing
    view = memoryview(block)
    if direct:
        total_bytes -= total_bytes % DIRECT_ALIGN
    path = scratch / "disk-write.bin"
    os.sync()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0),
                 0o644)
    others = OthersCpu()
    try:
        others.start()
        kernel = os.times().system
        t0 = time.monotonic()
        left = total_bytes
        while left > 0:
            left -= os.write(fd, view[:min(left, chunk)])
        os.fsync(fd)
        seconds = time.monotonic() - t0
        kernel = os.times().system - kernel
        others.stop()
    finally:
        os.close(fd)
        path.unlink()
        view.release()
        block.close()
    return {"seconds": seconds, "mb_per_s": total_bytes / MB / seconds,
            "kernel_ms_per_mib": kernel * 1000 / (total_bytes / MIB),
            "others_cpu": others.seconds}


def write_instances(directory: Path, count: int) -> list[Path]:
    """`count` instances of one CT series, as files."""
    directory.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = [directory / f"IM{i:05d}.dcm" for i in range(count)]
    for i, path in enumerate(files):
        path.write_bytes(instance(study, series, i))
    return files


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="How many CT instances.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4],
                        help="Client counts Orthanc is measured with.")
    parser.add_argument("--runs", type=int, default=1, help="Orthanc runs per client count "
                        "(each keeps its storage, as large as the study, until the end).")
    parser.add_argument("--disk-gb", type=float, default=1.0, help="Size of the big file.")
    args = parser.parse_args()
    print(f"Orthanc: {ensure_orthanc()}")
    with tempfile.TemporaryDirectory(prefix="imgest-peers-") as tmp:
        root = Path(tmp)
        files = write_instances(root / "dicom", args.instances)
        size = sum(p.stat().st_size for p in files)
        print(f"{len(files)} instances, {size / MB:.0f} MB\n")
        print(f"{'Orthanc POST /instances':<28}{'instances/s':>12}{'MB/s':>8}{'seconds':>9}"
              f"{'others':>8}")
        for clients in args.clients:
            for run in range(args.runs):
                workdir = root / f"orthanc-{clients}-{run}"
                result = orthanc_ingest(files, clients, workdir)  # kept (see ceilings)
                print(f"  {clients} client{'s' if clients > 1 else '':<19}{result.rate:>12.0f}"
                      f"{result.bytes / MB / result.seconds:>8.0f}{result.seconds:>9.2f}"
                      f"{result.others_cpu:>8.1f}")
        print(f"\n{'Ceilings (one thread)':<28}{'files/s':>12}{'MB/s':>8}{'seconds':>9}"
              f"{'others':>8}")
        for name, figures in ceilings(files, root).items():
            print(f"  {name:<26}{figures['files_per_s']:>12.0f}{figures['mb_per_s']:>8.0f}"
                  f"{figures['seconds']:>9.2f}{figures['others_cpu']:>8.1f}")
        for label, direct in (("fsync", False), ("O_DIRECT, fsync", True)):
            try:
                disk = disk_write_rate(root, int(args.disk_gb * 1024**3), direct=direct)
            except OSError as e:  # a file system without O_DIRECT
                print(f"  one file, {label}: {e}")
                continue
            print(f"  {f'one {args.disk_gb:g} GiB file, {label}':<38}"
                  f"{disk['mb_per_s']:>8.0f}{disk['seconds']:>9.2f}{disk['others_cpu']:>8.1f}")
        print("\nothers: CPU seconds the rest of the machine took meanwhile (other processes, "
              "steal);\nwell above 0, the figure beside it is disturbed.")


if __name__ == "__main__":
    main()
