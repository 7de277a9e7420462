"""Requests that wait for an upload's outcome (XNAT's import answers with it)."""

from __future__ import annotations

import asyncio
import contextlib


class Waiters:
    """Wakes the requests of this process waiting on an upload as soon as its completion is
    recorded here. They still look for themselves every few tenths of a second: another replica
    may have recorded it, or it was recorded just before they began to wait."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    async def wait(self, upload_id: str, seconds: float) -> None:
        """Returns when the upload is said to be finished, or after `seconds`."""
        event = asyncio.Event()
        self._events.setdefault(upload_id, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        finally:
            waiting = self._events[upload_id]
            waiting.discard(event)
            if not waiting:
                del self._events[upload_id]

    async def wake(self, upload_id: str) -> None:
        for event in self._events.get(upload_id, ()):
            event.set()
