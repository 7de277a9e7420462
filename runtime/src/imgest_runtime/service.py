"""The skeleton every service shares: one FastAPI app that runs the broker, the outbox relay and
periodic re-drive in its lifespan, and serves /healthz, /readyz, /metrics and /asyncapi.json.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from imgest_contracts import TOPICS, CloudEvent
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel
from sqlalchemy import MetaData, select
from starlette.exceptions import HTTPException

from .broker import Consumer, ensure_topics, make_broker
from .db import Database, migrate
from .epoch import check_epoch
from .outbox import DeliveryTables, Outbox, Relay, delivery_tables, derived_id
from .settings import RuntimeSettings
from .store import ObjectStore, open_store

log = logging.getLogger("imgest.service")

VERSION = "0.1.0"


def setup_logging(service: str, level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stdout,
        format=f"%(asctime)s %(levelname)-7s {service:<8} %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "uvicorn.access", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class Periodic:
    """Work a service repeats (re-drive of stuck work, sweeps), first at start."""

    name: str
    every_seconds: float
    run: Callable[[], Awaitable[Any]]


@dataclass
class Service:
    """Everything a service's handlers need, built once by its `bootstrap`."""

    name: str
    settings: RuntimeSettings
    metadata: MetaData
    versions_dir: Path
    broker: KafkaBroker = field(init=False)
    consumer: Consumer = field(init=False)
    db: Database = field(init=False)
    tables: DeliveryTables = field(init=False)
    outbox: Outbox = field(init=False)
    store: ObjectStore | None = None
    periodic: list[Periodic] = field(default_factory=list)
    uses_store: bool = True

    def __post_init__(self) -> None:
        self.broker = make_broker(self.settings, self.name)
        self.consumer = Consumer(self.broker, self.name,
                                 self.settings.kafka_session_timeout_ms,
                                 self.settings.kafka_max_poll_interval_ms)
        self.on = self.consumer.on
        self.db = Database(self.settings.database_url)
        self.tables = delivery_tables(self.metadata)
        self.outbox = Outbox(self.tables, source=f"/imgest/{self.name}")

    def migrate(self) -> None:
        """Pre-start step: bring the service's schema up to date (blocking)."""
        migrate(self.settings.database_url, self.metadata, self.versions_dir)

    def wired(self) -> KafkaBroker:
        """The broker with the service's consumer attached (once every handler is registered)."""
        self.consumer.build()
        return self.broker

    def asyncapi(self) -> dict[str, Any]:
        self.wired()
        return AsyncAPI(self.broker, title=f"imgest {self.name}", version=VERSION,
                        description=f"Events the imgest {self.name} consumes and publishes.",
                        ).to_specification().to_jsonable()

    async def _run_periodic(self, job: Periodic) -> None:
        while True:
            try:
                await job.run()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed pass is retried on the next tick
                log.warning("%s: periodic %s failed", self.name, job.name, exc_info=True)
            await asyncio.sleep(job.every_seconds)

    async def check_epoch(self) -> None:
        """Topics exist, and if the broker lost its memory, the outbox is sent again."""
        await ensure_topics(self.settings.kafka_bootstrap, list(TOPICS),
                            self.settings.kafka_partitions)
        if await check_epoch(self.db, self.tables, self.settings.kafka_bootstrap,
                             timedelta(hours=self.settings.replay_hours)):
            self.outbox.wake.set()

    @asynccontextmanager
    async def running(self):
        """Start order: store, topics, broker (consumers), relay, periodic jobs; reverse on stop."""
        if self.uses_store and self.store is None:
            self.store = await asyncio.to_thread(open_store, self.settings)
        await self.check_epoch()  # before the relay starts: a replay goes out in order
        await self.wired().start()
        relay = Relay(self.db, self.outbox, self.broker)
        relay.start()
        jobs = [*self.periodic,
                Periodic("broker-epoch", self.settings.epoch_check_seconds, self.check_epoch)]
        tasks = [asyncio.create_task(self._run_periodic(job), name=job.name) for job in jobs]
        log.info("%s started (pid %d)", self.name, os.getpid())
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.broker.stop()  # leaves the group; in-flight handlers finish first
            await relay.stop()  # flush what the last handlers wrote
            await self.db.close()
            log.info("%s stopped", self.name)

    @asynccontextmanager
    async def handling(self, event: CloudEvent, *, dead_letter: bool = False):
        """One handler's unit of work: its state change, its outbox rows and the inbox mark
        commit together. Yields None for a redelivered event (already handled: do nothing).
        A dead-lettered event has an inbox entry of its own, apart from the live one's."""
        key = derived_id(event.id, "dead-letter") if dead_letter else event.id
        async with self.db.session() as session:
            if await self.outbox.seen(session, key, event.type):
                log.debug("%s: %s %s already handled", self.name, event.type, event.id)
                yield None
            else:
                yield session

    async def handled_before(self, event: CloudEvent) -> bool:
        """A cheap look at the inbox before costly work (reading objects): a redelivered or
        replayed event is dropped without touching the store. `handling` still decides."""
        table = self.tables.inbox
        async with self.db.session() as session:
            found = (await session.execute(
                select(table.c.event_id).where(table.c.event_id == event.id))).first()
        return found is not None

    async def ready(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await self.db.ping()
            checks["database"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["database"] = f"error: {e}"
        try:
            checks["broker"] = "ok" if await self.broker.ping(timeout=2) else "error: no answer"
        except Exception as e:  # noqa: BLE001
            checks["broker"] = f"error: {e}"
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.ping)
                checks["store"] = "ok"
            except Exception as e:  # noqa: BLE001
                checks["store"] = f"error: {e}"
        return checks


def create_app(service: Service, **fastapi_options: Any) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        async with service.running():
            yield

    app = FastAPI(title=f"imgest {service.name}", version=VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, **fastapi_options)
    app.state.service = service
    add_problem_handlers(app)
    problem_only_openapi(app)
    add_local_docs(app)

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service.name}

    @app.get("/readyz", tags=["operations"], summary="Readiness: database, broker and store answer")
    async def readyz(response: Response) -> dict[str, Any]:
        checks = await service.ready()
        ok = all(v == "ok" for v in checks.values())
        response.status_code = 200 if ok else 503
        return {"status": "ok" if ok else "unavailable", "checks": checks}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/asyncapi.json", tags=["operations"], summary="AsyncAPI document of this service")
    async def asyncapi() -> dict[str, Any]:
        return service.asyncapi()

    return app


def add_local_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from files shipped in a wheel (fastapi-offline's, Swagger UI 5, which
    reads OpenAPI 3.1): FastAPI's default page loads its scripts from a CDN, which a closed
    network (or a careful hospital) does not reach."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/static/swagger-ui", StaticFiles(directory=static), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} — API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon.png")


PROBLEM = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every HTTP error."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` saying that these statuses answer with problem+json."""
    from http import HTTPStatus

    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {status: {"model": Problem, "description": HTTPStatus(status).phrase,
                     "content": {PROBLEM: ref}} for status in statuses}


def problem_only_openapi(app: FastAPI) -> None:
    """FastAPI also lists `application/json` for a response that has a model; errors are
    problem+json only, so the document says just that."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    for response in operation.get("responses", {}).values():
                        content = response.get("content", {})
                        if PROBLEM in content:
                            content.pop("application/json", None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status,
                         "detail": detail, **extra}, status_code=status, media_type=PROBLEM)


def add_problem_handlers(app: FastAPI) -> None:
    """Every error leaves as problem+json, never as a bare string or an HTML page."""
    from http import HTTPStatus

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        response = problem(error.status_code, HTTPStatus(error.status_code).phrase,
                           str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
        return problem(422, "Unprocessable Content", "The request is not valid.", errors=errors)


def serve(app_factory: Callable[[], FastAPI], settings: RuntimeSettings, port: int,
          service: str) -> None:
    """The process entry point: migrate first, then serve until SIGTERM/SIGINT."""
    import uvicorn

    setup_logging(service, settings.log_level)
    app = app_factory()
    app.state.service.migrate()
    uvicorn.run(app, host=settings.http_host, port=port, log_config=None,
                timeout_graceful_shutdown=20, limit_concurrency=None)
