"""Requests that wait for an upload's outcome (XNAT's import answers with it)."""

from __future__ import annotations

import asyncio
import contextlib

from imgest_runtime.db import Database
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

CHANNEL = "imgest_upload_news"  # PostgreSQL NOTIFY channel; the payload is an upload id


class Waiters:
    """Wakes the requests of this process waiting on an upload as soon as news of it (its
    outcome, its prearchive entries) is committed, in whichever worker or replica recorded it:
    the recording transaction NOTIFYs (`announce`), every process LISTENs (`follow`). They
    still look for themselves every few tenths of a second: a notice is missed while a
    listener reconnects, or it came just before they began to wait."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    async def wait(self, upload_id: str, seconds: float) -> None:
        """Returns when there is news of the upload, or after `seconds`."""
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

    def wake(self, upload_id: str) -> None:
        for event in self._events.get(upload_id, ()):
            event.set()

    async def follow(self, db: Database) -> None:
        """Wakes the waiters of each upload announced, for as long as it runs."""
        await db.listen(CHANNEL, self.wake)


async def announce(session: AsyncSession, upload_id: str) -> None:
    """Tells every process's waiters of news of the upload once this transaction commits."""
    await session.execute(text("select pg_notify(:channel, :upload)"),
                          {"channel": CHANNEL, "upload": upload_id})
