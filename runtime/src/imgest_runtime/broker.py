"""The Kafka broker every service uses, and how it consumes: in batches, at least once, retried,
dead-lettered.

- Producer: `acks=all`; idempotence when the broker supports it (a setting: Tansu does not).
- Consumer: one group member per service reads every topic the service handles, in batches of
  up to `IMGEST_KAFKA_BATCH_MAX` events. Offsets are committed only after the whole batch was
  handled (`AckPolicy.NACK_ON_ERROR`: an exception seeks back, so nothing is skipped).
- A batch goes to each topic's handler at once (one transaction for many events). If it fails,
  its events are handled one by one, each retried with exponential backoff and jitter; a
  permanent error (bad input) or the last failed attempt sends the event to `<topic>.dlq` with
  the error, the attempt count and its origin in headers, and the batch moves on. While the
  database is away, the consumer waits for it instead: an outage is not the events' fault.
- Long work (a multi-GB archive) never gets the member thrown out of its group: while a batch
  runs past a quarter of `max_poll_interval_ms`, the consumer pauses its partitions and keeps
  polling, which tells the group it is alive without taking more records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from imgest_contracts import CloudEvent, Payload, Reason, topic_of
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

from .settings import RuntimeSettings

log = logging.getLogger("imgest.broker")

DLQ_SUFFIX = ".dlq"

dead_letters = Counter("imgest_dead_letters_total", "Events sent to a dead-letter topic",
                       ["topic", "service"])
retries = Counter("imgest_handler_retries_total", "Handler attempts that failed and were retried",
                  ["topic", "service"])
batch_sizes = Histogram("imgest_batch_events", "Events per batch handed to a handler",
                        ["topic", "service"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500))


class PermanentError(Exception):
    """Bad input: retrying cannot help, so the event goes straight to the dead-letter topic."""


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def backoff(attempt: int, base: float, cap: float = 60.0) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random, so retries
    spread out yet a run of them always lasts long enough to outwait a short outage."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(delay / 2, delay)


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, (PermanentError, ValidationError, UnicodeDecodeError,
                              json.JSONDecodeError))


class GaveUp(Exception):
    """`retrying` stopped: the error was permanent, or the attempts ran out."""

    def __init__(self, error: Exception, attempts: int):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.attempts = attempts


Outage = Callable[[Exception], Awaitable[bool]]
MAX_OUTAGES = 10  # outages waited out for one piece of work before they count as its failures


async def retrying(work: Callable[[], Awaitable[Any]], *, what: str, attempts: int,
                   base_seconds: float, on_retry: Callable[[], None] = lambda: None,
                   outage: Outage | None = None) -> Any:
    """Runs `work` until it succeeds, at most `attempts` times with backoff between; raises
    GaveUp at once on a permanent error, or after the last attempt.

    `outage(error)` waits out a dependency that is away (the database) and says whether it
    had to: the failure was then not the work's, and does not count as one of its attempts
    (up to MAX_OUTAGES times: work that takes the database down each time it runs counts)."""
    attempt = outages = 0
    while True:
        attempt += 1
        try:
            return await work()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if (not is_permanent(error) and outage is not None and outages < MAX_OUTAGES
                    and await outage(error)):
                attempt, outages = attempt - 1, outages + 1
                continue
            if is_permanent(error) or attempt >= attempts:
                raise GaveUp(error, attempt) from error
            on_retry()
            delay = backoff(attempt, base_seconds)
            log.warning("%s: attempt %d failed (%s: %s); retrying in %.2fs", what, attempt,
                        type(error).__name__, error, delay)
            await asyncio.sleep(delay)


def make_broker(settings: RuntimeSettings, service: str,
                registry: CollectorRegistry = REGISTRY) -> KafkaBroker:
    """Builds (does not connect) the service's broker."""
    return KafkaBroker(
        settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        client_id=f"imgest-{service}",
        max_request_size=8 * 1024 * 1024,
        # A relay pass (up to 200 events of 1-2 KB) in one record batch: with the default 16
        # KB, send() waited for a round trip every 7-14 events, and consumers got the pass in
        # as many small batches, each a transaction (scenario 1: half the batches).
        max_batch_size=512 * 1024,
        linger_ms=2,
        middlewares=(KafkaPrometheusMiddleware(registry=registry,
                                               app_name=f"imgest-{service}"),),
        description=f"imgest {service}",
        logger=logging.getLogger(f"imgest.{service}.broker"),
        log_level=logging.DEBUG,  # "Received"/"Processed" per batch: too many lines for INFO
    )


@dataclass
class Delivery:
    """One consumed event and the record it came in."""

    event: CloudEvent
    record: ConsumerRecord

    def header(self, name: str, default: str = "") -> str:
        for key, value in self.record.headers or ():
            if key == name:
                return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        return default


BatchHandler = Callable[[list[Delivery]], Awaitable[None]]


@dataclass
class Route:
    topic: str
    payload: type[Payload]
    handler: BatchHandler
    model: type[CloudEvent] = field(init=False)

    def __post_init__(self) -> None:
        self.model = CloudEvent[self.payload]  # type: ignore[name-defined]


async def _raw_values(message: Any) -> list[bytes | None]:
    """The batch is decoded here, event by event, so that one bad record is dead-lettered
    instead of failing the batch (FastStream's default decoder would)."""
    return [record.value for record in message.raw_message]


def _utf8(value: bytes | None) -> bool:
    try:
        (value or b"").decode()
        return True
    except UnicodeDecodeError:
        return False


async def _tolerant_parse(batch: tuple[ConsumerRecord, ...], original: Any) -> Any:
    """FastStream decodes every header strictly before any handler runs: one record with a
    foreign producer's non-UTF-8 or empty header would fail the whole batch, again and again.
    Such headers are made readable here; the record itself is judged by `handle`."""
    for record in batch:
        if record.headers and not all(value is not None and _utf8(value)
                                      for _, value in record.headers):
            record.headers = tuple(
                (key, (value or b"").decode(errors="replace").encode())
                for key, value in record.headers)
    return await original(batch)


class Consumer:
    """The service's one consumer: a single group member reading every topic the service
    handles, in batches, each topic's events handed to its handler together.

    One member per service (rather than one per topic) keeps rebalances rare and short.
    """

    def __init__(self, broker: KafkaBroker, service: str, settings: RuntimeSettings):
        self.broker = broker
        self.service = service
        self.settings = settings
        self.routes: dict[str, Route] = {}
        self.subscriber: Any = None
        # Waits out the database while it is away, so that an outage does not use up the
        # attempts of the events in hand (and dead-letter them as if they were at fault).
        self.outage: Outage | None = None
        self._rewind_until = 0.0  # loop time: partitions assigned before then start over

    def on(self, payload: type[Payload], *, dead_letters: bool = False):
        """Registers the batch handler of an event type, or (dead_letters) of its dead-letter
        topic: `async def h(deliveries: list[Delivery])`. The deliveries of one topic come in
        the order of their partitions."""
        topic = dlq_topic(topic_of(payload)) if dead_letters else topic_of(payload)

        def register(handler: BatchHandler) -> BatchHandler:
            if self.subscriber is not None:
                raise RuntimeError("handlers must be registered before the consumer starts")
            self.routes[topic] = Route(topic, payload, handler)
            return handler

        return register

    def build(self) -> None:
        if self.subscriber is not None or not self.routes:
            return
        s = self.settings
        self.subscriber = self.broker.subscriber(
            *self.routes,
            group_id=f"imgest-{self.service}",
            ack_policy=(AckPolicy.NACK_ON_ERROR if s.delivery == "guarded"
                        else AckPolicy.ACK_FIRST),
            auto_offset_reset="earliest",
            batch=True,
            max_records=s.kafka_batch_max,
            batch_timeout_ms=50,  # also the pause after an empty poll: latency
            # How long the broker may hold a fetch while nothing is there. Tansu does not
            # answer a waiting fetch when records arrive, so this bounds each hop's latency.
            fetch_max_wait_ms=s.kafka_fetch_wait_ms,
            max_poll_interval_ms=s.kafka_max_poll_interval_ms,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka_session_timeout_ms // 3,
            parser=_tolerant_parse,
            decoder=_raw_values,
            listener=_Rewinding(self),
            include_in_schema=False,  # the document lists each topic (see Service.asyncapi)
        )
        self.subscriber(self._consume)

    async def _consume(self, _values: Any, message: KafkaMessage) -> None:
        async with self._kept_alive():
            await self.handle(list(message.raw_message))

    async def handle(self, records: list[ConsumerRecord]) -> None:
        """Decodes a batch, dead-letters what cannot be read, and hands each topic's events to
        its handler."""
        by_topic: dict[str, list[Delivery]] = {}
        for record in records:
            route = self.routes.get(record.topic)
            if route is None:
                continue
            try:
                if record.value is None:
                    raise PermanentError("the record has no value (a tombstone?)")
                event = route.model.model_validate_json(record.value)
            except (ValidationError, ValueError, PermanentError) as error:
                await self.dead_letter(record, error, 1)
                continue
            by_topic.setdefault(record.topic, []).append(Delivery(event, record))
        for topic, deliveries in by_topic.items():
            batch_sizes.labels(topic, self.service).observe(len(deliveries))
            await self._deliver(self.routes[topic].handler, deliveries)

    async def _deliver(self, handler: BatchHandler, deliveries: list[Delivery]) -> None:
        if len(deliveries) > 1:
            try:
                await handler(deliveries)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001
                log.warning("%s: a batch of %d failed (%s: %s); handling its events one by one",
                            deliveries[0].record.topic, len(deliveries), type(error).__name__,
                            error)
        # In order: a failed event is retried (or dead-lettered) before a later one is handled,
        # and the offsets move past it only with the whole batch.
        for delivery in deliveries:
            topic = delivery.record.topic
            try:
                await retrying(lambda d=delivery: handler([d]), what=topic,
                               attempts=self.settings.max_attempts,
                               base_seconds=self.settings.retry_base_seconds,
                               on_retry=retries.labels(topic, self.service).inc,
                               outage=self.outage)
            except GaveUp as gave_up:
                if topic.endswith(DLQ_SUFFIX):
                    # A dead letter is not dead-lettered again: it stays in its topic for the
                    # operator (`imgest dlq`), and this service moves on.
                    dead_letters.labels(topic, self.service).inc()
                    log.error("%s: handling a dead letter failed after %d attempt(s): %s; it "
                              "stays in %s", topic, gave_up.attempts, gave_up, topic)
                    continue
                await self.dead_letter(delivery.record, gave_up.error, gave_up.attempts)

    async def dead_letter(self, record: ConsumerRecord, error: BaseException, attempts: int
                          ) -> None:
        headers = {key: value.decode(errors="replace") for key, value in record.headers or ()
                   if not key.startswith("x-imgest-")}
        headers.update({
            "x-imgest-error": f"{type(error).__name__}: {error}"[:2000],
            "x-imgest-error-kind": "permanent" if is_permanent(error) else "transient",
            "x-imgest-attempts": str(attempts),
            "x-imgest-origin-topic": record.topic,
            "x-imgest-origin-partition": str(record.partition),
            "x-imgest-origin-offset": str(record.offset),
            "x-imgest-service": self.service,
        })
        await self.broker.publish(record.value or b"", dlq_topic(record.topic), key=record.key,
                                  headers=headers)
        dead_letters.labels(record.topic, self.service).inc()
        log.error("%s: dead-lettered after %d attempt(s): %s", record.topic, attempts,
                  headers["x-imgest-error"])

    async def rewind(self, grace_seconds: float) -> None:
        """The broker lost its memory: read every partition from its beginning again (the
        inbox drops what was handled). Positions, and offsets committed against the old broker
        (a member may commit one after the restart, before it notices), point past records of
        the new broker's logs. Partitions assigned during `grace_seconds` (the group settling
        again) start from the beginning too."""
        self._rewind_until = asyncio.get_running_loop().time() + grace_seconds
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None:
            return
        assigned = consumer.assignment()
        _from_the_start(consumer, assigned)
        log.warning("%s: the broker is new; reading %d partition(s) from the beginning again",
                    self.service, len(assigned))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = getattr(self.subscriber, "consumer", None)
        if assigned and consumer is not None and (
                asyncio.get_running_loop().time() < self._rewind_until):
            _from_the_start(consumer, assigned)
            log.warning("%s: partitions assigned soon after the broker lost its memory: "
                        "reading them from the beginning", self.service)

    @asynccontextmanager
    async def _kept_alive(self):
        """While a batch is handled, keep the member in its group however long it takes (up to
        `kafka_max_batch_seconds`)."""
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None:
            yield
            return
        paused: set[TopicPartition] = set()
        done = asyncio.Event()
        task = asyncio.create_task(self._keep_polling(consumer, paused, done),
                                   name="keep-polling")
        try:
            yield
        finally:
            # Told to stop, not cancelled: cancelling aiokafka's getmany mid-call can leave its
            # idle timer stuck, which would switch off the max-poll check for good.
            done.set()
            await asyncio.shield(task)
            if paused:
                consumer.resume(*(paused & consumer.assignment()))

    async def _keep_polling(self, consumer: Any, paused: set[TopicPartition],
                            done: asyncio.Event) -> None:
        """aiokafka counts a member dead when it has not polled for `max_poll_interval_ms`.
        Polling with every partition paused returns nothing and proves it alive; a partition
        assigned meanwhile (a rebalance) may return records, which are sought back so that
        they are read again after this batch, never lost. Past `kafka_max_batch_seconds` the
        batch is taken for hung: polling stops, and the group hands its partitions on."""
        every = self.settings.kafka_max_poll_interval_ms / 4000
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            try:
                await asyncio.wait_for(done.wait(), every)
                return
            except TimeoutError:
                pass
            running = loop.time() - started
            if running > self.settings.kafka_max_batch_seconds:
                log.error("%s: a batch has run for %.0fs, past IMGEST_KAFKA_MAX_BATCH_SECONDS; "
                          "no longer polling, so the group gives its partitions to another "
                          "member", self.service, running)
                return
            try:
                assigned = consumer.assignment()
                consumer.pause(*assigned)
                paused |= assigned
                fetched = await consumer.getmany(timeout_ms=0)
                for tp, records in fetched.items():
                    if records:
                        consumer.seek(tp, records[0].offset)
            except Exception:  # the next tick tries again; the batch goes on regardless
                log.warning("%s: polling during a long batch failed", self.service,
                            exc_info=True)
                continue
            log.info("%s: still handling a batch after %.0fs; polled to stay in the group",
                     self.service, running)


def _from_the_start(consumer: Any, partitions: set[TopicPartition]) -> None:
    """Offset 0, or the log's start if it was trimmed (out of range resets to "earliest"). A
    plain seek, not `seek_to_beginning`: it must not wait on the fetcher inside a rebalance."""
    for tp in partitions:
        consumer.seek(tp, 0)


class _Rewinding(ConsumerRebalanceListener):
    def __init__(self, consumer: Consumer):
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.consumer._on_assigned(assigned)


PIPELINE_FAILED = "pipeline.failed"  # the reason code of a dead-lettered file


def dead_letter_reason(delivery: Delivery) -> Reason:
    """What a person reads about a dead-lettered event (from `Consumer.dead_letter`'s headers)."""
    header = delivery.header
    service = header("x-imgest-service", "pipeline")
    return Reason(code=PIPELINE_FAILED, message=(
        f"The {service} service could not process this file after "
        f"{header('x-imgest-attempts', '?')} attempt(s): {header('x-imgest-error', 'unknown')}. "
        "An operator can replay it (`imgest dlq replay`)."))


async def ensure_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Creates the topics (and their dead-letter topics) if they are missing."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        from .epoch import EPOCH_TOPIC

        wanted = {t: partitions for topic in topics for t in (topic, dlq_topic(topic))}
        wanted[EPOCH_TOPIC] = 1  # one partition: its first record is the epoch
        missing = [NewTopic(t, num_partitions=n, replication_factor=1)
                   for t, n in wanted.items() if t not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
