"""Several processes serving one port: a service whose HTTP work outgrows one core (the
gateway, parsing and handing on uploads) runs workers forked from one parent.

The parent builds the app and migrates, has the service's start-up work done once (in a child
of its own), binds the socket and forks the workers; then it only watches them. A worker that
dies is started again; SIGTERM/SIGINT reach every worker, which finishes its requests, and the
parent exits when all have. If the parent dies abruptly, its workers die with it (as one
process would have).

Worker 0 is the primary: it alone consumes the service's events and runs its periodic jobs
(one consumer, not a group reshuffled whenever a worker starts). Every worker runs a relay of
the outbox (they take turns: outbox.Relay). Prometheus metrics are kept per process in a
directory and summed by whichever worker answers /metrics (prometheus_client's multiprocess
mode, which the service's `__main__` turns on before anything imports the client).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("imgest.workers")

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
RESTART_PAUSE = 1.0  # a worker that dies at once is not started again in a tight loop
AUTO_MAX = 4  # the most workers "one per core" starts: past that, the other services want cores
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
STARTUP_FAILED = 3  # uvicorn's exit status when the app's start-up fails


def worker_count(setting: int) -> int:
    """How many workers a setting asks for: 0 means one per core (up to AUTO_MAX)."""
    return setting or max(1, min(os.cpu_count() or 1, AUTO_MAX))


def metrics_dir(data_dir: Path, service: str, workers: int) -> None:
    """Call before anything imports prometheus_client (it picks its storage as it loads): with
    more than one worker, metrics go to files, in a directory the operator may also name."""
    if workers > 1:
        os.environ.setdefault(METRICS_DIR, str(data_dir.resolve() / "run" / f"metrics-{service}"))


def serve_workers(app: Any, count: int, uvicorn_options: dict[str, Any]) -> None:
    """Forks `count` workers serving `app` on uvicorn_options' host and port; returns when they
    have all stopped after SIGTERM/SIGINT. The app is built, never started: each worker starts
    its copy. A worker whose start-up fails stops them all (exit status 3, as uvicorn's)."""
    import uvicorn

    dies_with_us = die_with_parent(signal.SIGKILL)  # looked up before any fork
    _prepare(app, dies_with_us)
    sock = uvicorn.Config(app, **uvicorn_options).bind_socket()  # (IPv6 and all, as uvicorn)
    workers: dict[int, tuple[int, float]] = {}  # pid → (index, started at)
    stopping = False
    failed = 0

    def start(index: int) -> None:
        # A stop signal between the fork and the bookkeeping would miss the new worker: held
        # back until it is written down (the worker lets them through once it handles them).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if stopping:
                return
            pid = os.fork()
            if pid == 0:
                _worker(app, index, sock, uvicorn_options, dies_with_us)  # never returns
            workers[pid] = (index, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop(signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    log.info("%d workers serving port %d (worker 0 consumes events and runs periodic jobs)",
             count, uvicorn_options["port"])
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index, started = workers.pop(pid)
        _forget_metrics(pid)
        if stopping:
            continue
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == STARTUP_FAILED:
            log.error("worker %d (pid %d) could not start; stopping the others", index, pid)
            failed = STARTUP_FAILED
            stop()
            continue
        log.error("worker %d (pid %d) %s; starting it again", index, pid,
                  _how_it_ended(status))
        if time.monotonic() - started < RESTART_PAUSE:
            time.sleep(RESTART_PAUSE)
        start(index)  # (not if a stop came during the pause)
    sock.close()
    if failed:
        sys.exit(failed)


def _prepare(app: Any, dies_with_parent: Callable[[], None] | None) -> None:
    """The service's start-up work (the first administrator…), once for all workers, in a
    child of its own: the event loop it needs is not one the workers should inherit."""
    pid = os.fork()
    if pid == 0:
        _child(lambda: asyncio.run(app.state.service.prepare()), dies_with_parent)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        log.error("the start-up work %s", _how_it_ended(status))
        sys.exit(STARTUP_FAILED)


def _worker(app: Any, index: int, sock: socket.socket, uvicorn_options: dict[str, Any],
            dies_with_parent: Callable[[], None] | None) -> None:
    import uvicorn

    def serve() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        service = app.state.service
        service.primary = index == 0
        service.startup = []  # done once, by the parent
        uvicorn.Server(uvicorn.Config(app, **uvicorn_options)).run(sockets=[sock])

    _child(serve, dies_with_parent)


def _child(run: Callable[[], Any], dies_with_parent: Callable[[], None] | None) -> None:
    """Runs a forked child's work and ends the child with its exit status, never returning
    (nor running the parent's exit handlers). Killed with a killed parent: nothing it started
    goes on unseen."""
    code = 0
    parent = os.getppid()
    try:
        if dies_with_parent:
            dies_with_parent()
            if os.getppid() != parent:  # it died before the call
                raise SystemExit(1)
        run()
    except SystemExit as e:  # (uvicorn's own way out: STARTUP_FAILED)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported, and the exit status says it
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A function a child calls after the fork (as a Popen preexec_fn, say): on Linux it gets
    `sig` when the process (strictly, the thread) that started it dies, so a killed parent
    leaves no orphans. None elsewhere.

    prctl is looked up here, before the fork; the child runs only the system call, never an
    import (which could deadlock on a lock another thread held at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1

    def call() -> None:
        prctl(pr_set_pdeathsig, int(sig))

    return call


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def fresh_metrics_dir() -> None:
    """Before serving: the metrics directory exists, without the files of an earlier run
    (they would be summed into this one's figures)."""
    path = os.environ.get(METRICS_DIR)
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        for old in Path(path).glob("*.db"):
            old.unlink(missing_ok=True)


def workers_registry() -> Any:
    """Every worker's metrics, summed from their files; and the process figures (CPU, memory)
    of the parent and of each worker, told apart by a `pid` label."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_Processes(os.getppid()))
    return registry


class _Processes:
    """prometheus_client's process_* metrics for a parent and its children (multiprocess mode
    has none: each process would only tell of itself)."""

    def __init__(self, parent: int):
        self.parent = parent

    def collect(self) -> Any:
        from prometheus_client import ProcessCollector
        from prometheus_client.metrics_core import Metric

        try:
            children = Path(f"/proc/{self.parent}/task/{self.parent}/children").read_text()
        except OSError:
            children = ""
        families: dict[str, Metric] = {}
        for pid in [self.parent, *map(int, children.split())]:
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(family.name, Metric(
                    family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)},
                                      sample.value)
        yield from families.values()


def _forget_metrics(pid: int) -> None:
    """A dead worker's gauges go (its counters stay: totals must not fall)."""
    path = os.environ.get(METRICS_DIR)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # (the `live*` gauges)
        for stale in Path(path).glob(f"gauge_all_{pid}.db"):
            stale.unlink(missing_ok=True)
