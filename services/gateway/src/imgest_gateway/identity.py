"""Who may do what: users, their secrets, project roles. Free of I/O.

- A **password** is stored as scrypt (the standard library's; memory-hard, salted), a **token**
  as the SHA-256 of its 32 random bytes: a token is not guessable, so a slow hash buys nothing
  and a fast one lets every request look it up by hash.
- A token is shown once (`igt_<43 base64url characters>`) and stands in for the password
  wherever one is asked, as XNAT's alias tokens do: Basic auth, `/data/services/auth`.
- Roles in a project, from most to least: **owner** (settings, members, everything below),
  **member** (uploads, and sees every upload of the project), **uploader** (uploads, and sees only
  their own). An **admin** may do everything, and alone may use `Unassigned` (no project).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

USERNAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
PROJECT_ID = r"^[A-Za-z0-9_-]{1,64}$"  # XNAT's project ID characters
UNASSIGNED = "Unassigned"
TOKEN_PREFIX = "igt_"
MIN_PASSWORD = 8

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # ~16 MB and ~50 ms a check: OWASP's minimum


class Role(StrEnum):
    owner = "owner"
    member = "member"
    uploader = "uploader"


class Action(StrEnum):
    upload = "upload"  # send files into the project
    view = "view"  # see the project and every upload into it
    manage = "manage"  # change its settings and members


ALLOWED: dict[Role, set[Action]] = {
    Role.owner: {Action.upload, Action.view, Action.manage},
    Role.member: {Action.upload, Action.view},
    Role.uploader: {Action.upload},
}


@dataclass(frozen=True)
class Caller:
    """The authenticated user of a request, and their roles by project."""

    username: str
    email: str | None
    admin: bool
    roles: dict[str, Role]

    def may(self, action: Action, project: str | None) -> bool:
        if self.admin:
            return True
        if project is None or project == UNASSIGNED:
            return False
        role = self.roles.get(project)
        return role is not None and action in ALLOWED[role]

    def may_see_upload(self, uploader: str, project: str | None) -> bool:
        """An upload is seen by whoever sent it, by those who may view its project, and by
        admins."""
        return uploader == self.username or self.may(Action.view, project)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${digest}".format(
        **_SCRYPT, salt=_b64(salt), digest=_b64(digest))


def password_matches(password: str, stored: str | None) -> bool:
    """Constant-time check of a password against its stored hash (None: no password set)."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        found = hashlib.scrypt(password.encode(), salt=_unb64(salt), dklen=32, n=int(n), r=int(r),
                               p=int(p))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(found, _unb64(digest))


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(secret: str) -> bool:
    return secret.startswith(TOKEN_PREFIX) and len(secret) > len(TOKEN_PREFIX) + 20


class BadCredentials(ValueError):
    pass


def parse_basic(header_value: str) -> tuple[str, str]:
    """`Basic base64(user:secret)` → (user, secret)."""
    try:
        decoded = base64.b64decode(header_value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise BadCredentials("Basic credentials are not base64 of 'user:password'.") from e
    user, sep, secret = decoded.partition(":")
    if not sep or not user:
        raise BadCredentials("Basic credentials are not 'user:password'.")
    return user, secret


def valid_name(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
