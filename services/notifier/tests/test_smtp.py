"""The SMTP mailer against real aiosmtpd servers: STARTTLS with authentication, implicit TLS,
and the refusals (a wrong password, a certificate not trusted)."""

from __future__ import annotations

import email
import socket
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from imgest_notifier.mailer import SmtpMailer

USER, PASSWORD = "imgest", "s3cret pass/word"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's name
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER
              and auth_data.password.decode() == PASSWORD)
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)  # False: aiosmtpd answers 535 itself


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    return authority, bundle


def _server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def starttls(ca) -> Iterator[tuple[Inbox, int]]:
    """A server that requires STARTTLS, then AUTH (as a relay that takes passwords only over
    TLS does)."""
    inbox, port = Inbox(), _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port,
                            tls_context=_server_context(ca[0]), require_starttls=True,
                            authenticator=inbox.authenticate, auth_require_tls=True,
                            auth_required=True)
    controller.start()
    yield inbox, port
    controller.stop()


@pytest.fixture
def implicit_tls(ca) -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), _free_port()
    context = _server_context(ca[0])
    controller = Controller(inbox, hostname="127.0.0.1", port=port, ssl_context=context,
                            authenticator=inbox.authenticate, auth_required=True,
                            auth_require_tls=False)  # (aiosmtpd: TLS from the first byte)
    controller.start()
    yield inbox, port
    controller.stop()


def _message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "imgest@example.org", "a@example.org", "Hello"
    msg["Message-ID"] = "<n-1@imgest>"
    msg.set_content("Body")
    return msg


def _url(scheme: str, port: int, password: str = PASSWORD) -> str:
    from urllib.parse import quote

    return f"{scheme}://{USER}:{quote(password, safe='')}@127.0.0.1:{port}"


async def test_starttls_then_login(starttls, ca) -> None:
    inbox, port = starttls
    await SmtpMailer(_url("smtp", port), 10, ca[1]).send(_message(), "n-1")
    assert inbox.logins == [USER]
    assert [m["Message-ID"] for m in inbox.messages] == ["<n-1@imgest>"]


async def test_implicit_tls_then_login(implicit_tls, ca) -> None:
    inbox, port = implicit_tls
    await SmtpMailer(_url("smtps", port), 10, ca[1]).send(_message(), "n-1")
    assert inbox.logins == [USER] and len(inbox.messages) == 1


async def test_a_wrong_password_is_refused(starttls, ca) -> None:
    import aiosmtplib

    inbox, port = starttls
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await SmtpMailer(_url("smtp", port, "wrong"), 10, ca[1]).send(_message(), "n-1")
    assert inbox.messages == []


async def test_a_certificate_no_one_trusts_is_refused(starttls) -> None:
    import aiosmtplib

    inbox, port = starttls
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):
        await SmtpMailer(_url("smtp", port), 10).send(_message(), "n-1")  # the system's CAs
    assert inbox.messages == [] and inbox.logins == []
