"""imgest's public contracts: every event on the broker, its topic, key and JSON Schema."""

from .envelope import CloudEvent, event_type, schema_uri, topic_of
from .events import *
from .events import EVENTS, Payload

TOPICS: dict[str, type[Payload]] = {topic_of(e): e for e in EVENTS}

__all__ = ["EVENTS", "TOPICS", "CloudEvent", "Payload", "event_type", "schema_uri", "topic_of"]
