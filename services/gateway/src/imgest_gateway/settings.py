"""Gateway settings (environment variables prefixed `IMGEST_`)."""

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field


class Settings(RuntimeSettings):
    gateway_port: int = Field(8080, description="Port of the gateway's HTTP API.")
    max_upload_bytes: int = Field(
        1024**4, ge=1, description="Largest single upload accepted, in bytes (default 1 TiB).")
    admin_user: str = Field("admin", description="Uploader recorded until authentication exists.")
    admin_email: str = Field("admin@localhost", description="Where that uploader's email goes.")
    redrive_idle_seconds: float = Field(
        600.0, gt=0, description="An upload with no progress this long has its unfinished work "
        "published again (objects never unpacked, files never placed).")
    redrive_max: int = Field(5, ge=0, description="Most times one upload is re-driven.")
