"""What the benches share: the embedded stack in a temporary directory and a client of its
gateway acting as the administrator (the token the first start wrote)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgest.stack import Stack


def gateway_client(stack: Stack, port: str | int, timeout: float = 120) -> httpx.Client:
    token = (stack.data_dir / "admin.token").read_text().strip()
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout,
                        headers={"Authorization": f"Bearer {token}"})


def memory_kb(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_watch(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """VmRSS every 50 ms into peak[0], until `stop` (VmHWM covers the process's whole life,
    unless it can be reset)."""
    while not stop.is_set():
        peak[0] = max(peak[0], memory_kb(pid, "VmRSS"))
        time.sleep(0.05)
