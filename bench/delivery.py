"""What the delivery guarantees cost per event, on the embedded broker and database.

    uv run python bench/delivery.py --events 5000

Publishes N file.staged events to a fresh Tansu and consumes them with the runtime's own
consumer (offsets committed after each batch) in three ways:
  plain      the handler does nothing: consumption and commits only;
  guarded-1  what every imgest handler does, one event per batch: an inbox row and an outbox row
             in one PostgreSQL transaction, and the relay publishes the outbox afterwards;
  guarded    the same with batches of up to IMGEST_KAFKA_BATCH_MAX (200): one transaction per
             batch, as imgest runs.
The differences are the price of "nothing lost, nothing done twice", and what batching wins
back. Never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgest_contracts import CloudEvent, FileStaged, FileValidated, Source, topic_of
from imgest_runtime.broker import Consumer, Delivery, ensure_topics, make_broker
from imgest_runtime.outbox import Relay, derived_id
from imgest_runtime.service import Service, Tx
from imgest_runtime.settings import RuntimeSettings

from imgest.infra import Postgres, Tansu, exit_on_sigterm, free_port

MODES = {"plain": 200, "guarded-1": 1, "guarded": 200}  # mode → batch size


def staged(i: int) -> dict:
    payload = FileStaged(upload_id=f"u{i % 10}", file_id=f"f{i}", object_key=f"k{i}",
                         path=f"p{i}", size=1, sha256="a" * 64,
                         source=Source(object_key="k", files_total=1))
    return json.loads(CloudEvent.wrap(payload, source="/bench").model_dump_json())


async def run(mode: str, events: int, bootstrap: str, database_url: str) -> float:
    settings = RuntimeSettings(kafka_bootstrap=bootstrap, database_url=database_url,
                               kafka_session_timeout_ms=3000, kafka_batch_max=MODES[mode])
    done = asyncio.Event()
    count = 0

    def counted(n: int) -> None:
        nonlocal count
        count += n
        if count >= events:
            done.set()

    relay = svc = None
    if mode == "plain":
        broker = make_broker(settings, "bench-plain", registry=CollectorRegistry())
        consumer = Consumer(broker, "bench-plain", settings)

        @consumer.on(FileStaged)
        async def plain(deliveries: list[Delivery]) -> None:
            counted(len(deliveries))

        consumer.build()
    else:
        svc = Service(f"bench-{mode}", settings, MetaData(schema="bench"), Path("."))
        async with svc.db.engine.begin() as conn:
            await conn.execute(text("drop schema if exists bench cascade"))
            await conn.execute(text("create schema bench"))
            await conn.run_sync(svc.metadata.create_all)

        @svc.on(FileStaged)
        async def guarded(event: CloudEvent[FileStaged], tx: Tx) -> None:
            f = event.data
            tx.publish(FileValidated(
                upload_id=f.upload_id, file_id=f.file_id, object_key=f.object_key, path=f.path,
                size=f.size, sha256=f.sha256, source=f.source, kind="dicom"),
                event_id=derived_id(event.id, "validated"))
            counted(1)

        broker = svc.wired()
        relay = Relay(svc.db, svc.outbox, broker)

    topic = topic_of(FileStaged)
    await ensure_topics(bootstrap, [topic, topic_of(FileValidated)], 1)
    publisher = make_broker(settings, "bench-publisher", registry=CollectorRegistry())
    await publisher.start()
    sends = [await publisher.publish(staged(i), topic, no_confirm=True) for i in range(events)]
    await asyncio.gather(*sends)
    await publisher.stop()
    await broker.start()
    if relay:
        relay.start()
    started = time.monotonic()
    await done.wait()
    if relay:
        await relay.stop()  # everything the handlers wrote is published
    elapsed = time.monotonic() - started
    await broker.stop()
    if svc:
        await svc.db.close()
    return events / elapsed


async def measure(events: int, url: str) -> None:
    print(f"{'mode':<10} {'events/s':>9} {'ms/event':>9}")
    for mode in MODES:
        tansu = Tansu(free_port())
        tansu.start()
        try:
            rate = await run(mode, events, tansu.bootstrap, url)
        finally:
            tansu.stop()
        print(f"{mode:<10} {rate:9.0f} {1000 / rate:9.2f}")


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="imgest-bench-"))
    root.chmod(0o755)
    pg = Postgres(root / "pg")
    try:
        asyncio.run(measure(args.events, pg.start()))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
