"""Where emails go: an SMTP server (aiosmtplib) or, with none configured, .eml files."""

from __future__ import annotations

import asyncio
import os
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit


class Mailer(Protocol):
    transport: str

    async def send(self, msg: EmailMessage, name: str) -> None: ...


class SmtpMailer:
    transport = "smtp"

    def __init__(self, url: str, timeout: float, ca_file: Path | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError(f"SMTP URL must start smtp:// or smtps://, not {parts.scheme}://")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (465 if parts.scheme == "smtps" else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.use_tls = parts.scheme == "smtps"
        self.timeout = timeout
        self.ca_file = str(ca_file) if ca_file else None

    async def send(self, msg: EmailMessage, name: str) -> None:
        import aiosmtplib

        await aiosmtplib.send(msg, hostname=self.host, port=self.port, username=self.username,
                              password=self.password, use_tls=self.use_tls,
                              start_tls=None if not self.use_tls else False, timeout=self.timeout,
                              cert_bundle=self.ca_file)


class EmlMailer:
    """Writes each email as <name>.eml, atomically, for when no mail server is configured."""

    transport = "eml"

    def __init__(self, directory: Path):
        self.directory = directory

    async def send(self, msg: EmailMessage, name: str) -> None:
        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{name}.tmp"
            tmp.write_bytes(bytes(msg))
            os.replace(tmp, self.directory / f"{name}.eml")

        await asyncio.to_thread(write)
