"""What the benches share: the embedded stack in a temporary directory and a client of its
gateway acting as the administrator (the token the first start wrote)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgest.stack import Stack


def gateway_client(stack: Stack, port: str | int, timeout: float = 120) -> httpx.Client:
    token = (stack.data_dir / "admin.token").read_text().strip()
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout,
                        headers={"Authorization": f"Bearer {token}"})
