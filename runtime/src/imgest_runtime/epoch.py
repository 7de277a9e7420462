"""Noticing that the broker forgot everything, and sending again what it forgot.

The embedded broker (Tansu) keeps topics in memory: when it restarts, every event in flight is
gone. A broker's *epoch* is a random id written as the first record of `imgest.broker.epoch`;
a broker that lost its memory has no such record, so the first service to look writes a new one.
Each service remembers the epoch it last saw; when it changes, the service marks its recent
outbox rows unsent, and the relay publishes them again in their original order. Consumers'
inboxes make the replay harmless for work already done, and every service replays its own
outputs, so each stage of the pipeline is fed again. Each process also rewinds its consumer:
offsets of the old broker mean nothing in the new one's logs (see `Consumer.rewind`). On a durable Kafka the epoch never changes
and nothing is replayed.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .db import Database
from .outbox import DeliveryTables

log = logging.getLogger("imgest.epoch")

EPOCH_TOPIC = "imgest.broker.epoch"


async def _first_record(bootstrap: str, timeout_ms: int = 1500) -> str | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        await consumer.start()
        partition = TopicPartition(EPOCH_TOPIC, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        batch = await consumer.getmany(partition, timeout_ms=timeout_ms, max_records=1)
        records = batch.get(partition, [])
        return records[0].value.decode() if records else None
    finally:
        await consumer.stop()


async def broker_epoch(bootstrap: str) -> str:
    """The broker's epoch; written if the broker has none (several writers: the first wins)."""
    found = await _first_record(bootstrap)
    if found:
        return found
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(EPOCH_TOPIC, uuid.uuid4().hex.encode(), partition=0)
    finally:
        await producer.stop()
    found = await _first_record(bootstrap, timeout_ms=5000)
    if not found:
        raise RuntimeError("the broker did not return the epoch record just written")
    return found


async def check_epoch(db: Database, tables: DeliveryTables, epoch: str,
                      replay_window: timedelta) -> int:
    """Replays the outbox of the last `replay_window` if the broker's epoch is not the one the
    service last saw; returns how many events were marked for sending again."""
    table = tables.broker
    async with db.session() as session:
        known = (await session.execute(
            select(table.c.epoch).where(table.c.id == 1).with_for_update())).scalar()
        if known == epoch:
            return 0
        await session.execute(pg_insert(table).values(id=1, epoch=epoch, seen_at=datetime.now(UTC))
                              .on_conflict_do_update(index_elements=["id"],
                                                     set_={"epoch": epoch,
                                                           "seen_at": datetime.now(UTC)}))
        if known is None:
            return 0  # first start: nothing was sent to an earlier broker
        outbox = tables.outbox
        since = datetime.now(UTC) - replay_window
        replayed = (await session.execute(
            update(outbox).where(outbox.c.created_at >= since,
                                 outbox.c.published_at.is_not(None))
            .values(published_at=None))).rowcount
    log.warning("the broker lost its memory (epoch %s → %s): sending %d events again", known,
                epoch, replayed)
    return replayed
