"""The `imgest` command's own behaviour (its subcommands are tested where their work is)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from imgest.cli import StopRequested


def _waiting_for_a_stop(then: str) -> subprocess.Popen[str]:
    """A process waiting as `imgest up` does for SIGINT or SIGTERM, then running `then` (its
    StopRequested is `stop`); returned once it waits."""
    waiter = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from imgest.cli import StopRequested\n"
        "stop = StopRequested()\n"
        "print('waiting', flush=True)\n"
        "stop.wait(poll=0.05)\n" + then)], stdout=subprocess.PIPE, text=True)
    assert waiter.stdout is not None and waiter.stdout.readline() == "waiting\n"
    return waiter


def test_a_burst_of_stop_signals_stops_up_and_never_hangs_it():
    """`imgest up` stops on SIGINT or SIGTERM however many arrive at once: a process group's
    kill and uv's passing it on come together, and a handler taking a lock hung it (in about
    one burst in six, so twenty are sent)."""
    for burst in [200, 2000] * 10:
        waiter = _waiting_for_a_stop("print('stopped', flush=True)\n")
        try:
            for i in range(burst):
                os.kill(waiter.pid, signal.SIGTERM if i % 2 else signal.SIGINT)
            started = time.monotonic()
            out, _ = waiter.communicate(timeout=10)
            # (A signal still on its way as Python exits may end it: it has stopped by then.)
            assert out == "stopped\n", (burst, out, waiter.returncode)
            assert time.monotonic() - started < 5
        finally:
            waiter.kill()
            waiter.wait()


def test_up_refuses_ports_or_a_data_directory_another_stack_holds(tmp_path):
    """A second `imgest up` on the same ports, or on the same data directory, says so and
    starts nothing: before, its Tansu and services crash-looped on the ports while the first
    stack's answered "ready", or ran on the first one's PostgreSQL with a broker of their own."""
    from imgest.infra import free_port
    from imgest.stack import SERVICES, port_env

    ports = {port_env(name): free_port() for name in SERVICES}
    tansu = free_port()
    up = [str(Path(sys.executable).with_name("imgest")), "up", "--tansu-port", str(tansu),
          "--data-dir", str(tmp_path / "data")]
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    held = ports["IMGEST_GATEWAY_PORT"], ports["IMGEST_METADATA_PORT"], tansu
    with contextlib.ExitStack() as listening:
        for port in held:
            listening.enter_context(socket.create_server(("127.0.0.1", port)))
        done = subprocess.run(up, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"cannot start: ports {held[0]} (IMGEST_GATEWAY_PORT), {held[1]} "
            f"(IMGEST_METADATA_PORT), {held[2]} (IMGEST_TANSU_PORT) already in use"
            ) in done.stdout, done.stdout
    assert "Traceback" not in done.stderr and not (tmp_path / "data").exists()

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "up.lock", "w") as lock:  # as a running `imgest up` holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(up, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"another `imgest up` uses the data directory {tmp_path / 'data'}" in done.stdout
    assert not (tmp_path / "data" / "postgres").exists()


def test_a_killed_stack_does_not_keep_its_postgresql_running_after_the_next_stop(tmp_path):
    """`imgest up` killed (SIGKILL, the OOM killer) never let go of its embedded PostgreSQL:
    the next start took the server over, and its stop then left it running for ever."""
    import psutil

    from imgest.infra import Postgres

    data = tmp_path / "postgres"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from imgest.infra import Postgres\n"
        f"Postgres(Path({str(data)!r})).start()\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None and killed.stdout.readline() == "holding\n"
    killed.kill()
    killed.wait()
    postgres = Postgres(data)
    postgres.start()  # takes over the server the killed one started
    server = postgres.server.get_postmaster_info().process  # type: ignore[union-attr]
    assert server.is_running()
    postgres.stop()
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


def test_a_second_ctrl_c_kills_what_a_stop_still_waits_for():
    """A stop waits for each process to end (30 s at most); a second Ctrl-C, a moment after the
    first, kills what still runs. Two signals at once (a group's kill, and uv passing it on)
    are one stop, not two."""
    waiter = _waiting_for_a_stop("print('requested', stop.forced, flush=True)\n"
                                 "time.sleep(1)\n"
                                 "print('forced', stop.forced, flush=True)\n")
    assert waiter.stdout is not None
    os.kill(waiter.pid, signal.SIGINT)
    os.kill(waiter.pid, signal.SIGTERM)
    assert waiter.stdout.readline() == "requested False\n"
    time.sleep(StopRequested.AGAIN_AFTER + 0.1)
    os.kill(waiter.pid, signal.SIGINT)
    assert waiter.communicate(timeout=10)[0] == "forced True\n"

    from imgest.stack import Supervisor

    said: list[str] = []
    supervisor = Supervisor(dict(os.environ), lambda name, line: said.append(line))
    stubborn = supervisor.start_child("stubborn", [sys.executable, "-c", (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "time.sleep(120)\n")])
    for _ in range(100):
        if said:
            break
        time.sleep(0.1)
    assert said == ["ignoring SIGTERM"]
    started = time.monotonic()
    supervisor.stop(hurry=lambda: time.monotonic() - started > 0.5)
    assert time.monotonic() - started < 5  # not the 30 s a stop waits otherwise
    assert stubborn.process is not None and stubborn.process.returncode == -signal.SIGKILL
