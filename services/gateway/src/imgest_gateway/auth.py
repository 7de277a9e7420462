"""Who is calling: credentials from a request to a `Caller` (with their project roles).

Accepted, in this order: `Authorization: Bearer <token>`; `Authorization: Basic user:secret`
where the secret is the password or a token (XNAT clients send that); an XNAT `JSESSIONID`
cookie from `/data/JSESSION` or `/data/services/auth`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPBasic, HTTPBearer
from imgest_runtime.db import Database, Statement
from sqlalchemy import bindparam, delete, func, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import ORMExecuteState, Session
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException

from .identity import (
    BadCredentials,
    Caller,
    Role,
    looks_like_token,
    new_token,
    parse_basic,
    password_matches,
    token_hash,
)
from .models import ApiToken, LoginSession, Membership, User

log = logging.getLogger("imgest.gateway.auth")

SESSION_COOKIE = "JSESSIONID"
SESSION_HOURS = 12
REALM = 'Basic realm="imgest", Bearer'
_TOUCH_EVERY = timedelta(minutes=5)  # last_used_at is a hint, not worth a write per request

# Declared for the OpenAPI document (Swagger's "Authorize", Schemathesis' auth checks); the
# credentials themselves are read by `authenticate`, which knows all three.
_DOCUMENTED = (HTTPBearer(auto_error=False, description="An API token (`imgest token create`)."),
               HTTPBasic(auto_error=False, description="User name, and the password or a token."),
               APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                            description="XNAT session (`/data/JSESSION`)."))


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": REALM})


def forbidden(detail: str) -> HTTPException:
    return HTTPException(403, detail)


def _caller_query(*where: Any) -> Any:
    """A user with their roles, in one statement."""
    roles = func.coalesce(func.jsonb_object_agg(Membership.project, Membership.role).filter(
        col(Membership.project).is_not(None)), text("'{}'::jsonb"))
    return (select(User.username, User.email, User.admin, User.active, roles)
            .join(Membership, col(Membership.username) == User.username, isouter=True)
            .where(*where).group_by(col(User.username)))


# Built once: one of these runs on every request, and building it (with its cache key) costs
# more than a millisecond of CPU each time.
_BY_NAME = _caller_query(User.username == bindparam("username"))
# Those of every request, compiled for the driver itself (a third of the CPU).
_BY_TOKEN = Statement(_caller_query(ApiToken.secret_hash == bindparam("secret_hash")).join(
    ApiToken, col(ApiToken.username) == User.username).add_columns(
    ApiToken.id, ApiToken.revoked_at, ApiToken.expires_at, ApiToken.last_used_at
).group_by(col(ApiToken.id)))
_TOUCH_TOKEN = Statement(update(ApiToken.__table__).where(  # type: ignore[attr-defined]
    ApiToken.__table__.c.id == bindparam("token_id")).values(  # type: ignore[attr-defined]
    last_used_at=bindparam("now")))
_BY_LOGIN_SESSION = Statement(_caller_query(LoginSession.id_hash == bindparam("id_hash")).join(
    LoginSession, col(LoginSession.username) == User.username).add_columns(
    LoginSession.expires_at).group_by(col(LoginSession.id_hash)))


def _caller(row: Any) -> Caller | None:
    username, email, admin, active, roles = tuple(row)[:5]
    if not active:
        return None
    return Caller(username=username, email=email, admin=admin,
                  roles={p: Role(r) for p, r in roles.items()})


async def caller_named(session: AsyncSession, username: str) -> Caller | None:
    row = (await session.execute(_BY_NAME, {"username": username})).first()
    return _caller(row) if row is not None else None


IDENTITY_CHANNEL = "imgest_identity"  # NOTIFYed by the triggers of migration 5e1f0c2a9d47
IDENTITY_TABLES = {"user", "membership", "api_token", "login_session"}


class Callers:
    """Who a token or a login session belongs to, kept in this process between requests: the
    look-up was a statement and 0.4 ms of CPU on every request. Kept only while this process
    LISTENs on IDENTITY_CHANNEL, which triggers on the user, token, membership and login
    session tables NOTIFY on any change, from any writer (the API, the CLI, an administrator's
    SQL): everything kept is then forgotten. A revocation so takes effect at once in the
    worker that made it (`forget_at_own_commits`), and within milliseconds in the others (the
    notice leaves with the commit, as the revoking request's answer does). Notices sent while
    the connection is lost are missed, so nothing is kept until it is back, and everything is
    forgotten when it is. What is kept is the row: expiry is checked on every use."""

    MAX_ENTRIES = 10_000
    MAX_AGE = 60.0  # seconds; a bound, should a notice ever be lost unseen (a trigger off)

    def __init__(self) -> None:
        self.listening = False
        self.generation = 0  # a look-up that began before a change must not be kept after it
        self._rows: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any | None:
        kept = self._rows.get(key)
        if kept is None or not self.listening:
            return None
        if time.monotonic() - kept[0] > self.MAX_AGE:
            del self._rows[key]
            return None
        return kept[1]

    def keep(self, key: str, row: Any, generation: int) -> None:
        if self.listening and generation == self.generation:
            if len(self._rows) >= self.MAX_ENTRIES:
                self._rows.clear()
            self._rows[key] = (time.monotonic(), row)

    def forget(self, key: str) -> None:
        self._rows.pop(key, None)

    def changed(self, _payload: str = "") -> None:
        self.generation += 1
        self._rows.clear()

    def listen_state(self, listening: bool) -> None:
        self.listening = listening
        self.changed()  # what was kept may have changed unheard

    async def follow(self, db: Database) -> None:
        # A connection that died unseen is found out within 2 × 5 s, well inside MAX_AGE.
        await db.listen(IDENTITY_CHANNEL, self.changed, self.listen_state, check_every=5.0)

    def forget_at_own_commits(self) -> None:
        """Forgets at the commit of a change this process makes (through a session), not a
        notice later: a request right after it, to this same worker, is judged on the new
        rows. What counts is what the triggers tell of."""
        def changes(table: Any, inserted: bool) -> bool:
            return (table is not None and table.name in IDENTITY_TABLES
                    and (not inserted or table.name == "membership"))

        def flushed(session: Session, _context: Any) -> None:
            written = [(o, False) for o in (*session.dirty, *session.deleted)]
            if any(changes(getattr(o, "__table__", None), inserted)
                   for o, inserted in written + [(o, True) for o in session.new]):
                session.info["identity_changed"] = True

        def executed(state: ORMExecuteState) -> None:  # update(…) and delete(…) statements
            if (state.is_update or state.is_delete) and changes(
                    getattr(state.statement, "table", None), False):
                state.session.info["identity_changed"] = True

        def committed(session: Session) -> None:
            if session.info.pop("identity_changed", False):
                self.changed()

        def rolled_back(session: Session) -> None:
            session.info.pop("identity_changed", None)

        sa_event.listen(Session, "after_flush", flushed)
        sa_event.listen(Session, "do_orm_execute", executed)
        sa_event.listen(Session, "after_commit", committed)
        sa_event.listen(Session, "after_soft_rollback", lambda s, _t: rolled_back(s))


async def _kept_or_fetched(db: Database, callers: Callers | None, key: str,
                           statement: Statement, **params: Any) -> Any | None:
    if callers is not None and (row := callers.get(key)) is not None:
        return row
    generation = callers.generation if callers is not None else 0
    async with db.connection() as conn:
        row = await conn.fetchrow(statement, **params)
    if row is not None and callers is not None:
        callers.keep(key, row, generation)
    return row


async def by_token(db: Database, token: str, username: str | None = None,
                   callers: Callers | None = None) -> Caller | None:
    now = datetime.now(UTC)
    secret_hash = token_hash(token)
    row = await _kept_or_fetched(db, callers, "token " + secret_hash, _BY_TOKEN,
                                 secret_hash=secret_hash)
    if row is None:
        return None
    token_id, revoked_at, expires_at, last_used_at = tuple(row)[5:]
    if revoked_at is not None or (expires_at is not None and expires_at <= now):
        return None
    if username is not None and username != row[0]:
        return None
    if last_used_at is None or now - last_used_at > _TOUCH_EVERY:
        async with db.connection() as conn:
            await conn.execute(_TOUCH_TOKEN, token_id=token_id, now=now)
        if callers is not None:  # (no trigger tells of a touch: the kept row says untouched)
            callers.forget("token " + secret_hash)
    return _caller(row)


async def by_password(session: AsyncSession, username: str, password: str) -> Caller | None:
    user = await session.get(User, username)
    # The hash is checked even for an unknown user, so the answer takes as long either way.
    stored = user.password_hash if user is not None else _DUMMY_HASH
    if not await asyncio.to_thread(password_matches, password, stored) or user is None:
        return None
    return await caller_named(session, username)


async def by_login_session(db: Database, session_id: str, callers: Callers | None = None
                           ) -> Caller | None:
    id_hash = token_hash(session_id)
    row = await _kept_or_fetched(db, callers, "session " + id_hash, _BY_LOGIN_SESSION,
                                 id_hash=id_hash)
    if row is None or row["expires_at"] <= datetime.now(UTC):
        return None
    return _caller(row)


async def credentials(db: Database, username: str, secret: str, callers: Callers | None = None
                      ) -> Caller | None:
    """A user name with a password or a token in the password's place (XNAT's alias tokens)."""
    if not username.isprintable():
        return None  # no user is named so (and a NUL cannot even be looked up)
    if looks_like_token(secret):
        return await by_token(db, secret, username, callers)
    async with db.session() as session:
        return await by_password(session, username, secret)


async def identify(db: Database, request: Request, callers: Callers | None = None
                   ) -> Caller | None:
    """The caller, None when no credentials came; raises 401 on wrong ones."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        caller = await by_token(db, value.strip(), callers=callers)
        if caller is None:
            raise unauthorized("The token is unknown, revoked or expired.")
        return caller
    if scheme.lower() == "basic":
        try:
            username, secret = parse_basic(value)
        except BadCredentials as e:
            raise unauthorized(str(e)) from e
        caller = await credentials(db, username, secret, callers)
        if caller is None:
            raise unauthorized("Wrong user name, password or token.")
        return caller
    if header:
        raise unauthorized("Use 'Authorization: Bearer <token>' or Basic credentials.")
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        caller = await by_login_session(db, session_id, callers)
        if caller is None:
            raise unauthorized("The session has expired; log in again.")
        return caller
    return None


async def authenticated(request: Request, _b: Annotated[Any, Depends(_DOCUMENTED[0])],
                        _u: Annotated[Any, Depends(_DOCUMENTED[1])],
                        _c: Annotated[Any, Depends(_DOCUMENTED[2])]) -> Caller:
    state = request.app.state
    caller = await identify(state.service.db, request, getattr(state, "callers", None))
    if caller is None:
        raise unauthorized("Authentication required: an API token (Authorization: Bearer …) "
                           "or a user name and password or token (Basic).")
    request.state.caller = caller
    return caller


CallerDep = Annotated[Caller, Depends(authenticated)]


async def admin_only(caller: CallerDep) -> Caller:
    if not caller.admin:
        raise forbidden("Only an administrator may do this.")
    return caller


AdminDep = Annotated[Caller, Depends(admin_only)]


# --- login sessions (XNAT's JSESSIONID) ----------------------------------------------------------


async def open_login_session(db: Database, username: str) -> str:
    session_id = uuid.uuid4().hex.upper()  # XNAT's look: 32 hex characters
    now = datetime.now(UTC)
    async with db.session() as session:
        session.add(LoginSession(id_hash=token_hash(session_id), username=username,
                                 created_at=now, expires_at=now + timedelta(hours=SESSION_HOURS)))
    return session_id


async def sweep_login_sessions(db: Database) -> None:
    """Deletes expired login sessions: a periodic job, not a part of each login, where it made
    the worker forget who its callers are at every login, expired sessions or not."""
    async with db.session() as session:
        await session.execute(delete(LoginSession).where(
            col(LoginSession.expires_at) < datetime.now(UTC)))


async def close_login_session(db: Database, session_id: str) -> None:
    async with db.session() as session:
        await session.execute(delete(LoginSession).where(
            col(LoginSession.id_hash) == token_hash(session_id)))


# --- tokens ---------------------------------------------------------------------------------------


async def issue_token(session: AsyncSession, username: str, name: str,
                      expires_at: datetime | None = None, secret: str | None = None
                      ) -> tuple[ApiToken, str]:
    """A new token for the user: the row (kept) and the secret (shown once, never kept)."""
    secret = secret or new_token()
    row = ApiToken(id=uuid.uuid4().hex[:12], username=username, name=name,
                   secret_hash=token_hash(secret), created_at=datetime.now(UTC),
                   expires_at=expires_at)
    session.add(row)
    return row, secret


# --- the first administrator ----------------------------------------------------------------------


async def ensure_first_admin(db: Database, username: str, email: str | None,
                             token_file: Path, token: str | None = None,
                             password_hash: str | None = None) -> None:
    """On the very first start (no user yet) the administrator is created with a token, printed
    once and written to `token_file` (mode 0600) for scripts. A token given in the settings
    (IMGEST_ADMIN_TOKEN) is made valid for the administrator on any start: the way back in
    when the file is lost, and a fixed credential for deployments."""
    now = datetime.now(UTC)
    async with db.session() as session:
        anyone = (await session.exec(select(User.username).limit(1))).first()
        created = False
        if anyone is None:
            created = bool((await session.execute(pg_insert(User).values(
                username=username, email=email, password_hash=password_hash, admin=True,
                active=True, created_at=now).on_conflict_do_nothing())).rowcount)
        if created:
            _row, secret = await issue_token(session, username, "first start", secret=token)
        elif token and (await session.exec(select(ApiToken).where(
                ApiToken.secret_hash == token_hash(token)))).first() is None and (
                await session.get(User, username)) is not None:
            await issue_token(session, username, "IMGEST_ADMIN_TOKEN", secret=token)
    if not created:
        return
    if token is None:
        _write_secret(token_file, secret + "\n")
        log.warning("first start: created the administrator %r. Its API token, shown this once "
                    "(also in %s, mode 0600): %s", username, token_file, secret)
    else:
        log.warning("first start: created the administrator %r with the token in "
                    "IMGEST_ADMIN_TOKEN", username)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode on open: make sure


_DUMMY_HASH = ("scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$"
               "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
