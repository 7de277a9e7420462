"""The Kafka broker every service uses, and how it consumes: at least once, retried, dead-lettered.

- Producer: `acks=all`; idempotence when the broker supports it (a setting: Tansu does not).
- Consumers: one group per service, offsets committed only after the handler finished
  (`AckPolicy.NACK_ON_ERROR`: an exception seeks back, so nothing is skipped).
- `DeliveryMiddleware` retries a failing handler with exponential backoff and jitter; a permanent
  error (bad input) or the last failed attempt sends the event to `<topic>.dlq` with the error,
  the attempt count and its origin in headers, and then lets the offset move on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream._internal.middlewares import BaseMiddleware
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from imgest_contracts import CloudEvent, Payload, Reason, topic_of
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from pydantic import ValidationError

from .settings import RuntimeSettings

log = logging.getLogger("imgest.broker")

DLQ_SUFFIX = ".dlq"

dead_letters = Counter("imgest_dead_letters_total", "Events sent to a dead-letter topic",
                       ["topic", "service"])
retries = Counter("imgest_handler_retries_total", "Handler attempts that failed and were retried",
                  ["topic", "service"])


class PermanentError(Exception):
    """Bad input: retrying cannot help, so the event goes straight to the dead-letter topic."""


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def backoff(attempt: int, base: float, cap: float = 60.0) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random, so retries
    spread out yet a run of them always lasts long enough to outwait a short outage."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(delay / 2, delay)


def _is_permanent(error: BaseException) -> bool:
    return isinstance(error, (PermanentError, ValidationError, UnicodeDecodeError, json.JSONDecodeError))


def delivery_middleware(service: str, settings: RuntimeSettings,
                        broker_ref: Callable[[], KafkaBroker]) -> type[BaseMiddleware]:
    class DeliveryMiddleware(BaseMiddleware):
        async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
            record = msg.raw_message
            topic = getattr(record, "topic", "?")
            attempt = 0
            while True:
                attempt += 1
                try:
                    return await call_next(msg)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001
                    if _is_permanent(error) or attempt >= settings.max_attempts:
                        await self._dead_letter(msg, record, topic, error, attempt)
                        return None
                    retries.labels(topic, service).inc()
                    delay = backoff(attempt, settings.retry_base_seconds)
                    log.warning("%s: attempt %d failed (%s: %s); retrying in %.2fs", topic,
                                attempt, type(error).__name__, error, delay)
                    await asyncio.sleep(delay)

        async def _dead_letter(self, msg: Any, record: Any, topic: str, error: BaseException,
                               attempt: int) -> None:
            headers = {
                "x-imgest-error": f"{type(error).__name__}: {error}"[:2000],
                "x-imgest-error-kind": "permanent" if _is_permanent(error) else "transient",
                "x-imgest-attempts": str(attempt),
                "x-imgest-origin-topic": topic,
                "x-imgest-origin-partition": str(getattr(record, "partition", "")),
                "x-imgest-origin-offset": str(getattr(record, "offset", "")),
                "x-imgest-service": service,
            }
            await broker_ref().publish(msg.body, dlq_topic(topic), key=getattr(record, "key", None),
                                       headers=headers)
            dead_letters.labels(topic, service).inc()
            log.error("%s: dead-lettered after %d attempt(s): %s", topic, attempt, headers[
                "x-imgest-error"])

    return DeliveryMiddleware


def make_broker(settings: RuntimeSettings, service: str,
                registry: CollectorRegistry = REGISTRY) -> KafkaBroker:
    """Builds (does not connect) the service's broker."""
    broker: KafkaBroker | None = None
    broker = KafkaBroker(
        settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        client_id=f"imgest-{service}",
        max_request_size=8 * 1024 * 1024,
        linger_ms=2,
        middlewares=(
            KafkaPrometheusMiddleware(registry=registry, app_name=f"imgest-{service}"),
            delivery_middleware(service, settings, lambda: broker),  # type: ignore[arg-type,return-value]
        ),
        description=f"imgest {service}",
        logger=logging.getLogger(f"imgest.{service}.broker"),
        log_level=logging.DEBUG,  # "Received"/"Processed" per event: too many lines for INFO
    )
    return broker


class Consumer:
    """The service's one consumer: a single group member reading every topic the service
    handles, each event type dispatched to its own typed handler `async def h(e: CloudEvent[X])`.

    One member per service (rather than one per topic) keeps rebalances rare and short.
    """

    def __init__(self, broker: KafkaBroker, service: str, session_timeout_ms: int = 10_000,
                 max_poll_interval_ms: int = 1_800_000):
        self.broker = broker
        self.service = service
        self.session_timeout_ms = session_timeout_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self.handlers: list[tuple[str, Callable[..., Awaitable[Any]]]] = []
        self.built = False

    def on(self, payload: type[Payload], *, dead_letters: bool = False):
        """Registers a handler for an event type, or (dead_letters) for its dead-letter topic:
        `async def h(event: CloudEvent[X], message: KafkaMessage)` reads the error with
        `dead_letter_reason(message)`."""
        topic = dlq_topic(topic_of(payload)) if dead_letters else topic_of(payload)

        def register(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            if self.built:
                raise RuntimeError("handlers must be registered before the consumer starts")
            self.handlers.append((topic, handler))
            return handler

        return register

    def build(self) -> None:
        if self.built or not self.handlers:
            return
        self.built = True
        subscriber = self.broker.subscriber(
            *(topic for topic, _ in self.handlers),
            group_id=f"imgest-{self.service}",
            ack_policy=AckPolicy.NACK_ON_ERROR,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self.max_poll_interval_ms,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.session_timeout_ms // 3,
            title=f"imgest-{self.service}",
            description=f"Events the {self.service} consumes (group imgest-{self.service}).",
        )
        for topic, handler in self.handlers:
            subscriber(filter=lambda msg, topic=topic: msg.raw_message.topic == topic)(handler)


PIPELINE_FAILED = "pipeline.failed"  # the reason code of a dead-lettered file


def dead_letter_reason(message: Any) -> Reason:
    """What a person reads about a dead-lettered event (from DeliveryMiddleware's headers)."""
    headers = message.headers or {}

    def header(name: str, default: str) -> str:
        value = headers.get(name, default)
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    service = header("x-imgest-service", "pipeline")
    return Reason(code=PIPELINE_FAILED, message=(
        f"The {service} service could not process this file after "
        f"{header('x-imgest-attempts', '?')} attempt(s): {header('x-imgest-error', 'unknown')}. "
        "An operator can replay it (`imgest dlq replay`)."))


def publishes(broker: KafkaBroker, payload: type[Payload]):
    """Declares what a service publishes (for the AsyncAPI document; sending is the outbox's)."""
    return broker.publisher(
        topic_of(payload), title=f"{topic_of(payload)}:publish",
        description=payload.description, schema=CloudEvent[payload],  # type: ignore[valid-type]
    )


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
