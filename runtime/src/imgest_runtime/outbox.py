"""Transactional outbox and inbox, in each service's own schema.

A handler writes its state change, the events it causes (outbox) and the id of the event it
handled (inbox) in one transaction. The relay publishes outbox rows afterwards and marks them
sent; a crash in between publishes them again, which the consumers' inbox makes harmless.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError
from imgest_contracts import CloudEvent, Payload, topic_of
from prometheus_client import Counter
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    bindparam,
    cast,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import Database, any_of, unnested

log = logging.getLogger("imgest.outbox")

undeliverable = Counter("imgest_outbox_undeliverable_total",
                        "Outbox events larger than the broker takes, left in the outbox",
                        ["topic"])


@dataclass
class DeliveryTables:
    outbox: Table
    inbox: Table
    broker: Table  # the broker epoch this service last saw (see epoch.py)


def delivery_tables(metadata: MetaData) -> DeliveryTables:
    """Adds the outbox and inbox tables to a service's metadata (so its migrations create them)."""
    outbox = Table(
        "outbox", metadata,
        Column("seq", BigInteger, Identity(), primary_key=True),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("topic", String(200), nullable=False),
        Column("key", Text, nullable=True),
        Column("value", JSONB, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("published_at", DateTime(timezone=True), nullable=True),
    )
    # The relay's rows in order (`pending`), however many wait; it holds only those.
    Index("outbox_pending", outbox.c.seq, postgresql_where=outbox.c.published_at.is_(None))
    inbox = Table(
        "inbox", metadata,
        Column("event_id", String(64), primary_key=True),
        Column("topic", String(200), nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False),
    )
    broker = Table(
        "broker", metadata,
        Column("id", Integer, primary_key=True),
        Column("epoch", String(64), nullable=False),
        Column("seen_at", DateTime(timezone=True), nullable=False),
    )
    return DeliveryTables(outbox, inbox, broker)


@dataclass
class Outbox:
    tables: DeliveryTables
    source: str  # CloudEvents source, "/imgest/<service>"
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Unguarded (IMGEST_DELIVERY=unguarded, for bench/pipeline.py only): no outbox rows, events
    # sent straight after the commit, and no inbox. Lossy on a crash; it measures the cost.
    send_directly: Callable[[str, bytes | None, dict], Awaitable[Any]] | None = None
    _sending: set[asyncio.Task] = field(default_factory=set)

    async def add(self, session: AsyncSession, payload: Payload, *, event_id: str | None = None
                  ) -> CloudEvent:
        """Records an event to publish once the surrounding transaction commits.

        A deterministic `event_id` makes a re-run of the same work a no-op here too.
        """
        return (await self.add_many(session, [(payload, event_id)]))[0]

    async def add_many(self, session: AsyncSession,
                       payloads: list[tuple[Payload, str | None]]) -> list[CloudEvent]:
        """`add` for many events in one statement (a batch's outcomes)."""
        events = [CloudEvent.wrap(payload, source=self.source, event_id=event_id)
                  for payload, event_id in payloads]
        if self.send_directly is not None:
            for event, (payload, _) in zip(events, payloads):
                self._send_after_commit(session, event, payload)
            return events
        if not events:
            return events
        # The events as JSON text, made JSONB by PostgreSQL: no dict is built and encoded again.
        await session.execute(self._add_rows, {
            "event_ids": [event.id for event in events],
            "topics": [topic_of(type(payload)) for payload, _ in payloads],
            "keys": [payload.message_key() for payload, _ in payloads],
            "values": [event.model_dump_json(exclude_none=True) for event in events],
            "now": datetime.now(UTC)})
        # Wake the relay once the rows are visible, not before: on commit.
        sa_event.listen(session.sync_session, "after_commit", lambda _s: self.wake.set(), once=True)
        return events

    async def resend(self, session: AsyncSession, topic: str, key: str | None, value: dict
                     ) -> None:
        """Sends an event again under its own id (a re-drive), whoever first sent it."""
        stmt = pg_insert(self.tables.outbox).values(
            event_id=value["id"], topic=topic, key=key, value=value,
            created_at=datetime.now(UTC))
        await session.execute(stmt.on_conflict_do_update(
            index_elements=["event_id"], set_={"published_at": None}))
        sa_event.listen(session.sync_session, "after_commit", lambda _s: self.wake.set(), once=True)

    async def resend_key(self, session: AsyncSession, key: str, topic: str) -> int:
        """Marks this service's events of a topic with this key unsent (a re-drive); returns
        how many."""
        table = self.tables.outbox
        marked = (await session.execute(update(table).where(
            table.c.key == key, table.c.topic == topic, table.c.published_at.is_not(None))
            .values(published_at=None))).rowcount
        sa_event.listen(session.sync_session, "after_commit", lambda _s: self.wake.set(), once=True)
        return marked

    def _send_after_commit(self, session: AsyncSession, event: CloudEvent, payload: Payload
                           ) -> None:
        assert self.send_directly is not None
        send = self.send_directly
        topic, key = topic_of(type(payload)), payload.message_key()
        value = json.loads(event.model_dump_json(exclude_none=True))

        def sent(_session) -> None:
            task = asyncio.get_running_loop().create_task(
                send(topic, key.encode() if key else None, value))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

        sa_event.listen(session.sync_session, "after_commit", sent, once=True)

    async def seen(self, session: AsyncSession, event_id: str, topic: str) -> bool:
        """Marks an incoming event handled; True if it already was (a redelivery)."""
        return event_id not in await self.fresh(session, {event_id: topic})

    async def fresh(self, session: AsyncSession, events: dict[str, str]) -> set[str]:
        """Marks a batch of incoming events (id → type) handled in one statement; returns the
        ids not handled before."""
        if not events:
            return set()
        if self.send_directly is not None:
            return set(events)  # unguarded: no inbox
        return set((await session.execute(self._mark_handled, {
            "event_ids": list(events), "topics": list(events.values()),
            "now": datetime.now(UTC)})).scalars())

    @functools.cached_property
    def _add_rows(self) -> Any:
        outbox = self.tables.outbox
        rows = unnested("rows", event_id=Text, topic=Text, key=Text, value=Text)
        return pg_insert(outbox).from_select(
            ["event_id", "topic", "key", "value", "created_at"],
            select(rows.c.event_id, rows.c.topic, rows.c.key, cast(rows.c.value, JSONB),
                   bindparam("now", type_=DateTime(timezone=True))),
        ).on_conflict_do_nothing(index_elements=["event_id"])

    @functools.cached_property
    def _mark_handled(self) -> Any:
        # (A VALUES row per event was compiled anew for every batch: ~10 ms of CPU for 200
        # events, in every service.)
        inbox = self.tables.inbox
        handled = unnested("handled", event_id=String, topic=String)
        return pg_insert(inbox).from_select(
            ["event_id", "topic", "processed_at"],
            select(handled.c.event_id, handled.c.topic,
                   bindparam("now", type_=DateTime(timezone=True))),
        ).on_conflict_do_nothing(index_elements=["event_id"]).returning(inbox.c.event_id)

_IDS = uuid.UUID("6f1c3d52-1b2a-4c4e-9f3e-2d6a0b7c8e90")


def derived_id(*parts: str) -> str:
    """A deterministic event id for what handling one event causes, so a re-run is a no-op."""
    return str(uuid.uuid5(_IDS, "\0".join(parts)))


# A relay's pass, for its transaction alone:
# - marking rows sent need not wait for the disk: if the mark is lost in a crash, the rows are
#   sent again, which consumers' inboxes absorb. Saves an fsync per pass;
# - its rows are read in order from the index of unsent rows, never fetched all and sorted:
#   after a replay or a burst the planner's statistics still say few are unsent, and a sort
#   of 20,000 rows, values and all, took ~250 ms a pass (against ~5).
PASS_SETTINGS = text("select set_config('synchronous_commit', 'off', true), "
                     "set_config('enable_sort', 'off', true)")


def pending(outbox: Table, batch: int) -> Select:
    """The relay's next rows: the oldest `batch` unsent, locked (another relay skips them)."""
    return (select(outbox.c.seq, outbox.c.topic, outbox.c.key,
                   cast(outbox.c.value, Text).label("value"),
                   outbox.c.value["type"].astext.label("type"))
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.seq).limit(batch)
            .with_for_update(skip_locked=True))


class Relay:
    """Publishes the outbox in order of writing; woken at once after a write, polls otherwise."""

    def __init__(self, db: Database, outbox: Outbox, broker, *, batch: int = 500,
                 poll_seconds: float = 1.0):
        self.db = db
        self.outbox = outbox
        self.broker = broker
        self.batch = batch
        self.poll_seconds = poll_seconds
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def publish_pending(self) -> int:
        """One pass: publish up to `batch` rows and mark them; returns how many were sent."""
        table = self.outbox.tables.outbox
        async with self.db.session() as session:
            await session.execute(PASS_SETTINGS)
            # One pass at a time among the service's relays (its workers, its replicas): two
            # publishing side by side could put an event ahead of an earlier one of its key.
            await session.execute(text("select pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                                  {"k": f"relay:{table.fullname}"})
            # The event as JSONB's text (PostgreSQL's key order and spacing; the same JSON
            # as the event's own text), sent as it is: not decoded into a dict only to be
            # encoded again.
            rows = (await session.execute(pending(table, self.batch))).all()
            if not rows:
                return 0
            sends, refused = [], []
            for row in rows:
                try:
                    sends.append((row, await self._send(row)))
                except MessageSizeTooLargeError as error:  # (the producer's own limit)
                    refused.append(self._too_large(row, error))
            # Every send acknowledged (acks=all) before marking.
            outcomes = await asyncio.gather(*(sent for _, sent in sends),
                                            return_exceptions=True)
            for (row, _), outcome in zip(sends, outcomes):
                if isinstance(outcome, MessageSizeTooLargeError):
                    # The broker refuses a whole record batch for one record too large: its
                    # events go again one at a time, and only one refused alone is passed.
                    try:
                        await (await self._send(row))
                    except MessageSizeTooLargeError as error:
                        refused.append(self._too_large(row, error))
                elif isinstance(outcome, BaseException):
                    raise outcome
            await session.execute(
                update(table).where(any_of(table.c.seq, [r.seq for r in rows]))
                .values(published_at=datetime.now(UTC))
            )
            if refused:  # passed, and kept: never old enough to be pruned
                await session.execute(update(table).where(any_of(table.c.seq, refused))
                                      .values(published_at=literal_column("'infinity'")))
        return len(rows)

    async def _send(self, row: Any) -> asyncio.Future:
        """Hands one outbox row to the producer; the future resolves once the broker has it."""
        return await self.broker.publish(
            row.value.encode(), row.topic, key=row.key.encode() if row.key else None,
            # structured-mode CloudEvents
            headers={"content-type": "application/json", "ce_type": row.type or ""},
            no_confirm=True,
        )

    def _too_large(self, row: Any, error: Exception) -> int:
        """An event the broker will never take must not hold up every later one: it is
        passed, counted and logged; returns its seq (the row stays in the outbox, marked sent
        at 'infinity', so that no pruning deletes it). What it was about does not happen, so
        the events that grow with an upload are kept below the limit where they are made
        (upload.completed: importer.within_budget)."""
        undeliverable.labels(row.topic).inc()
        log.error("outbox: the event in row seq=%d of %s (%s, %d bytes) is larger than the "
                  "broker takes (%s); it is not sent, and the relay goes on", row.seq,
                  self.outbox.tables.outbox.fullname, row.type, len(row.value), error)
        return row.seq

    async def run(self) -> None:
        while not self._stopping:
            self.outbox.wake.clear()
            try:
                sent = await self.publish_pending()
                if sent:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # broker or database down: try again shortly
                log.warning("outbox relay pass failed; retrying", exc_info=True)
                await asyncio.sleep(self.poll_seconds)
                continue
            try:
                await asyncio.wait_for(self.outbox.wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="outbox-relay")

    async def stop(self) -> None:
        """Flushes what is pending (best effort), then stops."""
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # its errors were logged
        try:
            while await asyncio.wait_for(self.publish_pending(), 10):
                pass
        except Exception:  # noqa: BLE001
            log.warning("outbox not fully flushed at shutdown; it is sent on the next start")


async def insert_ignore(session: AsyncSession, table: Table, **values) -> bool:
    """Insert unless the primary key exists; True if inserted."""
    result = await session.execute(
        pg_insert(table).values(**values).on_conflict_do_nothing()
    )
    return bool(result.rowcount)


async def prune(db: Database, tables: DeliveryTables, *, replay_hours: float,
                inbox_hours: float, batch: int = 10_000) -> tuple[int, int]:
    """Deletes outbox rows sent before the replay window (no replay sends them again) and inbox
    marks older than `inbox_hours` (well past the window: every event that can come again is
    younger); returns how many of each. Without it both tables grew for ever. In batches, each
    its own transaction (the first pass of a long-running deployment has months to delete), and
    by one of the service's replicas at a time."""
    now = datetime.now(UTC)
    done = []
    for table, column, hours in [(tables.outbox, "published_at", replay_hours),
                                 (tables.inbox, "processed_at", inbox_hours)]:
        name = f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'
        deleted = 0
        while True:
            async with db.session() as session:
                if not (await session.execute(
                        text("select pg_try_advisory_xact_lock(hashtextextended(:k, 0))"),
                        {"k": f"prune:{name}"})).scalar():
                    break  # another replica prunes it now
                n = (await session.execute(text(
                    f"delete from {name} where ctid = any(array(select ctid from {name} "
                    f"where {column} < :before limit :batch))"),
                    {"before": now - timedelta(hours=hours), "batch": batch})).rowcount
            deleted += n
            if n < batch:
                break
        done.append(deleted)
    if any(done):
        log.info("pruned %d sent outbox rows and %d inbox marks", *done)
    return done[0], done[1]


def index_unsent_rows(schema: str) -> None:
    """Migration step (every service's, in its schema): the `outbox_pending` index in place of
    the one on published_at. Not CONCURRENTLY: that waits for every older snapshot, and the
    services waiting for the migration lock (migrations/env.py) hold one while they wait."""
    from alembic import op

    op.drop_index(f"ix_{schema}_outbox_published_at", table_name="outbox", schema=schema)
    op.create_index("outbox_pending", "outbox", ["seq"], schema=schema,
                    postgresql_where=text("published_at IS NULL"))


def unindex_unsent_rows(schema: str) -> None:
    """The reverse of `index_unsent_rows`."""
    from alembic import op

    op.drop_index("outbox_pending", table_name="outbox", schema=schema)
    op.create_index(f"ix_{schema}_outbox_published_at", "outbox", ["published_at"],
                    schema=schema)


__all__ = ["PASS_SETTINGS", "DeliveryTables", "Outbox", "Relay", "delivery_tables", "derived_id",
           "index_unsent_rows", "insert_ignore", "pending", "prune", "unindex_unsent_rows"]
