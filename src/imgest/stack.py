"""The five services as supervised child processes, and the whole stack around them.

Logs are prefixed with the service's name; a service that exits is started again (with backoff),
and so is the embedded PostgreSQL, on its data; stopping sends SIGTERM to all and waits for them
to finish what they are doing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgest_runtime.workers import die_with_parent

from .infra import Postgres, Tansu, free_port, port_taken, wait_for_port

SERVICES = ("gateway", "unpacker", "metadata", "importer", "notifier")
DEFAULT_PORTS = {"gateway": 8080, "unpacker": 8081, "metadata": 8082, "importer": 8083,
                 "notifier": 8084}


def port_env(service: str) -> str:
    return f"IMGEST_{service.upper()}_PORT"


class CannotStart(RuntimeError):
    """Another stack is in the way: it listens on our ports, or uses our data directory."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    emit: Callable[[str, str], None]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - only a system call runs there
        )
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()

    def _pump(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            self.emit(self.name, line.decode(errors="replace").rstrip())

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Supervisor:
    env: dict[str, str]
    emit: Callable[[str, str], None]
    postgres: Postgres | None = None  # embedded: watched too, though no child of ours
    children: dict[str, Child] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, services: tuple[str, ...] = SERVICES) -> None:
        """Starts the services (after any infrastructure added with `start_child`)."""
        for name in services:
            self.start_child(name, [sys.executable, "-m", f"imgest_{name}"])
        self.watch()

    def start_child(self, name: str, argv: list[str], env: dict[str, str] | None = None
                    ) -> Child:
        """Starts and supervises one process (`env` adds to the supervisor's environment)."""
        child = Child(name, argv, {**self.env, **(env or {})}, self.emit)
        child.start()
        self.children[name] = child
        return child

    def watch(self) -> None:
        self._stop.clear()  # a supervisor can be stopped and started again
        self._thread = threading.Thread(target=self._watch, daemon=True, name="supervisor")
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                if self.postgres is not None and self.postgres.crashed():
                    self._restart_postgres(self.postgres)
            except Exception as e:  # noqa: BLE001 - the services are still to be watched
                self.emit("postgres", f"could not tell whether PostgreSQL runs ({e}); "
                          "looking again shortly")
            for child in list(self.children.values()):
                if child.alive() or self._stop.is_set() or child.name in self.held:
                    continue
                code = child.process.returncode if child.process else None
                # A service that ran a while is restarted at once; one that keeps dying, slower.
                ran = time.monotonic() - child.started_at
                delay = 0 if ran > 60 else min(30, 2 ** min(child.restarts, 5))
                self.emit(child.name, f"exited with code {code}; restarting in {delay}s")
                if self._stop.wait(delay):
                    return
                if self.children.get(child.name) is not child or child.name in self.held:
                    continue  # removed or held meanwhile: a restart now would be an orphan
                child.restarts += 1
                child.start()

    def _restart_postgres(self, postgres: Postgres) -> None:
        self.emit("postgres", f"PostgreSQL is not running; starting it again on its data in "
                  f"{postgres.directory}")
        try:
            postgres.restart()
        except Exception as e:  # noqa: BLE001 - e.g. its old processes not yet gone: again soon
            self.emit("postgres", f"PostgreSQL did not start ({type(e).__name__}: {e}); "
                      "trying again in 2s")
            self._stop.wait(2)
            return
        self.emit("postgres", "PostgreSQL is running again")

    def hold(self, name: str) -> None:
        """Stops one child and keeps it stopped (until `release`)."""
        self.held.add(name)
        child = self.children[name]
        if child.alive():
            child.process.terminate()  # type: ignore[union-attr]
            child.process.wait(30)  # type: ignore[union-attr]

    def release(self, name: str) -> None:
        self.held.discard(name)

    def remove(self, name: str) -> None:
        """Stops one child (SIGTERM, as a scale-down does) and forgets it."""
        self.hold(name)
        del self.children[name]
        self.held.discard(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Test hook: what a crash looks like."""
        child = self.children[name]
        if child.process:
            child.process.send_signal(sig)

    def stop(self, timeout: float = 30, infrastructure: tuple[str, ...] = ("tansu",),
             hurry: Callable[[], bool] = lambda: False) -> None:
        """Services first (they flush their outboxes to the broker), infrastructure last. Each
        group gets `timeout` seconds to end, or until `hurry()` (a second Ctrl-C): then what
        still runs is killed."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        services = [c for n, c in self.children.items() if n not in infrastructure]
        infra = [c for n, c in self.children.items() if n in infrastructure]
        for group in (services, infra):
            for child in group:
                if child.alive():
                    child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + timeout
            for child in group:
                if child.process is None:
                    continue
                while child.alive() and time.monotonic() < deadline and not hurry():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.process.wait(0.1)
                if child.alive():
                    child.process.kill()
                child.process.wait()
        self.children.clear()


def ready(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001
        return False


@dataclass
class Stack:
    """Infrastructure (embedded unless pointed elsewhere) plus the five services."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)  # IMGEST_* overrides
    emit: Callable[[str, str], None] = lambda name, line: print(f"{name:<9}| {line}", flush=True)
    tansu_port: int | None = None
    postgres: Postgres | None = None
    supervisor: Supervisor | None = None
    _data_dir_lock: int | None = field(default=None, init=False, repr=False)

    def setting(self, name: str) -> str | None:
        return self.env.get(name) or os.environ.get(name)

    def start(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "IMGEST_DATA_DIR": str(self.data_dir.resolve()),
               "PYTHONUNBUFFERED": "1"}
        for name in SERVICES:
            env.setdefault(port_env(name), str(DEFAULT_PORTS[name]))
        self._check_ports(env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._hold_data_dir()
        if not self.setting("IMGEST_DATABASE_URL"):
            self.postgres = Postgres(self.data_dir / "postgres")
            self.emit("imgest", f"starting embedded PostgreSQL in {self.postgres.directory}")
            env["IMGEST_DATABASE_URL"] = self.postgres.start()
        self.supervisor = Supervisor(env, self.emit, self.postgres)
        if not self.setting("IMGEST_KAFKA_BOOTSTRAP"):
            # Supervised like the services: if it dies, it is started again (empty, in memory),
            # and the services' epoch check sends again what it forgot.
            tansu = Tansu(self.tansu_port or free_port())
            self.emit("imgest", f"starting Tansu (Kafka API) on 127.0.0.1:{tansu.port}")
            self.supervisor.start_child("tansu", tansu.argv())
            wait_for_port("127.0.0.1", tansu.port, 30, "Tansu")
            env["IMGEST_KAFKA_BOOTSTRAP"] = tansu.bootstrap
            env["IMGEST_KAFKA_IDEMPOTENCE"] = "false"  # Tansu does not support it
            # Tansu holds each group join for half the session timeout: keep it short on loopback.
            env.setdefault("IMGEST_KAFKA_SESSION_TIMEOUT_MS", "6000")
            # One process per service here, so one partition per topic: Tansu's work on every
            # fetch grows with the partitions asked for (idle, 13 % of a core with four, 7 %
            # with one). Replicas need more: set IMGEST_KAFKA_PARTITIONS (Tansu keeps topics in
            # memory, so they are made anew, with it, at each start).
            env.setdefault("IMGEST_KAFKA_PARTITIONS", "1")
        # The gateway reads the catalogue from the importer, wherever its port is.
        env.setdefault("IMGEST_IMPORTER_URL", f"http://127.0.0.1:{env[port_env('importer')]}")
        self.supervisor.start()
        self.resolved = env
        return env

    def _check_ports(self, env: dict[str, str]) -> None:
        """Refuses to start where another stack listens: its Tansu and services would answer
        for ours ("ready" at once, and uploads sent to it), while ours failed to bind."""
        host = env.get("IMGEST_HTTP_HOST") or "127.0.0.1"
        wanted = {port_env(name): int(env[port_env(name)]) for name in SERVICES}
        if self.tansu_port and not self.setting("IMGEST_KAFKA_BOOTSTRAP"):
            wanted["IMGEST_TANSU_PORT"] = self.tansu_port
        taken = [f"{port} ({setting})" for setting, port in wanted.items()
                 if port_taken("127.0.0.1" if setting == "IMGEST_TANSU_PORT" else host, port)]
        if taken:
            raise CannotStart(
                f"port{'s' if len(taken) > 1 else ''} {', '.join(taken)} already in use on this "
                "machine: is another `imgest up` running? Stop it, or choose other ports with "
                "those settings.")

    def _hold_data_dir(self) -> None:
        """One stack per data directory, held until it stops: a second (on other ports) would
        run its services on the first one's PostgreSQL and store, with a broker of its own."""
        lock = os.open(self.data_dir / "up.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise CannotStart(
                f"another `imgest up` uses the data directory {self.data_dir.resolve()}: stop "
                "it, or give this one a directory of its own (--data-dir, IMGEST_DATA_DIR) and "
                "other ports.") from None
        self._data_dir_lock = lock  # (children do not inherit it: Popen closes descriptors)

    def port(self, service: str) -> int:
        return int(self.resolved[port_env(service)])

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        pending = set(SERVICES)
        while pending and time.monotonic() < deadline:
            pending = {s for s in pending if not ready(self.port(s))}
            if pending:
                time.sleep(0.3)
        if pending:
            raise TimeoutError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")

    def stop(self, hurry: Callable[[], bool] = lambda: False) -> None:
        if self.supervisor:
            self.supervisor.stop(hurry=hurry)
        if self.postgres:
            self.postgres.stop()
        if self._data_dir_lock is not None:
            os.close(self._data_dir_lock)
            self._data_dir_lock = None
