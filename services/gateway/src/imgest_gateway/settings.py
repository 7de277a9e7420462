"""Gateway settings (environment variables prefixed `IMGEST_`)."""

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    gateway_port: int = Field(8080, description="Port of the gateway's HTTP API.")
    max_upload_bytes: int = Field(
        1024**4, ge=1, description="Largest single upload accepted, in bytes (default 1 TiB).")
    admin_user: str = Field("admin", description="Uploader recorded until authentication exists.")
    admin_email: str = Field("admin@localhost", description="Where that uploader's email goes.")
