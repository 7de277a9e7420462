"""Metadata settings (environment variables prefixed `IMGEST_`)."""

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    metadata_port: int = Field(8082, description="Port of the metadata service's health and metrics.")
    max_header_bytes: int = Field(
        64 * 1024**2, ge=1024, description="Most bytes read to find a file's headers.")
    max_csv_bytes: int = Field(
        256 * 1024**2, ge=1024, description="Largest CSV read (it is read whole, to count rows).")
    header_readers: int = Field(
        8, ge=1, description="Most files of a batch whose headers are read at once on S3, "
        "where each read waits on the network (a local store reads them one after another: "
        "there the work is the CPU's).")
