"""What the delivery guarantees cost per event, on the embedded broker and database.

    uv run python bench/delivery.py --events 2000

Publishes N file.staged events to a fresh Tansu and consumes them with the runtime's Consumer
(offsets committed after each handler) in two ways:
  plain      the handler does nothing (consumption and per-event commit only);
  guarded    the handler does what every imgest handler does: inbox row + outbox row in one
             PostgreSQL transaction, and the relay publishes the outbox afterwards.
The difference is the price of "nothing lost, nothing done twice". Never part of the tests.
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
from imgest.infra import Postgres, Tansu, free_port  # noqa: E402
from imgest_contracts import (CloudEvent, FileStaged, FileValidated, Source,  # noqa: E402
                              topic_of)
from imgest_runtime.broker import Consumer, ensure_topics, make_broker  # noqa: E402
from imgest_runtime.db import Database  # noqa: E402
from imgest_runtime.outbox import Outbox, Relay, delivery_tables, derived_id  # noqa: E402
from imgest_runtime.settings import RuntimeSettings  # noqa: E402


def staged(i: int) -> dict:
    payload = FileStaged(upload_id=f"u{i % 10}", file_id=f"f{i}", object_key=f"k{i}",
                         path=f"p{i}", size=1, sha256="a" * 64,
                         source=Source(object_key="k", files_total=1))
    return json.loads(CloudEvent.wrap(payload, source="/bench").model_dump_json())


async def run(mode: str, events: int, bootstrap: str, db: Database | None) -> float:
    settings = RuntimeSettings(kafka_bootstrap=bootstrap)
    broker = make_broker(settings, f"bench-{mode}", registry=CollectorRegistry())
    consumer = Consumer(broker, f"bench-{mode}", session_timeout_ms=3000)
    done = asyncio.Event()
    count = 0
    relay = None
    if mode == "guarded":
        assert db is not None
        metadata = MetaData(schema="bench")
        tables = delivery_tables(metadata)
        async with db.engine.begin() as conn:
            await conn.execute(text("drop schema if exists bench cascade"))
            await conn.execute(text("create schema bench"))
            await conn.run_sync(metadata.create_all)
        outbox = Outbox(tables, source="/bench")

        @consumer.on(FileStaged)
        async def guarded(event: CloudEvent[FileStaged]) -> None:
            nonlocal count
            async with db.session() as session:
                if not await outbox.seen(session, event.id, event.type):
                    f = event.data
                    await outbox.add(session, FileValidated(
                        upload_id=f.upload_id, file_id=f.file_id, object_key=f.object_key,
                        path=f.path, size=f.size, sha256=f.sha256, source=f.source,
                        kind="dicom"), event_id=derived_id(event.id, "validated"))
            count += 1
            if count == events:
                done.set()

        relay = Relay(db, outbox, broker)
    else:
        @consumer.on(FileStaged)
        async def plain(event: CloudEvent[FileStaged]) -> None:
            nonlocal count
            count += 1
            if count == events:
                done.set()

    topic = topic_of(FileStaged)
    await ensure_topics(bootstrap, [topic, topic_of(FileValidated)], 1)
    publisher = make_broker(settings, "bench-publisher", registry=CollectorRegistry())
    await publisher.start()
    sends = [await publisher.publish(staged(i), topic, no_confirm=True) for i in range(events)]
    await asyncio.gather(*sends)
    await publisher.stop()
    consumer.build()
    await broker.start()
    if relay:
        relay.start()
    started = time.monotonic()
    await done.wait()
    if relay:
        await relay.stop()  # everything the handlers wrote is published
    elapsed = time.monotonic() - started
    await broker.stop()
    return events / elapsed


async def measure(events: int, url: str) -> None:
    db = Database(url)
    try:
        for mode in ("plain", "guarded"):
            tansu = Tansu(free_port())
            tansu.start()
            try:
                rate = await run(mode, events, tansu.bootstrap, db)
            finally:
                tansu.stop()
            print(f"{mode:8} {rate:7.0f} events/s ({1000 / rate:.2f} ms/event)")
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
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
