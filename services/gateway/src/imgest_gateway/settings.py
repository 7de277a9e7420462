"""Gateway settings (environment variables prefixed `IMGEST_`)."""

import re
from pathlib import Path

from imgest_runtime.settings import RuntimeSettings
from pydantic import Field, SecretStr, field_validator

from .identity import USERNAME


class Settings(RuntimeSettings):
    gateway_port: int = Field(8080, description="Port of the gateway's HTTP API.")
    gateway_workers: int = Field(
        0, ge=0, le=64, description="Processes serving the gateway's port; 0: one per core, at "
        "most 4. A process's HTTP work (reading requests, parsing forms, handing files to the "
        "store) runs on one core.")
    max_upload_bytes: int = Field(
        1024**4, ge=1, description="Largest single upload accepted, in bytes (default 1 TiB).")
    admin_user: str = Field("admin", pattern=USERNAME,
                            description="The administrator created on the first start.")
    admin_email: str = Field("admin@localhost", description="The administrator's email address.")
    admin_token: SecretStr | None = Field(
        None, description="A token the administrator always "
        "has (deployments; the way back in if admin.token is lost). Default: one is made on the "
        "first start and written to DATA_DIR/admin.token.")
    admin_password: SecretStr | None = Field(
        None, description="The administrator's password on the first start (default: none, "
        "tokens only).")
    redrive_idle_seconds: float = Field(
        600.0, gt=0, description="An upload with no progress this long has its unfinished work "
        "published again (objects never unpacked, files never placed).")
    xnat_import_wait_seconds: float = Field(
        600.0, gt=0, description="How long `POST /data/services/import` waits for the importer's "
        "outcome before answering 504 with where to follow the upload.")
    tus_expire_hours: float = Field(
        24.0, gt=0, description="An unfinished resumable (tus) upload is kept this long, then "
        "its bytes are deleted (Upload-Expires).")
    tus_idle_seconds: float = Field(
        60.0, gt=0, description="A resumable (tus) PATCH whose body sends nothing this long is "
        "ended, keeping what was stored (as tusd's network timeout): a stalled client must not "
        "hold the upload's lock, and its database connection, for ever.")
    tus_patches: int = Field(
        16, ge=1, description="Resumable (tus) PATCHes one gateway process takes at once; more "
        "wait for a 503 with Retry-After. Each holds a database connection of its own (its "
        "upload's lock): unbounded, stalled clients used up PostgreSQL's.")
    redrive_max: int = Field(5, ge=0, description="Most times one upload is re-driven.")
    importer_url: str = Field(
        "http://127.0.0.1:8083", description="The importer's HTTP API, where the gateway reads "
        "the catalogue (subjects, sessions, scans, files) it serves to users.")

    @field_validator("admin_token")
    @classmethod
    def _token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"igt_[A-Za-z0-9_-]{20,}", value.get_secret_value()):
            raise ValueError("an imgest token: 'igt_' and at least 20 of A-Z a-z 0-9 _ -")
        return value

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"
