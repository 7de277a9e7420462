"""What the benches share: the embedded stack in a temporary directory and a client of its
gateway acting as the administrator (the token the first start wrote)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgest.stack import Stack


def gateway_client(stack: Stack, port: str | int, timeout: float = 120) -> httpx.Client:
    token = (stack.data_dir / "admin.token").read_text().strip()
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout,
                        headers={"Authorization": f"Bearer {token}"})


def processes(pid: int) -> list[int]:
    """The process and its children, grandchildren…: the gateway forks its workers."""
    found = [pid]
    for p in found:
        try:
            found += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return found


TICK = os.sysconf("SC_CLK_TCK")


class ProcStat(NamedTuple):
    name: str
    ppid: int
    cpu: float  # CPU seconds (user + system) of its own threads
    reaped: float  # those of its children it has waited for


def proc_stat(pid: int | str) -> ProcStat:
    """A process's /proc/<pid>/stat; OSError if it is gone."""
    head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    f = tail.split()
    return ProcStat(head.split("(", 1)[1], int(f[1]), (int(f[11]) + int(f[12])) / TICK,
                    (int(f[13]) + int(f[14])) / TICK)


def memory_kb(pid: int) -> int:
    """The memory of a process and its descendants, in KiB: the sum of their proportional set
    sizes (PSS). Pages a forked worker still shares with its parent count once, split between
    them, where a sum of RSS would count them in each; for one process PSS is a little under
    its RSS (shared libraries' pages are split with other processes)."""
    total = 0
    for p in processes(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in text.splitlines()
                      if line.startswith("Pss:"))
    return total


def resident_pages(pid: int) -> int:
    """The resident pages of a process and its descendants (shared ones in each), from statm:
    cheap to read, where PSS walks every page table of the process."""
    total = 0
    for p in processes(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


def peak_watch(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """The largest `memory_kb` into peak[0], until `stop`. Resident sizes are read every 50 ms,
    PSS when they pass their largest yet, and every second (PSS can grow while they do not):
    reading smaps_rollup every 50 ms took ~7 % of the two cores during a tus upload, and held
    the gateway's memory map lock as it went."""
    most, tick = 0, 0
    while not stop.is_set():
        resident = resident_pages(pid)
        if resident > most or tick % 20 == 0:
            most = max(most, resident)
            peak[0] = max(peak[0], memory_kb(pid))
        tick += 1
        time.sleep(0.05)
