"""Settings every service shares; each service's own settings module extends `RuntimeSettings`.

Configuration comes only from environment variables prefixed `IMGEST_` (or a .env file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGEST_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".imgest"), description="Where the embedded default keeps state.")
    log_level: str = Field("INFO", description="Python log level for the services.")

    # broker
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    kafka_idempotence: bool = Field(
        False, description="Idempotent producer (Apache Kafka: on; Tansu does not support it)."
    )
    kafka_partitions: int = Field(4, ge=1, description=(
        "Partitions of each topic imgest creates: at least as many as the replicas of a service "
        "that share its work (`imgest up`, one process per service, uses 1 unless this is set)."))
    kafka_session_timeout_ms: int = Field(
        10_000, ge=1000, description="Consumer group session timeout (Tansu holds a group join "
        "for half of it, so the embedded stack uses less).")
    kafka_max_poll_interval_ms: int = Field(
        300_000, ge=1000, description="Longest a consumer may go without polling before its group "
        "counts it dead. Long work (a multi-GB archive) keeps polling with its partitions paused, "
        "so this is not a limit on how long work may take.")
    kafka_max_batch_seconds: float = Field(
        7200.0, gt=0, description="Longest one batch may run (and keep polling) before it is "
        "taken for hung and its partitions are left to another member.")
    kafka_fetch_wait_ms: int = Field(
        100, ge=0, le=500, description="Longest the broker may hold a fetch while no record "
        "is there (the latency of each hop when the broker, like Tansu, does not answer it "
        "early).")
    kafka_batch_max: int = Field(
        200, ge=1, description="Most events a service takes from the broker at once (handled in "
        "one transaction per topic).")
    epoch_check_seconds: float = Field(
        10.0, gt=0, description="How often a service checks whether the broker lost its memory.")
    replay_hours: float = Field(
        24.0, gt=0, description="How far back the outbox is sent again after the broker lost "
        "its memory; sent outbox rows older than that are deleted.")
    inbox_hours: float = Field(
        720.0, gt=0, description="How long a service remembers the events it handled (its "
        "inbox), so that one delivered again is dropped: at least twice IMGEST_REPLAY_HOURS, "
        "and longer than the broker keeps records (Kafka's default: 7 days, plus up to a "
        "7-day segment) and than dead letters may wait to be replayed.")
    delivery: Literal["guarded", "unguarded"] = Field(
        "guarded", description="`unguarded` drops the inbox, the outbox and commit-after-work "
        "(at most once, lossy on a crash): only for bench/pipeline.py to measure what the "
        "guarantees cost.")
    max_attempts: int = Field(5, ge=1, description="Attempts at an event before it is dead-lettered.")
    retry_base_seconds: float = Field(0.2, gt=0, description="First retry delay; doubles each time.")

    # database
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1/imgest", description="PostgreSQL (asyncpg) URL."
    )
    database_pool_size: int = Field(
        10, ge=1, description="Connections a service keeps open to PostgreSQL, and as many again "
        "while busy (the gateway keeps half, and gives the rest to the statements of every "
        "request). A service with several workers shares them out; each gateway worker also "
        "holds two listening connections (PostgreSQL's default max_connections is 100 for all "
        "services together).")

    # object store
    store: Literal["local", "s3"] = Field("local", description="Object store adapter.")
    store_dir: Path | None = Field(None, description="Local store root (default DATA_DIR/objects).")
    store_direct_io: bool = Field(
        True, description="The local store writes a file's bytes past its first 64 KiB by "
        "O_DIRECT, past the page cache (where the file system allows it), and reads so what is "
        "read whole once (archives unpacked, downloads); false: all through the page cache, "
        "e.g. on storage where each synchronous write or read waits long.")
    s3_endpoint: str = Field("127.0.0.1:9000", description="S3 endpoint host:port.")
    s3_access_key: str = Field("minioadmin", description="S3 access key.")
    s3_secret_key: str = Field("minioadmin", description="S3 secret key.")
    s3_bucket: str = Field("imgest", description="Bucket holding staging, prearchive and archive.")
    s3_secure: bool = Field(False, description="Use HTTPS for S3.")
    s3_region: str | None = Field(None, description="S3 region, if the server needs one.")

    # HTTP (health, metrics, and the gateway's API)
    http_host: str = Field("127.0.0.1", description="Address the service's HTTP server binds.")
    public_url: str = Field("http://127.0.0.1:8080",
                            description="The gateway's URL as users reach it (links in emails).")

    @property
    def local_store_dir(self) -> Path:
        return self.store_dir or self.data_dir / "objects"

    @model_validator(mode="after")
    def _inbox_outlives_replay(self) -> RuntimeSettings:
        # An event replayed after the broker lost its memory must still be known as handled
        # while the replay is worked through (hence the margin).
        if self.inbox_hours < 2 * self.replay_hours:
            raise ValueError(f"IMGEST_INBOX_HOURS ({self.inbox_hours:g}) must be at least "
                             f"twice IMGEST_REPLAY_HOURS ({self.replay_hours:g})")
        return self
