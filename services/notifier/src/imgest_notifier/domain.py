"""Emails from events: who gets one and what it says. No I/O (templates are read when
rendered: the package's, or an operator's from a directory that overrides them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from imgest_contracts import ProjectUpdated, Reason, SessionRef, UploadCompleted, Uploader
from imgest_runtime.outbox import derived_id
from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    select_autoescape,
)

HEADLINE = {"succeeded": "archived", "partial": "partly imported", "failed": "failed",
            "cancelled": "cancelled"}
ATTENTION = {"session.conflicted": "is in CONFLICT", "session.failed": "failed",
             "session.quarantined": "is quarantined"}


@dataclass(frozen=True)
class Contacts:
    """Who hears of a project's news, as its last project.updated said."""

    owners: list[str] = field(default_factory=list)  # their addresses
    by_kind: dict[str, list[str]] = field(default_factory=dict)
    every_upload: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, p: ProjectUpdated) -> Contacts:
        return cls(owners=[o.email for o in p.owners if o.email],
                   by_kind={k: list(v) for k, v in p.settings.recipients.items()},
                   every_upload=list(p.settings.notify))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Contacts:
        return cls(**data)


@dataclass(frozen=True)
class Letter:
    """One email to send: its id is the notification's (one per event and audience), so a
    redelivered event makes the same letter, which is sent once."""

    id: str
    kind: str
    msg: EmailMessage
    upload_id: str | None = None
    session_key: str | None = None

    @property
    def recipients(self) -> list[str]:
        return [a.strip() for a in str(self.msg["To"]).split(",")]


def entry_key(uri: str) -> str:
    """A prearchive entry's session key from its address (/data/prearchive/projects/P/TS/E)."""
    return "prearchive/" + uri.removeprefix("/data/prearchive/projects/")


def _addresses(*groups: list[str], without: frozenset[str] | set[str] = frozenset()
               ) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        for address in group:
            if address and address.lower() not in without:
                seen.setdefault(address, None)
    return list(seen)


class Post:
    """Writes the letters an event calls for."""

    def __init__(self, sender: str, public_url: str, template_dir: Path | None = None):
        loaders: list[Any] = [PackageLoader("imgest_notifier", "templates")]
        if template_dir is not None:  # an operator's templates win, file by file
            loaders.insert(0, FileSystemLoader(template_dir))
        self.env = Environment(loader=ChoiceLoader(loaders),
                               autoescape=select_autoescape(["html", "html.j2"]),
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.sender = sender
        self.public_url = public_url.rstrip("/")

    def link(self, uri: str) -> str:
        """A session's (or prearchive entry's) address in the gateway."""
        return f"{self.public_url}{uri}"

    def upload_completed(self, done: UploadCompleted, contacts: Contacts | None) -> list[Letter]:
        """The uploader's email (unless they turned off success mails: failures are always
        told), and one to the project's recipients for this outcome."""
        kind = f"upload.{done.outcome}"
        context = {"u": done, "headline": HEADLINE[done.outcome], "link": self.link,
                   "status_url": f"{self.public_url}/api/v1/uploads/{done.upload_id}"}
        subject = (f"[imgest] Upload {done.upload_id[:8]} {context['headline']}: "
                   f"{done.counts.archived + done.counts.prearchived} of {done.counts.files} "
                   "files imported" + (" (after a replay)" if done.generation else ""))
        letters = []
        uploader = done.uploader.email or ""
        if uploader and (done.outcome != "succeeded" or done.uploader.success_emails):
            letters.append(self._letter(
                derived_id("upload.completed", done.upload_id, str(done.generation), "uploader"),
                kind, [uploader], subject, "upload_completed",
                {**context, "greeting": done.uploader.username}, upload_id=done.upload_id))
        if contacts is not None:
            others = _addresses(contacts.every_upload, contacts.by_kind.get(kind, []),
                                without={uploader.lower()})
            if others:
                letters.append(self._letter(
                    derived_id("upload.completed", done.upload_id, str(done.generation),
                               "project"), kind, others, subject, "upload_completed",
                    {**context, "greeting": f"project {done.project}"},
                    upload_id=done.upload_id))
        return letters

    def session_attention(self, kind: str, event_id: str, session_key: str, session: SessionRef,
                          reason: Reason | None, contacts: Contacts | None,
                          upload_ids: list[str]) -> list[Letter]:
        """The project's owners (and its recipients for the kind) hear of a session that needs
        them: in CONFLICT, failed, or quarantined."""
        if contacts is None:
            return []
        to = _addresses(contacts.owners, contacts.by_kind.get(kind, []))
        if not to:
            return []
        what = ATTENTION[kind]
        subject = f"[imgest] Session {session.session} of {session.project} {what}"
        return [self._letter(derived_id(kind, event_id, "owners"), kind, to, subject,
                             "session_attention", {
                                 "s": session, "what": what, "kind": kind, "reason": reason,
                                 "link": self.link(session.uri), "uploads": upload_ids,
                                 "prearchive_url": f"{self.public_url}/api/v1/projects/"
                                                   f"{session.project}/prearchive"},
                             upload_id=upload_ids[0] if upload_ids else None,
                             session_key=session_key)]

    def session_built(self, event_id: str, session: SessionRef, state: str,
                      reason: Reason | None, senders: list[tuple[Uploader, int, int]]
                      ) -> list[Letter]:
        """A gradual send's session is built: each of its senders hears of it once (how many
        files and uploads of theirs it holds), in place of an email per instance."""
        archived = state == "archived"
        kind = ("upload.succeeded" if archived or state == "READY"
                else "upload.failed" if state == "ERROR" else "upload.partial")
        what = {"archived": "is archived", "READY": "waits in the prearchive for review",
                "CONFLICT": "is in CONFLICT", "ERROR": "failed"}.get(state, state)
        letters = []
        for uploader, files, uploads in senders:
            if not uploader.email or (kind == "upload.succeeded" and not uploader.success_emails):
                continue
            letters.append(self._letter(
                derived_id("session.built", event_id, uploader.username), kind, [uploader.email],
                f"[imgest] Session {session.session} of {session.project} {what}: {files} "
                f"file{'s' if files != 1 else ''} sent instance by instance", "session_built", {
                    "greeting": uploader.username, "s": session, "what": what, "files": files,
                    "uploads": uploads, "reason": reason, "link": self.link(session.uri)},
                session_key=session.uri))
        return letters

    def _letter(self, letter_id: str, kind: str, to: list[str], subject: str, template: str,
                context: dict[str, Any], *, upload_id: str | None = None,
                session_key: str | None = None) -> Letter:
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(to)
        msg["Date"] = formatdate(localtime=False)
        # Deterministic, so a resend after a crash is recognisably the same message.
        msg["Message-ID"] = f"<{letter_id}@imgest>"
        msg["X-Imgest-Kind"] = kind
        if upload_id:
            msg["X-Imgest-Upload"] = upload_id
        if session_key:
            msg["X-Imgest-Session"] = session_key
        msg.set_content(self.env.get_template(f"{template}.txt.j2").render(context))
        msg.add_alternative(self.env.get_template(f"{template}.html.j2").render(context),
                            subtype="html")
        return Letter(letter_id, kind, msg, upload_id, session_key)
