"""The notifier: upload.completed and the sessions that need attention → emails →
notification.sent.

An email is first written down (pending, one row per event and audience, with the inbox mark of
the event that asked for it), then sent: marked `sending` before the SMTP conversation and `sent`
after it, with notification.sent in the same transaction. What could not be sent is tried again
with backoff by a periodic sweep, for as long as the mail server is away (up to
`mail_give_up_hours`); a `sending` left by a crash is sent again once it is stale.
"""

from __future__ import annotations

import email
import email.policy
import logging
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from imgest_contracts import (
    CloudEvent,
    NotificationSent,
    ProjectUpdated,
    Reason,
    SessionArchived,
    SessionConflicted,
    SessionFailed,
    SessionPrearchived,
    UploadCompleted,
    Uploader,
)
from imgest_runtime.outbox import derived_id, insert_ignore
from imgest_runtime.service import Periodic, Service, Tx, create_app
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .domain import Contacts, Letter, Post, entry_key
from .mailer import EmlMailer, Mailer, SmtpMailer
from .models import HeldUpload, Notification, Project, metadata
from .settings import Settings

NAME = "notifier"
log = logging.getLogger("imgest.notifier")


def make_mailer(settings: Settings) -> Mailer:
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url, settings.smtp_timeout_seconds, settings.smtp_ca_file)
    return EmlMailer(settings.mail_dir or settings.data_dir / "mail")


class Postman:
    """Sends the letters written down, each once."""

    def __init__(self, svc: Service, settings: Settings, mailer: Mailer):
        self.svc, self.settings, self.mailer = svc, settings, mailer
        # A `sending` older than this was cut short (a crash): no conversation lasts so long.
        self.stale = timedelta(seconds=2 * settings.smtp_timeout_seconds + 5)

    async def post(self, tx: Tx, letters: list[Letter]) -> None:
        now = datetime.now(UTC)
        for letter in letters:
            await insert_ignore(
                tx.session, Notification.__table__, id=letter.id, upload_id=letter.upload_id,
                session_key=letter.session_key, kind=letter.kind,
                recipients=letter.recipients, subject=str(letter.msg["Subject"]),
                state="pending", message=letter.msg.as_string(policy=email.policy.SMTP),
                attempts=0, next_attempt_at=now, created_at=now)
            tx.after_commit(("deliver", letter.id), lambda nid=letter.id: self.deliver(nid))

    async def deliver(self, notification_id: str) -> None:
        now = datetime.now(UTC)
        async with self.svc.db.session() as session:
            row = (await session.exec(select(Notification).where(
                Notification.id == notification_id).with_for_update(skip_locked=True))).first()
            if row is None or not self._due(row, now):
                return
            row.state, row.claimed_at, row.attempts = "sending", now, row.attempts + 1
            session.add(row)  # written down before the conversation
        assert row.message is not None
        msg = email.message_from_string(row.message, policy=email.policy.default)
        try:
            await self.mailer.send(msg, row.id)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 — any failure: tried again later
            await self._failed(row.id, row.attempts, e)
            return
        sent = datetime.now(UTC)
        async with self.svc.db.session() as session:
            row = await session.get(Notification, notification_id, with_for_update=True)
            assert row is not None
            row.state, row.sent_at, row.transport = "sent", sent, self.mailer.transport
            row.last_error = None
            session.add(row)
            await self.svc.outbox.add(session, NotificationSent(
                notification_id=row.id, upload_id=row.upload_id, kind=row.kind,
                recipients=row.recipients, subject=row.subject,
                transport=self.mailer.transport, sent_at=sent),  # type: ignore[arg-type]
                event_id=derived_id(row.id, "sent"))
        log.info("%s %s: emailed %s via %s", row.kind, row.upload_id or row.session_key,
                 ", ".join(row.recipients), self.mailer.transport)

    def _due(self, row: Notification, now: datetime) -> bool:
        if row.state == "pending":
            return row.next_attempt_at is None or row.next_attempt_at <= now
        return row.state == "sending" and (row.claimed_at is None
                                           or row.claimed_at < now - self.stale)

    async def _failed(self, notification_id: str, attempts: int, error: Exception) -> None:
        now = datetime.now(UTC)
        wait = min(self.settings.mail_backoff_max_seconds, 2.0 ** min(attempts, 20))
        async with self.svc.db.session() as session:
            row = await session.get(Notification, notification_id, with_for_update=True)
            assert row is not None
            row.last_error = f"{type(error).__name__}: {error}"[:1000]
            give_up = row.created_at is not None and row.created_at < now - timedelta(
                hours=self.settings.mail_give_up_hours)
            row.state = "failed" if give_up else "pending"
            row.next_attempt_at = now + timedelta(seconds=wait)
            session.add(row)
        if give_up:
            log.error("%s %s: given up after %d tries: %s", row.kind, row.id, attempts,
                      row.last_error)
        else:
            log.warning("%s %s: not sent (try %d: %s); again in %.0fs", row.kind,
                        row.upload_id or row.session_key, attempts, row.last_error, wait)

    async def deliver_due(self) -> None:
        """What the mail server was away for, and what a crash cut short."""
        now = datetime.now(UTC)
        async with self.svc.db.session() as session:
            due = (await session.exec(select(Notification.id).where(or_(
                (col(Notification.state) == "pending") & (col(Notification.next_attempt_at) <= now),
                (col(Notification.state) == "sending") & (
                    col(Notification.claimed_at) < now - self.stale))).order_by(
                col(Notification.created_at)).limit(500))).all()
        for notification_id in due:
            await self.deliver(notification_id)


async def contacts_of(session: AsyncSession, project: str | None) -> Contacts | None:
    row = await session.get(Project, project) if project else None
    return Contacts.from_json(row.contacts) if row else None


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations", uses_store=False)
    post = Post(settings.mail_from, settings.public_url, settings.template_dir)
    postman = Postman(svc, settings, make_mailer(settings))
    svc.periodic.append(Periodic("deliver", settings.mail_retry_seconds, postman.deliver_due))
    svc.publishes(NotificationSent)

    @svc.on(UploadCompleted)
    async def on_upload_completed(event: CloudEvent[UploadCompleted], tx: Tx) -> None:
        done = event.data
        if done.sessions and not done.failures and all(
                s.state == "receiving" for s in done.sessions):
            # One instance of a gradual send: no email each (a 1,000-instance send would make
            # 1,000 of them); its sender hears once the session is built.
            for s in done.sessions:
                await insert_ignore(tx.session, HeldUpload.__table__, upload_id=done.upload_id,
                                    entry_key=entry_key(s.uri), files=s.file_count,
                                    uploader=done.uploader.model_dump(mode="json"),
                                    received_at=done.completed_at)
            log.info("upload %s: into a receiving session; told once it is built",
                     done.upload_id)
            return
        letters = post.upload_completed(done, await contacts_of(tx.session, done.project))
        if not letters:
            log.info("upload %s: no one to tell (no address, or success mails turned off)",
                     done.upload_id)
        await postman.post(tx, letters)

    async def attention(kind: str, event: CloudEvent, tx: Tx) -> None:
        """A session needs someone: its project's owners and recipients for the kind."""
        d = event.data
        await postman.post(tx, post.session_attention(
            kind, event.id, d.session_key, d.session, getattr(d, "reason", None),
            await contacts_of(tx.session, d.session.project), d.upload_ids))

    @svc.on(SessionConflicted)
    async def on_session_conflicted(event: CloudEvent[SessionConflicted], tx: Tx) -> None:
        await attention("session.conflicted", event, tx)

    @svc.on(SessionFailed)
    async def on_session_failed(event: CloudEvent[SessionFailed], tx: Tx) -> None:
        await attention("session.failed", event, tx)

    async def built(event: CloudEvent, key: str, state: str, reason: Reason | None,
                    tx: Tx) -> None:
        """The senders of a gradual send hear once its entry is built."""
        held = (await tx.session.exec(select(HeldUpload).where(
            HeldUpload.entry_key == key))).all()
        if not held:
            return
        senders: dict[str, tuple[Uploader, int, int]] = {}
        for h in held:
            uploader = Uploader.model_validate(h.uploader)
            _, files, uploads = senders.get(uploader.username, (uploader, 0, 0))
            senders[uploader.username] = (uploader, files + h.files, uploads + 1)
        await postman.post(tx, post.session_built(event.id, event.data.session, state, reason,
                                                  list(senders.values())))
        await tx.session.execute(delete(HeldUpload).where(col(HeldUpload.entry_key) == key))

    @svc.on(SessionArchived)
    async def on_session_archived(event: CloudEvent[SessionArchived], tx: Tx) -> None:
        if event.data.quarantined:
            await attention("session.quarantined", event, tx)
        if event.data.entry_key:
            await built(event, event.data.entry_key, "archived", None, tx)

    @svc.on(SessionPrearchived)
    async def on_session_prearchived(event: CloudEvent[SessionPrearchived], tx: Tx) -> None:
        p = event.data
        if p.state in ("READY", "CONFLICT", "ERROR"):
            await built(event, p.session_key, p.state, p.reason, tx)

    @svc.on(ProjectUpdated)
    async def on_project_updated(event: CloudEvent[ProjectUpdated], tx: Tx) -> None:
        p = event.data
        insert = pg_insert(Project).values(id=p.project, contacts=asdict(Contacts.of(p)),
                                           updated_at=p.updated_at)
        await tx.session.execute(insert.on_conflict_do_update(
            index_elements=["id"], set_={"contacts": insert.excluded.contacts,
                                         "updated_at": insert.excluded.updated_at},
            where=col(Project.updated_at) < insert.excluded.updated_at))

    return svc


def build_app(settings: Settings) -> FastAPI:
    return create_app(bootstrap(settings))
