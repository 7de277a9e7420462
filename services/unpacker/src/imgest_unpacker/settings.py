"""Unpacker settings (environment variables prefixed `IMGEST_`)."""

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    unpacker_port: int = Field(8081, description="Port of the unpacker's health and metrics.")
    max_members: int = Field(200_000, ge=1, description="Most members one archive may hold.")
    max_unpacked_bytes: int = Field(
        2 * 1024**4, ge=1, description="Most bytes one archive may unpack to (bomb guard).")
    max_ratio: int = Field(
        1000, ge=1, description="Largest unpacked/packed size ratio accepted (bomb guard).")
    progress_seconds: float = Field(
        2.0, gt=0, description="How often a large archive's unpacking progress is reported.")
