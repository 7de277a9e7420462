"""Importer settings (environment variables prefixed `IMGEST_`)."""

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    importer_port: int = Field(8083, description="Port of the importer's health and metrics.")
    default_project: str = Field(
        "default", description="Project for files neither the upload nor their headers place.")
    redrive_seconds: float = Field(
        30.0, gt=0, description="An import stuck this long in 'completing' is finished again.")
