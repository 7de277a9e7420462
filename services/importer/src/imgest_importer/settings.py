"""Importer settings (environment variables prefixed `IMGEST_`)."""

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    importer_port: int = Field(8083, description="Port of the importer's health and metrics.")
    default_project: str = Field(
        "Unassigned", description="Project for sessions neither the upload nor their headers "
        "place in a known project (XNAT's Unassigned: they wait in the prearchive).")
    redrive_seconds: float = Field(
        30.0, gt=0, description="An import stuck this long in 'completing' is finished again.")
    gradual_idle_seconds: float = Field(
        300.0, gt=0, description="A gradual send's entry is built once idle this long, in a "
        "project that does not set its own (Unassigned).")
    build_check_seconds: float = Field(
        60.0, gt=0, description="How often receiving entries are looked at for idleness "
        "(XNAT: every minute).")
    event_max_bytes: int = Field(
        7 * 1024 * 1024, ge=1024, description="The most an upload.completed may weigh: past "
        "it, its sessions' file ids are left out (their number stays). Below the broker's "
        "message limit: 7 MiB for Tansu and the compose Kafka (8 MiB); ~900000 for a Kafka "
        "left at its 1 MiB default.")
