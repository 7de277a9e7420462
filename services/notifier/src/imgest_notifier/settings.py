"""Notifier settings (environment variables prefixed `IMGEST_`)."""

from pathlib import Path

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    notifier_port: int = Field(8084, description="Port of the notifier's health and metrics.")
    smtp_url: str | None = Field(
        None, description="smtp://user:pass@host:port (STARTTLS if offered), smtps://… for TLS; "
        "unset: emails are written as .eml files to MAIL_DIR.")
    mail_from: str = Field("imgest <imgest@localhost>", description="From: of every email.")
    mail_dir: Path | None = Field(None, description="Where .eml files go (default DATA_DIR/mail).")
    smtp_timeout_seconds: float = Field(30.0, gt=0, description="SMTP connect/send timeout.")
