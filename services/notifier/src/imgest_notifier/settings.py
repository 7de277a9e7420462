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
    smtp_ca_file: Path | None = Field(
        None, description="CA certificates (PEM) that the SMTP server's certificate is checked "
        "against (default: the system's).")
    template_dir: Path | None = Field(
        None, description="A directory of Jinja2 templates that replace the shipped ones of the "
        "same name (upload_completed.txt.j2/.html.j2, session_attention.txt.j2/.html.j2).")
    mail_retry_seconds: float = Field(
        10.0, gt=0, description="How often emails not yet sent are tried again.")
    mail_backoff_max_seconds: float = Field(
        600.0, gt=0, description="Longest wait between two tries of one email.")
    mail_give_up_hours: float = Field(
        72.0, gt=0, description="An email still not sent after this long is given up (logged).")
