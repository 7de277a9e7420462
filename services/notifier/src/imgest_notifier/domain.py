"""Emails from events: who gets one and what it says. No I/O (templates are package data)."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate

from imgest_contracts import UploadCompleted
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

_env = Environment(loader=PackageLoader("imgest_notifier", "templates"),
                   autoescape=select_autoescape(["html", "html.j2"]), undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)

HEADLINE = {"succeeded": "archived", "partial": "partly imported", "failed": "failed",
            "cancelled": "cancelled"}


def upload_completed_email(done: UploadCompleted, *, notification_id: str, sender: str,
                           public_url: str) -> EmailMessage | None:
    """The uploader's email about a finished upload; None if there is no one to tell."""
    if not done.uploader.email:
        return None
    context = {"u": done, "headline": HEADLINE[done.outcome],
               "status_url": f"{public_url.rstrip('/')}/api/v1/uploads/{done.upload_id}"}
    msg = EmailMessage()
    msg["Subject"] = (f"[imgest] Upload {done.upload_id[:8]} {context['headline']}: "
                      f"{done.counts.archived + done.counts.prearchived} of {done.counts.files} "
                      "files imported" + (" (after a replay)" if done.generation else ""))
    msg["From"] = sender
    msg["To"] = done.uploader.email
    msg["Date"] = formatdate(localtime=False)
    # Deterministic, so a resend after a crash is recognisably the same message.
    msg["Message-ID"] = f"<{notification_id}@imgest>"
    msg["X-Imgest-Upload"] = done.upload_id
    msg.set_content(_env.get_template("upload_completed.txt.j2").render(context))
    msg.add_alternative(_env.get_template("upload_completed.html.j2").render(context),
                        subtype="html")
    return msg
