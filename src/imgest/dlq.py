"""Dead letters: list them, look at one, replay them onto the topic they came from.

A dead letter is identified as `<topic>:<partition>:<offset>` of its record in `<topic>.dlq`.
Replaying publishes the original event again (same key, same CloudEvent id, so consumers that
already handled it drop it) and writes a marker to `imgest.dlq.replayed`, so `list` shows what
was replayed and `replay --all` does not replay it twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from imgest_contracts import TOPICS
from imgest_runtime.broker import DLQ_SUFFIX, dlq_topic

REPLAYED_TOPIC = "imgest.dlq.replayed"


@dataclass
class DeadLetter:
    id: str
    origin: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    time: datetime
    replayed: bool = False

    @property
    def error(self) -> str:
        return self.headers.get("x-imgest-error", "")

    def summary(self) -> dict:
        return {"id": self.id, "origin": self.origin, "key": (self.key or b"").decode(
            errors="replace"), "time": self.time.isoformat(timespec="seconds"),
            "service": self.headers.get("x-imgest-service"),
            "attempts": self.headers.get("x-imgest-attempts"),
            "kind": self.headers.get("x-imgest-error-kind"), "error": self.error,
            "replayed": self.replayed}


async def _read_all(bootstrap: str, topics: list[str]) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await consumer.start()
        existing = await consumer.topics()
        partitions = [TopicPartition(t, p) for t in topics if t in existing
                      for p in sorted(consumer.partitions_for_topic(t) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=2000)
                if not batch:
                    break
                records += batch.get(tp, [])
        return records
    finally:
        await consumer.stop()


async def dead_letters(bootstrap: str) -> list[DeadLetter]:
    records = await _read_all(bootstrap, [dlq_topic(t) for t in TOPICS])
    replayed = {r.value.decode() for r in await _read_all(bootstrap, [REPLAYED_TOPIC])}
    letters = []
    for r in records:
        ident = f"{r.topic.removesuffix(DLQ_SUFFIX)}:{r.partition}:{r.offset}"
        letters.append(DeadLetter(
            id=ident, origin=r.topic.removesuffix(DLQ_SUFFIX), key=r.key, value=r.value,
            headers={k: v.decode(errors="replace") for k, v in (r.headers or [])},
            time=datetime.fromtimestamp(r.timestamp / 1000, UTC), replayed=ident in replayed))
    return sorted(letters, key=lambda d: d.time)


async def replay(bootstrap: str, letters: list[DeadLetter]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        await producer.start()
        for letter in letters:
            await producer.send_and_wait(
                letter.origin, letter.value, key=letter.key,
                headers=[("content-type", b"application/json"),
                         ("x-imgest-replay-of", letter.id.encode())])
            await producer.send_and_wait(REPLAYED_TOPIC, letter.id.encode())
    finally:
        await producer.stop()


def pretty_value(letter: DeadLetter) -> str:
    try:
        return json.dumps(json.loads(letter.value), indent=2)
    except ValueError:
        return repr(letter.value[:2000])
