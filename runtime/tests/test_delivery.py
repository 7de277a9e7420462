"""Delivery on a real broker (Tansu) and database (embedded PostgreSQL): retries, dead letters,
offsets committed after the work, and the outbox/inbox pair."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from imgest_contracts import (
    CloudEvent,
    FileRejected,
    FileStaged,
    FileValidated,
    ObjectStored,
    Reason,
    Source,
    UploadCancelled,
    UploadSubmitted,
    topic_of,
)
from imgest_runtime.broker import (
    MAX_OUTAGES,
    Consumer,
    Delivery,
    GaveUp,
    PermanentError,
    dlq_topic,
    ensure_topics,
    make_broker,
    retrying,
)
from imgest_runtime.db import Database
from imgest_runtime.outbox import (
    PASS_SETTINGS,
    Outbox,
    Relay,
    delivery_tables,
    derived_id,
    pending,
    prune,
)
from imgest_runtime.service import Service
from imgest_runtime.settings import RuntimeSettings
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData, text

from imgest.infra import Postgres, Tansu, free_port

SHA = "a" * 64
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bootstrap():
    tansu = Tansu(free_port())
    yield tansu.start()
    tansu.stop()


@pytest.fixture(scope="module")
def postgres():
    root = Path(tempfile.mkdtemp(prefix="imgest-runtime-pg-"))
    root.chmod(0o755)
    pg = Postgres(root / "data")
    pg.start()
    yield pg
    pg.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def database_url(postgres: Postgres) -> str:
    return postgres.url("delivery")


def settings(bootstrap: str, **kw) -> RuntimeSettings:
    return RuntimeSettings(kafka_bootstrap=bootstrap, max_attempts=3, retry_base_seconds=0.01,
                           **kw)


def staged(upload_id: str) -> FileStaged:
    return FileStaged(upload_id=upload_id, file_id="f", object_key="k", path="p", size=1,
                      sha256=SHA, source=Source(object_key="k", files_total=1))


async def dead_letters(bootstrap: str, topic: str, expect: int, timeout: float = 20):
    consumer = AIOKafkaConsumer(dlq_topic(topic), bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest")  # no group: no join to wait for
    await consumer.start()
    found = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found) < expect and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            found += [m for records in batch.values() for m in records]
    finally:
        await consumer.stop()
    return found


def each(handler):
    """A batch handler calling `handler(event)` for each event, in order."""
    async def batch(deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            await handler(delivery.event)
    return batch


async def run_consumer(bootstrap, service, payload, handler, publish, until, timeout=30, **kw):
    broker = make_broker(settings(bootstrap), service, registry=CollectorRegistry())
    consumer = Consumer(broker, service, settings(bootstrap, kafka_session_timeout_ms=3000, **kw))
    consumer.on(payload)(each(handler))
    consumer.build()
    await ensure_topics(bootstrap, [topic_of(payload)], 1)
    await broker.start()
    try:
        await publish(broker)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until() and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await broker.stop()


async def test_outages_waited_out_do_not_count_but_not_for_ever():
    calls, waits = [], []

    async def work() -> None:
        calls.append(1)
        raise RuntimeError("server closed the connection")

    async def outage(_error: Exception) -> bool:  # the database was away each time
        waits.append(1)
        return True

    with pytest.raises(GaveUp) as gave_up:
        await retrying(work, what="t", attempts=3, base_seconds=0.001, outage=outage)
    # Work that takes the database down each time it runs (a poison) still ends.
    assert len(calls) == MAX_OUTAGES + 3 and len(waits) == MAX_OUTAGES
    assert gave_up.value.attempts == 3


async def test_a_failing_handler_is_retried_until_it_succeeds(bootstrap):
    calls = []

    async def flaky(event: CloudEvent[ObjectStored]) -> None:
        calls.append(event.id)
        if len(calls) < 3:
            raise ConnectionError("database briefly away")

    event = CloudEvent.wrap(ObjectStored(upload_id="u1", object_key="k", filename="f", size=1,
                                         sha256=SHA), source="/test")
    await run_consumer(bootstrap, "retry", ObjectStored, flaky,
                       lambda b: b.publish(json.loads(event.model_dump_json()),
                                           topic_of(ObjectStored)),
                       until=lambda: len(calls) >= 3)
    assert calls == [event.id] * 3
    assert await dead_letters(bootstrap, topic_of(ObjectStored), 0, timeout=2) == []


async def test_permanent_errors_and_poison_events_go_to_the_dead_letter_topic(bootstrap):
    calls = []

    async def refuses(event: CloudEvent[FileStaged]) -> None:
        calls.append(event.data.upload_id)
        if event.data.upload_id == "bad":
            raise PermanentError("cannot ever work")

    async def publish(broker):
        topic = topic_of(FileStaged)
        await broker.publish(json.loads(CloudEvent.wrap(staged("bad"), source="/t")
                                        .model_dump_json()), topic, key=b"bad")
        await broker.publish({"not": "a cloudevent"}, topic, key=b"poison")
        await broker.publish(b"\xff\xfe not json", topic, key=b"garbage")
        await broker.publish(json.loads(CloudEvent.wrap(staged("good"), source="/t")
                                        .model_dump_json()), topic, key=b"good")

    await run_consumer(bootstrap, "dlq", FileStaged, refuses, publish,
                       until=lambda: "good" in calls)
    # "bad" fails once in its batch and once alone (which shows it is the culprit); it is not
    # retried beyond that, and "good" is handled once, after it.
    assert calls in (["bad", "good"], ["bad", "bad", "good"]), calls
    letters = {m.key: dict(m.headers) for m in await dead_letters(bootstrap, topic_of(FileStaged), 3)}
    assert set(letters) == {b"bad", b"poison", b"garbage"}, "poison never reaches the handler"
    bad = letters[b"bad"]
    assert bad["x-imgest-error-kind"] == b"permanent"
    assert bad["x-imgest-attempts"] == b"1"
    assert bad["x-imgest-origin-topic"] == topic_of(FileStaged).encode()
    assert b"cannot ever work" in bad["x-imgest-error"]
    assert letters[b"poison"]["x-imgest-error-kind"] == b"permanent"
    assert b"ValidationError" in letters[b"garbage"]["x-imgest-error"]


async def test_an_event_that_keeps_failing_is_dead_lettered_after_max_attempts(bootstrap):
    calls = []

    async def broken(event: CloudEvent[FileRejected]) -> None:
        calls.append(1)
        raise RuntimeError("always")

    rejected = FileRejected(upload_id="u", file_id="f", object_key="k", path="p",
                            source=Source(object_key="k", files_total=1),
                            reason=Reason(code="x", message="y"))
    await run_consumer(bootstrap, "exhaust", FileRejected, broken,
                       lambda b: b.publish(json.loads(CloudEvent.wrap(rejected, source="/t")
                                                      .model_dump_json()), topic_of(FileRejected)),
                       until=lambda: len(calls) >= 3)
    letters = await dead_letters(bootstrap, topic_of(FileRejected), 1)
    assert len(calls) == 3 and len(letters) == 1
    assert dict(letters[0].headers)["x-imgest-error-kind"] == b"transient"
    assert dict(letters[0].headers)["x-imgest-attempts"] == b"3"


async def test_a_database_outage_holds_events_instead_of_dead_lettering_them(
        bootstrap, postgres, database_url):
    """Away for longer than all of an event's attempts (3, ~10 ms apart): the service's
    consumer waits for the database, then handles the event, and dead-letters nothing."""
    svc = Service(name="outage", metadata=MetaData(), versions_dir=Path("."), uses_store=False,
                  settings=settings(bootstrap, database_url=database_url,
                                    kafka_session_timeout_ms=3000))
    handled: list[str] = []

    @svc.consumer.on(UploadCancelled)
    async def on_cancelled(deliveries: list[Delivery]) -> None:
        async with svc.db.session() as session:
            await session.execute(text("select 1"))
        handled.extend(d.event.data.upload_id for d in deliveries)

    svc.consumer.build()
    await ensure_topics(bootstrap, [topic_of(UploadCancelled)], 1)
    await svc.broker.start()
    try:
        await asyncio.to_thread(postgres.stop)
        cancelled = UploadCancelled(upload_id="u-outage", username="a",
                                    cancelled_at=datetime.now(UTC))
        await svc.broker.publish(json.loads(CloudEvent.wrap(cancelled, source="/t")
                                            .model_dump_json()), topic_of(UploadCancelled))
        await asyncio.sleep(4)
        assert handled == []
        await asyncio.to_thread(postgres.start)
        for _ in range(300):
            if handled:
                break
            await asyncio.sleep(0.1)
        assert handled == ["u-outage"]
    finally:
        await svc.broker.stop()
        await svc.db.close()
    assert await dead_letters(bootstrap, topic_of(UploadCancelled), 1, timeout=2) == []


async def test_offsets_are_committed_after_handling_so_a_restart_does_not_redeliver(bootstrap):
    seen: list[str] = []

    async def handler(event: CloudEvent[UploadSubmitted]) -> None:
        seen.append(event.data.upload_id)

    def submitted(n: int) -> dict:
        return json.loads(CloudEvent.wrap(UploadSubmitted(
            upload_id=f"u{n}", uploader={"username": "a"}, options={}, object_keys=[],
            submitted_at=datetime.now(UTC)), source="/t").model_dump_json())

    async def publish_two(broker):
        for n in (1, 2):
            await broker.publish(submitted(n), topic_of(UploadSubmitted))

    await run_consumer(bootstrap, "offsets", UploadSubmitted, handler, publish_two,
                       until=lambda: len(seen) == 2)
    await asyncio.sleep(0.5)
    # A new member of the same group starts where the last one committed: nothing twice.
    await run_consumer(bootstrap, "offsets", UploadSubmitted, handler,
                       lambda b: b.publish(submitted(3), topic_of(UploadSubmitted)),
                       until=lambda: len(seen) == 3)
    assert seen == ["u1", "u2", "u3"]
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="imgest-offsets",
                             enable_auto_commit=False)
    await probe.start()
    try:
        assert await probe.committed(TopicPartition(topic_of(UploadSubmitted), 0)) == 3
    finally:
        await probe.stop()


async def outbox_in(database_url: str, schema: str) -> tuple[Database, Outbox]:
    """A database with an outbox (and inbox) in a schema of its own."""
    metadata = MetaData(schema=schema)
    tables = delivery_tables(metadata)
    db = Database(database_url)
    async with db.engine.begin() as conn:
        await conn.execute(text(f'create schema if not exists "{schema}"'))
        await conn.run_sync(metadata.create_all)
    return db, Outbox(tables, source="/imgest/test")


async def test_outbox_relay_publishes_after_commit_and_inbox_drops_redeliveries(bootstrap,
                                                                                database_url):
    db, outbox = await outbox_in(database_url, "delivery_test")
    broker = make_broker(settings(bootstrap), "outbox", registry=CollectorRegistry())
    received: list[CloudEvent] = []
    headers: list[dict[str, bytes]] = []
    bodies: list[bytes] = []
    consumer = Consumer(broker, "outbox", settings(bootstrap, kafka_session_timeout_ms=3000))

    @consumer.on(FileValidated)
    async def on_validated(deliveries: list[Delivery]) -> None:
        received.extend(d.event for d in deliveries)
        headers.extend(dict(d.record.headers) for d in deliveries)
        bodies.extend(d.record.value for d in deliveries)

    consumer.build()
    await ensure_topics(bootstrap, [topic_of(FileValidated)], 1)
    await broker.start()
    relay = Relay(db, outbox, broker, poll_seconds=0.2)
    relay.start()
    try:
        payload = FileValidated(upload_id="u9", file_id="f", object_key="k", path="p", size=1,
                                sha256=SHA, source=Source(object_key="k", files_total=1),
                                kind="dicom")
        event_id = derived_id("test", "u9")
        with pytest.raises(RuntimeError):
            async with db.session() as session:  # rolled back: nothing may be published
                await outbox.add(session, payload, event_id=derived_id("rolled", "back"))
                raise RuntimeError("handler failed")
        async with db.session() as session:
            await outbox.add(session, payload, event_id=event_id)
            await outbox.add(session, payload, event_id=event_id)  # same work twice: one row
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert [e.id for e in received] == [event_id]
        assert received[0].data == payload and received[0].type == "imgest.file.validated.v1"
        # Structured-mode CloudEvents, as other systems read them.
        assert headers[0]["content-type"] == b"application/json"
        assert headers[0]["ce_type"] == b"imgest.file.validated.v1"
        assert json.loads(bodies[0]) == json.loads(received[0].model_dump_json(exclude_none=True))
        async with db.session() as session:
            assert await outbox.seen(session, event_id, "t") is False
        async with db.session() as session:
            assert await outbox.seen(session, event_id, "t") is True  # a redelivery
        async with db.session() as session:  # a batch: only the new ones are fresh
            assert await outbox.fresh(session, {"e2": "a", event_id: "t", "e3": "b"}) == {
                "e2", "e3"}
        async with db.session() as session:
            handled = dict((await session.execute(text(
                "select event_id, topic from delivery_test.inbox"))).all())
        assert handled == {event_id: "t", "e2": "a", "e3": "b"}
        async with db.session() as session:
            left = (await session.execute(text(
                "select count(*) from delivery_test.outbox where published_at is null"))).scalar()
        assert left == 0
    finally:
        await relay.stop()
        await broker.stop()
        await db.close()


async def test_the_relay_reads_its_batch_alone_however_stale_the_statistics(database_url):
    """A replay (or a burst) leaves thousands of rows unsent while the planner's statistics
    still say there are none: the relay's query must still walk its batch in order, not
    fetch and sort every unsent row, values and all, on each pass (it took ~250 ms so)."""
    db, outbox = await outbox_in(database_url, "pending_test")
    try:
        async with db.session() as session:
            await session.execute(text(
                "insert into pending_test.outbox (event_id, topic, value, created_at, "
                "published_at) select 'e' || i, 't', jsonb_build_object('type', 'x', 'data', "
                "repeat('a', 1000)), now(), now() from generate_series(1, 5000) i"))
        async with db.engine.connect() as conn:
            await conn.execute(text("analyze pending_test.outbox"))
        async with db.session() as session:  # as a replay marks them: no fresh statistics
            await session.execute(text("update pending_test.outbox set published_at = null"))
        async with db.engine.connect() as conn:
            await conn.execute(PASS_SETTINGS)
            statement = pending(outbox.tables.outbox, 500).compile(
                dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            plan = (await conn.execute(text(f"explain (format json) {statement}"))).scalar()
        nodes, stack = [], [plan[0]["Plan"]]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack += node.get("Plans", [])
        assert "Sort" not in [n["Node Type"] for n in nodes], plan
        assert [n.get("Index Name") for n in nodes if "Index Name" in n] == ["outbox_pending"]
    finally:
        await db.close()


async def test_sent_events_and_inbox_marks_past_their_keeping_are_pruned(database_url):
    db, outbox = await outbox_in(database_url, "prune_test")
    now = datetime.now(UTC)
    rows = {  # event id: (created, published)
        "sent-long-ago": (now - timedelta(hours=30), now - timedelta(hours=25)),
        "sent-lately": (now - timedelta(hours=2), now - timedelta(hours=1)),
        "never-sent": (now - timedelta(hours=30), None),  # (a broker away a day: still sent)
    }
    marks = {"handled-long-ago": now - timedelta(days=8), "handled-lately": now - timedelta(days=2)}
    try:
        async with db.session() as session:
            await session.execute(outbox.tables.outbox.insert(), [
                {"event_id": e, "topic": "t", "value": {}, "created_at": c, "published_at": p}
                for e, (c, p) in rows.items()])
            await session.execute(outbox.tables.inbox.insert(), [
                {"event_id": e, "topic": "t", "processed_at": at} for e, at in marks.items()])
        assert await prune(db, outbox.tables, replay_hours=24, inbox_hours=168,
                           batch=1) == (1, 1)  # (batch=1: every batch, and the last, empty)
        async with db.session() as session:
            left = set((await session.execute(text(
                "select event_id from prune_test.outbox"))).scalars())
            remembered = set((await session.execute(text(
                "select event_id from prune_test.inbox"))).scalars())
        assert left == {"sent-lately", "never-sent"}
        assert remembered == {"handled-lately"}
        assert await prune(db, outbox.tables, replay_hours=24, inbox_hours=168) == (0, 0)
    finally:
        await db.close()


def test_the_inbox_is_kept_well_past_the_replay_window():
    with pytest.raises(ValueError, match="IMGEST_INBOX_HOURS"):
        RuntimeSettings(replay_hours=48, inbox_hours=95)
    assert RuntimeSettings(replay_hours=48, inbox_hours=96).inbox_hours == 96
    assert RuntimeSettings().inbox_hours >= 14 * 24  # Kafka's records can be that old


async def test_an_event_larger_than_the_broker_takes_does_not_hold_up_later_ones(
        bootstrap, database_url, caplog):
    db, outbox = await outbox_in(database_url, "delivery_big")
    broker = make_broker(settings(bootstrap), "big", registry=CollectorRegistry())
    await ensure_topics(bootstrap, [topic_of(FileValidated)], 1)
    await broker.start()

    def validated(upload_id: str, metadata: dict) -> FileValidated:
        return FileValidated(upload_id=upload_id, file_id="f", object_key="k", path="p",
                             size=1, sha256=SHA, source=Source(object_key="k", files_total=1),
                             kind="dicom", metadata=metadata)

    try:
        async with db.session() as session:  # over the producer's 8 MiB, then a small one
            await outbox.add(session, validated("huge", {"x": "y" * (9 * 1024 * 1024)}))
            await outbox.add(session, validated("after", {}))
        relay = Relay(db, outbox, broker)
        assert await relay.publish_pending() == 2
        assert await relay.publish_pending() == 0
        # The refused event's row stays where the log says, past any pruning; the sent one
        # goes once its window is over.
        assert await prune(db, outbox.tables, replay_hours=1e-9, inbox_hours=1) == (1, 0)
        async with db.session() as session:
            kept = (await session.execute(text(
                "select value->'data'->>'upload_id' from delivery_big.outbox"))).scalars().all()
        assert kept == ["huge"]
    finally:
        await broker.stop()
        await db.close()
    assert any("larger than the broker takes" in r.message and "delivery_big.outbox" in r.message
               for r in caplog.records)
    consumer = AIOKafkaConsumer(topic_of(FileValidated), bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    uploads: list[str] = []
    try:
        for _ in range(20):
            batches = await consumer.getmany(timeout_ms=500)
            uploads += [json.loads(r.value)["data"]["upload_id"]
                        for batch in batches.values() for r in batch]
            if "after" in uploads:
                break
    finally:
        await consumer.stop()
    assert "after" in uploads and "huge" not in uploads


@pytest.mark.parametrize("keep_polling", [True, False], ids=["kept-alive", "unguarded"])
async def test_long_work_keeps_the_member_in_its_group(bootstrap, monkeypatch, keep_polling):
    """A handler busy for 2.5× max_poll_interval_ms (a multi-GB archive, in small): the member
    keeps polling with its partitions paused, stays in the group, commits, and the event is
    handled once. Unguarded (the control), aiokafka drops the member mid-work and the event is
    handled a second time after it rejoins."""
    if not keep_polling:
        async def idle(self, consumer, paused, done) -> None:
            await done.wait()
        monkeypatch.setattr(Consumer, "_keep_polling", idle)
    topic = f"long.{'kept' if keep_polling else 'unguarded'}"
    calls: list[str] = []

    async def slow(deliveries: list[Delivery]) -> None:
        calls.extend(d.event.id for d in deliveries)
        # The first delivery is the long work; a redelivery (the control's) need not be, so
        # that the control ends as soon as it has shown the hazard.
        await asyncio.sleep(5 if len(calls) == 1 else 0)

    s = settings(bootstrap, kafka_session_timeout_ms=3000, kafka_max_poll_interval_ms=2000)
    broker = make_broker(s, topic, registry=CollectorRegistry())
    consumer = Consumer(broker, topic, s)
    consumer.routes.clear()
    from imgest_runtime.broker import Route
    consumer.routes[topic] = Route(topic, ObjectStored, slow)
    consumer.build()
    await ensure_topics(bootstrap, [topic], 1)
    await broker.start()
    event = CloudEvent.wrap(ObjectStored(upload_id="big", object_key="k", filename="f", size=1,
                                         sha256=SHA), source="/t")
    try:
        await broker.publish(json.loads(event.model_dump_json()), topic)
        # 5 s of work, then time for a redelivery if there is one. The control may stop at
        # its redelivery: that is what it shows, and nothing after it changes the verdict.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 14
        while loop.time() < deadline and (keep_polling or len(calls) < 2):
            await asyncio.sleep(0.1)
    finally:
        await broker.stop()
    if keep_polling:
        assert calls == [event.id]
        probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=f"imgest-{topic}",
                                 enable_auto_commit=False)
        await probe.start()
        try:
            assert await probe.committed(TopicPartition(topic, 0)) == 1
        finally:
            await probe.stop()
    else:
        assert calls == [event.id, event.id], "the control shows the hazard is real"


async def test_foreign_records_do_not_wedge_the_consumer(bootstrap):
    """Records a foreign producer might write: a header that is not UTF-8 and a record with no
    value (a tombstone). FastStream would fail the whole batch on the header, again and again;
    here the event is handled, the tombstone is dead-lettered, and the next event goes on."""
    from aiokafka import AIOKafkaProducer

    calls = []

    async def handler(event: CloudEvent[ObjectStored]) -> None:
        calls.append(event.data.upload_id)

    def stored(upload_id: str) -> bytes:
        return CloudEvent.wrap(ObjectStored(upload_id=upload_id, object_key="k", filename="f",
                                            size=1, sha256=SHA), source="/t").model_dump_json(
                                            ).encode()

    topic = "imgest.object.stored"

    async def publish(_broker):
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, stored("odd-header"), key=b"odd",
                                         headers=[("x-vendor", b"\xff\xfe")])
            await producer.send_and_wait(topic, None, key=b"tombstone")
            await producer.send_and_wait(topic, stored("after"), key=b"after")
        finally:
            await producer.stop()

    await run_consumer(bootstrap, "foreign", ObjectStored, handler, publish,
                       until=lambda: "after" in calls)
    assert calls[-2:] == ["odd-header", "after"]
    letters = await dead_letters(bootstrap, topic, 1)
    assert [m.key for m in letters if m.key == b"tombstone"] == [b"tombstone"]


async def test_an_advisory_lock_has_one_holder_across_processes_and_dies_with_it(database_url):
    """What keeps one tus PATCH at a time per upload across gateway workers and replicas."""
    first, second = Database(database_url), Database(database_url)  # as two processes
    try:
        async with first.advisory_lock("tus:abc") as held:
            assert held
            async with second.advisory_lock("tus:abc") as also:
                assert not also
            async with second.advisory_lock("tus:other") as other:
                assert other  # another key is free
        async with second.advisory_lock("tus:abc") as after:
            assert after  # released with the block
        holder = asyncio.create_task(_hold(first, "tus:abc"))
        await asyncio.sleep(0.5)
        async with second.advisory_lock("tus:abc") as busy:
            assert not busy
        holder.cancel()  # the holder goes away mid-block (a client gone, a worker stopping)
        with pytest.raises(asyncio.CancelledError):
            await holder
        async with second.advisory_lock("tus:abc") as free:
            assert free
    finally:
        await first.close()
        await second.close()


async def _hold(db: Database, key: str) -> None:
    async with db.advisory_lock(key) as held:
        assert held
        await asyncio.sleep(60)


async def test_listen_hears_notices_at_commit_and_listens_again_after_a_lost_connection(
        database_url):
    """How a gateway worker hears of an upload's outcome that another worker recorded."""
    db = Database(database_url)
    heard: list[str] = []
    states: list[bool] = []  # told when it listens and when it stops: notices may be missed
    listener = asyncio.create_task(db.listen("test_news", heard.append, states.append))

    async def notify(payload: str) -> None:
        async with db.session() as session:
            await session.execute(text("select pg_notify('test_news', :p)"), {"p": payload})
            await asyncio.sleep(0.3)
            assert payload not in heard  # not before the commit

    async def until_heard(payload: str) -> None:
        for _ in range(100):
            if payload in heard:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{payload!r} not heard: {heard}")

    try:
        for _ in range(100):  # until it listens
            await notify("ping")
            await asyncio.sleep(0.1)
            if "ping" in heard:
                break
        await notify("upload-1")
        await until_heard("upload-1")
        async with db.session() as session:  # its connection is cut (a restart, an admin)
            cut = (await session.execute(text(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where query = 'LISTEN \"test_news\"' and pid <> pg_backend_pid()"))).scalars().all()
        assert cut == [True]
        for attempt in range(60):  # listening again within seconds
            await notify(f"upload-2.{attempt}")
            await asyncio.sleep(0.2)
            if any(h.startswith("upload-2") for h in heard):
                break
        assert any(h.startswith("upload-2") for h in heard), heard
        assert states == [True, False, True], states
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        await db.close()


async def test_a_listener_whose_server_stops_answering_listens_anew(database_url):
    """A connection that dies unseen (here its server process is stopped, as a half-open TCP
    connection looks) is found out by its check and replaced; the listener says so, so that
    what it keeps (the gateway's callers) is not trusted meanwhile."""
    db = Database(database_url)
    states: list[bool] = []
    listener = asyncio.create_task(db.listen("test_hung", lambda _p: None, states.append,
                                             check_every=0.5))
    stopped = None
    try:
        for _ in range(100):
            if states:
                break
            await asyncio.sleep(0.05)
        async with db.session() as session:
            stopped = (await session.execute(text(
                "select pid from pg_stat_activity where application_name = "
                "'imgest listen test_hung'"))).scalar_one()
        os.kill(stopped, signal.SIGSTOP)
        for _ in range(200):
            if states == [True, False, True]:
                break
            await asyncio.sleep(0.05)
        assert states == [True, False, True], states
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        await db.close()
