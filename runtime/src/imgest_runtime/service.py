"""The skeleton every service shares: one FastAPI app that runs the broker, the outbox relay and
periodic re-drive in its lifespan, and serves /healthz, /readyz, /metrics and /asyncapi.json.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from asyncpg.exceptions import (
    CharacterNotInRepertoireError,
    OperatorInterventionError,
    PostgresConnectionError,
    UntranslatableCharacterError,
)
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from imgest_contracts import TOPICS, CloudEvent, Payload, topic_of
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel
from sqlalchemy import MetaData, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .broker import (
    Consumer,
    Delivery,
    GaveUp,
    dead_letter_reason,
    dlq_topic,
    ensure_topics,
    make_broker,
    retrying,
)
from .db import Database, any_of, migrate
from .epoch import broker_epoch, check_epoch
from .http import BoundedHeadProtocol, HeadAsGet, HeadCheck, routed
from .outbox import DeliveryTables, Outbox, Relay, delivery_tables, derived_id, prune
from .settings import RuntimeSettings
from .store import ObjectStore, open_store
from .workers import METRICS_DIR, fresh_metrics_dir, serve_workers, workers_registry

log = logging.getLogger("imgest.service")

VERSION = "0.1.0"
DATABASE_PING_SECONDS = 2.0  # how often a consumer asks whether the database is back
PRUNE_SECONDS = 3600.0  # how often handled and sent events past their keeping are deleted


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
    at_start: bool = True  # False: first after one period (e.g. once the consumer caught up)


@dataclass
class Tx:
    """The unit of work of one batch of events: handlers change state and add events through
    it, and it all commits once, with the inbox marks of the events handled."""

    session: AsyncSession
    outbox: Outbox
    before: dict[Hashable, Callable[[], Awaitable[Any]]] = field(default_factory=dict)
    after: dict[Hashable, Callable[[], Awaitable[Any]]] = field(default_factory=dict)
    pending: list[tuple[Payload, str | None]] = field(default_factory=list)

    def publish(self, payload: Payload, *, event_id: str | None = None) -> None:
        """Adds an event to the outbox (all of a batch's in one statement, at its end); it is
        sent once the transaction commits."""
        self.pending.append((payload, event_id))

    def before_commit(self, key: Hashable, work: Callable[[], Awaitable[Any]]) -> None:
        """Runs `work` once per key at the end of the batch, inside its transaction (e.g. look
        at an upload once after all of its events in the batch were recorded)."""
        self.before.setdefault(key, work)

    def after_commit(self, key: Hashable, work: Callable[[], Awaitable[Any]]) -> None:
        """Runs `work` once per key after the commit (e.g. finish what was just completed);
        it is retried, and what still fails is left to the service's re-drive."""
        self.after.setdefault(key, work)


TxHandler = Callable[..., Awaitable[None]]


def inbox_key(event: CloudEvent, dead_letter: bool) -> str:
    """A dead-lettered event has an inbox entry of its own, apart from the live one's."""
    return derived_id(event.id, "dead-letter") if dead_letter else event.id


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
    startup: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)  # before serving
    # Runs for as long as the process serves, in every process (each worker), unlike periodic.
    background: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    uses_store: bool = True
    uses_statements: bool = False  # `Database.connection` for compiled statements (its pool)
    consumed: list[tuple[type[Payload], bool]] = field(default_factory=list)
    published: list[type[Payload]] = field(default_factory=list)
    _epoch: str | None = field(default=None, init=False)  # the broker epoch it consumes from
    # False in a service's extra worker processes: only the primary consumes events and runs
    # the periodic jobs (imgest_runtime.workers).
    primary: bool = True

    def __post_init__(self) -> None:
        self.broker = make_broker(self.settings, self.name)
        self.consumer = Consumer(self.broker, self.name, self.settings)
        self.db = Database(self.settings.database_url,
                           pool_size=self.settings.database_pool_size,
                           statements=self.uses_statements)
        self.tables = delivery_tables(self.metadata)
        self.outbox = Outbox(self.tables, source=f"/imgest/{self.name}")
        self.consumer.outage = self.wait_for_database
        if self.settings.delivery == "unguarded":
            self.outbox.send_directly = lambda topic, key, value: self.broker.publish(
                value, topic, key=key, headers={"ce_type": value.get("type", "")})

    def on(self, payload: type[Payload], *, dead_letters_of: str | None = None,
           own_transaction: bool = False, whole_batch: bool = False):
        """Registers the handler of an event type (or, with `dead_letters_of`, of the dead
        letters that service wrote for it: a file the metadata service gave up on, not one the
        gateway's status failed to record).

        - By default `async def h(event, tx: Tx)` (dead letters: `h(event, tx, reason)`) is
          called for each event of a batch not handled before; the batch commits once.
        - `whole_batch`: `async def h(events, tx: Tx)` is called once with all of them, in
          order, for work that costs less done for many at once (reads side by side, one
          statement for all); with `own_transaction`, `async def h(events)`, which opens its
          units of work with `handling_many(events)` or `handling(event)`.
        - `own_transaction`: `async def h(event)` is called for each event and opens its own
          unit of work with `handling(event)`, for work too long to do inside a transaction
          (unpacking an archive, sending an email).
        """
        dead_letters = dead_letters_of is not None

        def register(handler: TxHandler) -> TxHandler:
            async def each(deliveries: list[Delivery]) -> None:
                if whole_batch:
                    await handler([d.event for d in deliveries])
                    return
                for delivery in deliveries:
                    await handler(delivery.event)

            async def together(deliveries: list[Delivery]) -> None:
                if dead_letters:
                    deliveries = [d for d in deliveries
                                  if d.header("x-imgest-service") == dead_letters_of]
                await self._in_one_transaction(handler, deliveries, dead_letters, whole_batch)

            self.consumer.on(payload, dead_letters=dead_letters)(
                each if own_transaction else together)
            self.consumed.append((payload, dead_letters))
            return handler

        return register

    def publishes(self, *payloads: type[Payload]) -> None:
        """Declares what the service publishes (for the AsyncAPI document; the outbox sends)."""
        self.published.extend(payloads)

    async def _in_one_transaction(self, handler: TxHandler, deliveries: list[Delivery],
                                  dead_letters: bool, whole_batch: bool = False) -> None:
        if not deliveries:
            return
        keys = [inbox_key(d.event, dead_letters) for d in deliveries]
        async with self.db.session() as session:
            fresh = await self.outbox.fresh(session, {key: d.event.type
                                                      for key, d in zip(keys, deliveries)})
            tx = Tx(session, self.outbox)
            todo = []
            for key, delivery in zip(keys, deliveries):
                if key not in fresh:
                    log.debug("%s: %s %s already handled", self.name, delivery.event.type, key)
                    continue
                fresh.discard(key)  # the same event twice in one batch is handled once
                todo.append(delivery)
            if whole_batch:
                if todo:
                    await handler([d.event for d in todo], tx)
            else:
                for delivery in todo:
                    if dead_letters:
                        await handler(delivery.event, tx, dead_letter_reason(delivery))
                    else:
                        await handler(delivery.event, tx)
            for work in tx.before.values():
                await work()
            await self.outbox.add_many(session, tx.pending)
        for key, work in tx.after.items():
            try:
                await retrying(work, what=f"{self.name}: {key}",
                               attempts=self.settings.max_attempts,
                               base_seconds=self.settings.retry_base_seconds,
                               outage=self.wait_for_database)
            except GaveUp as gave_up:
                log.error("%s: %s failed after %d attempt(s) (%s); the re-drive will finish it",
                          self.name, key, gave_up.attempts, gave_up)

    async def wait_for_database(self, _error: Exception) -> bool:
        """After a failure: if the database does not answer, wait until it does, and say so
        (the failure was the outage's, whatever it was). Meanwhile the consumer holds its
        events (staying in its group: Consumer._kept_alive)."""
        waited_since = None
        while True:
            try:
                await asyncio.wait_for(self.db.ping(), DATABASE_PING_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - whatever it is, it does not answer
                if waited_since is None:
                    waited_since = time.monotonic()
                    log.warning("%s: the database does not answer (%s); holding events until "
                                "it does", self.name, type(error).__name__)
                await asyncio.sleep(DATABASE_PING_SECONDS)
                continue
            if waited_since is not None:
                log.info("%s: the database answers again after %.0fs; going on", self.name,
                         time.monotonic() - waited_since)
            return waited_since is not None

    def migrate(self) -> None:
        """Pre-start step: bring the service's schema up to date (blocking)."""
        migrate(self.settings.database_url, self.metadata, self.versions_dir)

    def wired(self) -> KafkaBroker:
        """The broker with the service's consumer attached (once every handler is registered)."""
        self.consumer.build()
        return self.broker

    def asyncapi(self) -> dict[str, Any]:
        return AsyncAPI(self.documented(), title=f"imgest {self.name}", version=VERSION,
                        description=f"Events the imgest {self.name} consumes and publishes.",
                        ).to_specification().to_jsonable()

    def documented(self) -> KafkaBroker:
        """A broker for the AsyncAPI document, never started: a topic a channel, each with its
        event's schema. (The running consumer is one batch subscriber over all topics.)"""
        docs = KafkaBroker(self.settings.kafka_bootstrap, description=f"imgest {self.name}")
        group = f"imgest-{self.name}"
        for payload, dead_letters in self.consumed:
            topic = dlq_topic(topic_of(payload)) if dead_letters else topic_of(payload)
            docs.subscriber(topic, group_id=group, title=f"{group}:{topic}",
                            description=f"Consumed by the {self.name} (group {group}"
                            f"{', dead letters' if dead_letters else ''}).",
                            )(_documented(payload))
        for payload in self.published:
            docs.publisher(topic_of(payload), title=f"{topic_of(payload)}:publish",
                           description=payload.description,
                           schema=CloudEvent[payload])  # type: ignore[valid-type]
        return docs

    async def _run_periodic(self, job: Periodic) -> None:
        if not job.at_start:
            await asyncio.sleep(job.every_seconds)
        while True:
            try:
                await job.run()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed pass is retried on the next tick
                log.warning("%s: periodic %s failed", self.name, job.name, exc_info=True)
            await asyncio.sleep(job.every_seconds)

    async def check_epoch(self) -> None:
        """Topics exist, and if the broker lost its memory, the outbox is sent again (once, by
        whichever replica sees it first) and this process's consumer starts over."""
        await ensure_topics(self.settings.kafka_bootstrap, list(TOPICS),
                            self.settings.kafka_partitions)
        epoch = await broker_epoch(self.settings.kafka_bootstrap)
        if await check_epoch(self.db, self.tables, epoch,
                             timedelta(hours=self.settings.replay_hours)):
            self.outbox.wake.set()
        if self._epoch not in (None, epoch):
            # Positions and commits made against the old broker skip records of the new one.
            await self.consumer.rewind(grace_seconds=3 * self.settings.epoch_check_seconds
                                       + 2 * self.settings.kafka_session_timeout_ms / 1000)
        self._epoch = epoch

    async def prune_delivery(self) -> None:
        await prune(self.db, self.tables, replay_hours=self.settings.replay_hours,
                    inbox_hours=self.settings.inbox_hours)

    @asynccontextmanager
    async def running(self):
        """Start order: store, topics, broker (consumers), relay, periodic jobs; reverse on stop."""
        # Each upload streaming into the store holds a thread for as long as it lasts; the
        # default pool (CPU count + 4) would queue the 7th upload behind the first six.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=64, thread_name_prefix="imgest-io"))
        if self.uses_store and self.store is None:
            self.store = await asyncio.to_thread(open_store, self.settings)
        await self.check_epoch()  # before the relay starts: a replay goes out in order
        for work in self.startup:
            await work()
        # (Another worker's broker only publishes: what its relay sends.)
        await (self.wired() if self.primary else self.broker).start()
        relay = Relay(self.db, self.outbox, self.broker)
        relay.start()
        jobs = [*self.periodic, Periodic("broker-epoch", self.settings.epoch_check_seconds,
                                         self.check_epoch),
                # (Not at start: a consumer that was away first catches up, its marks kept.)
                Periodic("delivery-pruning", PRUNE_SECONDS, self.prune_delivery,
                         at_start=False)
                ] if self.primary else []
        tasks = [asyncio.create_task(self._run_periodic(job), name=job.name) for job in jobs]
        tasks += [asyncio.create_task(work()) for work in self.background]
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

    async def prepare(self) -> None:
        """The start-up work, once for all of a service's workers (before they are forked)."""
        try:
            for work in self.startup:
                await work()
        finally:
            await self.db.close()

    @asynccontextmanager
    async def handling(self, event: CloudEvent):
        """The unit of work of an `own_transaction` handler: its state change, its outbox rows
        and the inbox mark commit together. Yields None for a redelivered event (already
        handled: do nothing)."""
        async with self.db.session() as session:
            if await self.outbox.seen(session, event.id, event.type):
                log.debug("%s: %s %s already handled", self.name, event.type, event.id)
                yield None
            else:
                yield session

    @asynccontextmanager
    async def handling_many(self, events: list[CloudEvent]):
        """`handling` for many events in one unit of work: yields the session and the events
        not handled before."""
        async with self.db.session() as session:
            fresh = await self.outbox.fresh(session, {e.id: e.type for e in events})
            yield session, [e for e in events if e.id in fresh]

    async def handled_before(self, event: CloudEvent) -> bool:
        """A cheap look at the inbox before costly work (reading objects): a redelivered or
        replayed event is dropped without touching the store. `handling` still decides."""
        return bool(await self.handled([event.id]))

    async def handled(self, event_ids: Iterable[str]) -> set[str]:
        """Which of these events the inbox holds (`handled_before` for many at once)."""
        if self.outbox.send_directly is not None:
            return set()  # unguarded: no inbox
        table = self.tables.inbox
        async with self.db.session() as session:
            return set((await session.execute(select(table.c.event_id).where(
                any_of(table.c.event_id, event_ids)))).scalars())

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


def _documented(payload: type[Payload]) -> Callable[..., Awaitable[None]]:
    async def handler(event) -> None:  # never called: it carries the schema
        return None

    handler.__annotations__ = {"event": CloudEvent[payload], "return": None}  # type: ignore[valid-type]
    handler.__name__ = payload.__name__
    return handler


def create_app(service: Service, **fastapi_options: Any) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warm_routes(app)
        async with service.running():
            yield

    app = FastAPI(title=f"imgest {service.name}", version=VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, **fastapi_options)
    app.state.service = service
    app.add_middleware(HeadAsGet, owner=app)
    app.add_middleware(HeadCheck, owner=app)
    add_problem_handlers(app)
    problem_only_openapi(app)
    add_local_docs(app)

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers (which "
             "one: a service may serve its port from several)")
    async def healthz() -> dict[str, str | int]:
        return {"status": "ok", "service": service.name, "pid": os.getpid()}

    @app.get("/readyz", tags=["operations"], summary="Readiness: database, broker and store answer")
    async def readyz(response: Response) -> dict[str, Any]:
        checks = await service.ready()
        ok = all(v == "ok" for v in checks.values())
        response.status_code = 200 if ok else 503
        return {"status": "ok" if ok else "unavailable", "checks": checks}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=Response)
    async def metrics() -> Response:
        registry = workers_registry() if os.environ.get(METRICS_DIR) else REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/asyncapi.json", tags=["operations"], summary="AsyncAPI document of this service")
    async def asyncapi() -> dict[str, Any]:
        return service.asyncapi()

    return app


def warm_routes(app: FastAPI) -> None:
    """Builds the app's routing tables before it serves: FastAPI builds an included router's
    routes on their first match, which made each gateway worker's first request take 0.1-0.2 s
    (a path that matches nothing walks them all)."""
    scope = {"type": "http", "method": "GET", "path": "/\x00", "root_path": "", "headers": [],
             "query_string": b""}
    for route in app.router.routes:
        route.matches(scope)


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


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods some route answers on this path, asked of the routes themselves."""
    found = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS") if routed(app, {
        "type": "http", "path": path, "method": m, "root_path": "", "app": app, "headers": []})]
    return found[:1] + ["HEAD"] + found[1:] if "GET" in found else found  # (http.HeadAsGet)


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status,
                         "detail": detail, **extra}, status_code=status, media_type=PROBLEM)


def add_problem_handlers(app: FastAPI) -> None:
    """Every error leaves as problem+json, never as a bare string or an HTML page."""
    from http import HTTPStatus

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        response = problem(error.status_code, HTTPStatus(error.status_code).phrase,
                           str(error.detail))
        response.headers.update(error.headers or {})
        if error.status_code == 405:
            # Starlette names only the first route whose path matched; two routes may share a
            # path (GET /uploads/{id}, PUT /uploads/{filename}).
            response.headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
        return problem(422, "Unprocessable Content", "The request is not valid.", errors=errors)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    # The same from statements run on the driver itself (imgest_runtime.db.Statement): a
    # connection lost, the server shutting down or not yet up.
    @app.exception_handler(PostgresConnectionError)
    @app.exception_handler(OperatorInterventionError)
    @app.exception_handler(OSError)  # a refused connect: asyncpg's, which SQLAlchemy passes on
    async def database_away(request: Request, error: Exception) -> Response:
        """The database does not answer (restarting, unreachable): a 503 to retry, as the
        other errors are told (the XNAT paths' plain text included), not a bare 500."""
        if isinstance(error, OSError) and not any(
                "/asyncpg/" in frame.filename for frame in traceback.extract_tb(
                    error.__traceback__)):
            raise error  # not the database's: a fault, answered as one (500)
        log.warning("%s %s: the database does not answer (%s)", request.method,
                    request.url.path, type(getattr(error, "orig", error)).__name__)
        return await app.exception_handlers[HTTPException](request, HTTPException(
            503, "The database does not answer; try again shortly.",
            headers={"Retry-After": "5"}))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _error: ClientDisconnect) -> Response:
        """The client went away before its body ended: nothing wrong here, no one to answer
        (what it sent is dropped by the route). 499, as nginx logs it."""
        log.info("%s %s: the client went away before the request's body ended",
                 request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(DBAPIError)  # (how SQLAlchemy passes it on: the driver's inside)
    @app.exception_handler(CharacterNotInRepertoireError)
    @app.exception_handler(UntranslatableCharacterError)
    async def unstorable_text(request: Request, error: Exception) -> Response:
        """A value of the request's body that no text column can hold (a NUL): the client's
        fault, told as such (its path and query are checked before: http.head_fault)."""
        if not _unstorable(error):
            raise error  # another error of the database's: a fault, answered as one (500)
        return await app.exception_handlers[HTTPException](request, HTTPException(
            400, "The request holds a character that cannot be stored (NUL)."))

    @app.exception_handler(Exception)
    async def fault(request: Request, _error: Exception) -> Response:
        """A fault of ours: answered in the form of every other error (uvicorn logs it)."""
        return await app.exception_handlers[HTTPException](request, HTTPException(
            500, "Something went wrong on our side; it is logged. Try again, or tell the "
            "administrator if it persists."))


def _unstorable(error: BaseException | None) -> bool:
    """Whether the database refused a character of a value (through SQLAlchemy, or not)."""
    for _ in range(8):  # (a chain is short; a cycle must not hang an answer)
        if error is None:
            return False
        if isinstance(error, (CharacterNotInRepertoireError, UntranslatableCharacterError)):
            return True
        error = error.__cause__ or getattr(error, "orig", None)
    return False


def serve(app_factory: Callable[[], FastAPI], settings: RuntimeSettings, port: int,
          service: str, workers: int = 1) -> None:
    """The process entry point: migrate first, then serve until SIGTERM/SIGINT (with
    `workers` > 1, from that many processes: imgest_runtime.workers)."""
    import uvicorn

    setup_logging(service, settings.log_level)
    app = app_factory()
    app.state.service.migrate()
    fresh_metrics_dir()
    # What start-up made (modules, the app, its models: most of the heap) is kept out of the
    # collector's reach: a full collection then looks at the objects made since, not at all of
    # them again (submitting 1,000 files: 0.40-0.71 -> 0.33-0.53 s, alternating restarts).
    # Before the workers fork, so none of them touches those pages either.
    gc.collect()
    gc.freeze()
    options: dict[str, Any] = {
        "host": settings.http_host, "port": port, "log_config": None,
        "timeout_graceful_shutdown": 20, "limit_concurrency": None,
        "http": BoundedHeadProtocol}
    if workers == 1:
        uvicorn.run(app, **options)
        return
    serve_workers(app, workers, options)
