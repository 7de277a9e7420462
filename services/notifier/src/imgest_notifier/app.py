"""The notifier: upload.completed → an email to the uploader → notification.sent."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI
from imgest_contracts import CloudEvent, NotificationSent, UploadCompleted
from imgest_runtime.outbox import derived_id
from imgest_runtime.service import Service, create_app

from .domain import upload_completed_email
from .mailer import EmlMailer, Mailer, SmtpMailer
from .models import Notification, metadata
from .settings import Settings

NAME = "notifier"
log = logging.getLogger("imgest.notifier")


def make_mailer(settings: Settings) -> Mailer:
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url, settings.smtp_timeout_seconds)
    return EmlMailer(settings.mail_dir or settings.data_dir / "mail")


def bootstrap(settings: Settings) -> Service:
    svc = Service(NAME, settings, metadata, Path(__file__).parent / "migrations", uses_store=False)
    mailer = make_mailer(settings)
    svc.publishes(NotificationSent)

    @svc.on(UploadCompleted, own_transaction=True)  # the email goes out between transactions
    async def on_upload_completed(event: CloudEvent[UploadCompleted]) -> None:
        done = event.data
        if done.sessions and not done.failures and all(
                s.state == "receiving" for s in done.sessions):
            # One instance of a gradual send: no email each; its session is told once built.
            log.info("upload %s: into a receiving session; no email", done.upload_id)
            return
        notification_id = derived_id("upload.completed", done.upload_id, str(done.generation),
                                     "uploader")
        async with svc.db.session() as session:
            if await session.get(Notification, notification_id) is not None:
                return  # already sent: a redelivery
        msg = upload_completed_email(done, notification_id=notification_id,
                                     sender=settings.mail_from, public_url=settings.public_url)
        if msg is None:
            log.info("upload %s: uploader has no email address; nothing sent", done.upload_id)
            return
        # Sent before it is recorded: a crash in between sends it again (at least once) with
        # the same Message-ID, rather than never.
        await mailer.send(msg, notification_id)
        now = datetime.now(UTC)
        recipients = [str(msg["To"])]
        async with svc.handling(event) as session:
            if not session:
                return
            session.add(Notification(id=notification_id, upload_id=done.upload_id,
                                     kind="upload.completed", recipients=recipients,
                                     subject=str(msg["Subject"]), transport=mailer.transport,
                                     sent_at=now))
            await svc.outbox.add(session, NotificationSent(
                notification_id=notification_id, upload_id=done.upload_id,
                kind="upload.completed", recipients=recipients, subject=str(msg["Subject"]),
                transport=mailer.transport, sent_at=now),  # type: ignore[arg-type]
                event_id=derived_id(notification_id, "sent"))
        log.info("upload %s: emailed %s via %s", done.upload_id, ", ".join(recipients),
                 mailer.transport)

    return svc


def build_app(settings: Settings) -> FastAPI:
    return create_app(bootstrap(settings))
