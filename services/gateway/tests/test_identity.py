"""Who may do what, and how secrets are kept (no I/O)."""

import base64

import pytest
from imgest_gateway.identity import (
    UNASSIGNED,
    Action,
    BadCredentials,
    Caller,
    Role,
    hash_password,
    looks_like_token,
    new_token,
    parse_basic,
    password_matches,
    token_hash,
)


def caller(admin: bool = False, **roles: Role) -> Caller:
    return Caller(username="ann", email=None, admin=admin, roles=dict(roles))


def test_a_password_is_kept_salted_and_checked():
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert stored != hash_password("correct horse")  # salted
    assert password_matches("correct horse", stored)
    assert not password_matches("correct hors", stored)
    assert not password_matches("correct horse", None)
    assert not password_matches("x", "bcrypt$whatever")
    assert not password_matches("x", "scrypt$not$a$valid$hash$!")


def test_tokens_are_random_and_kept_as_their_hash():
    a, b = new_token(), new_token()
    assert a != b and looks_like_token(a) and len(a) > 40
    assert token_hash(a) != token_hash(b) and len(token_hash(a)) == 64
    assert not looks_like_token("a password")


@pytest.mark.parametrize(("role", "upload", "view", "manage"), [
    (Role.owner, True, True, True),
    (Role.member, True, True, False),
    (Role.uploader, True, False, False),
])
def test_roles(role, upload, view, manage):
    c = caller(P1=role)
    assert c.may(Action.upload, "P1") is upload
    assert c.may(Action.view, "P1") is view
    assert c.may(Action.manage, "P1") is manage
    assert not c.may(Action.upload, "P2")  # no role elsewhere


def test_unassigned_and_no_project_are_for_admins_only():
    assert not caller(P1=Role.owner).may(Action.upload, None)
    assert not caller(P1=Role.owner).may(Action.view, UNASSIGNED)
    assert caller(admin=True).may(Action.view, UNASSIGNED)
    assert caller(admin=True).may(Action.manage, "anything")


def test_an_uploader_sees_their_own_uploads_and_no_one_elses():
    c = caller(P1=Role.uploader)
    assert c.may_see_upload("ann", "P1")
    assert not c.may_see_upload("bob", "P1")
    assert caller(P1=Role.member).may_see_upload("bob", "P1")


def test_basic_credentials():
    encoded = base64.b64encode(b"ann:pa:ss").decode()
    assert parse_basic(encoded) == ("ann", "pa:ss")  # a colon in the password is kept
    for bad in ("%%%", base64.b64encode(b"no-colon").decode(),
                base64.b64encode(b":nouser").decode()):
        with pytest.raises(BadCredentials):
            parse_basic(bad)


# --- XNAT's import parameters ------------------------------------------------------------------

from imgest_gateway.xnat_api import XnatError, import_options


def test_xnat_parameters_in_all_their_spellings():
    options, handler, ignore = import_options({
        "PROJECT_ID": "P1", "subject_id": "S1", "EXPT_LABEL": "E1", "overwrite": "append",
        "quarantine": "true", "triggerPipelines": "false", "AA": "false",
        "Ignore-Unparsable": "true", "import-handler": "si"})
    assert (options.project, options.subject, options.session) == ("P1", "S1", "E1")
    assert options.overwrite == "append" and options.quarantine is True
    assert options.trigger_pipelines is False and options.auto_archive is False
    assert handler == "SI" and ignore is True


@pytest.mark.parametrize(("dest", "project", "subject", "session", "archive"), [
    ("/prearchive", None, None, None, None),
    ("/prearchive/projects/P", "P", None, None, None),
    ("/prearchive/projects/P/20261126_101500123/SESS", "P", None, "SESS", None),
    ("/archive", None, None, None, True),
    ("/data/archive/projects/P/subjects/S", "P", "S", None, True),
    ("/archive/projects/P/subjects/S/experiments/E", "P", "S", "E", True),
    ("/prearchive/projects/Unassigned", None, None, None, None),
])
def test_xnat_dest_in_all_its_forms(dest, project, subject, session, archive):
    options, _, _ = import_options({"dest": dest})
    assert (options.project, options.subject, options.session) == (project, subject, session)
    assert options.auto_archive is archive
    assert options.dest.startswith(("/prearchive", "/archive"))


@pytest.mark.parametrize(("params", "status"), [
    ({"import-handler": "XAR-please"}, 404),
    ({"dest": "/elsewhere"}, 400),
    ({"dest": "/archive/projects/../etc"}, 400),
    ({"overwrite": "always"}, 400),
    ({"project": "a b"}, 400),
])
def test_xnat_refusals(params, status):
    with pytest.raises(XnatError) as refused:
        import_options(params)
    assert refused.value.status == status


def test_callers_keep_rows_only_while_told_of_every_change():
    from imgest_gateway.auth import Callers

    callers = Callers()
    callers.keep("token a", "row a", callers.generation)
    assert callers.get("token a") is None  # not listening: a change could go unheard
    callers.listen_state(True)
    callers.keep("token a", "row a", callers.generation)
    assert callers.get("token a") == "row a"
    # A look-up that began before a change is not kept after it: it may have read the old row.
    began = callers.generation
    callers.changed("membership")
    assert callers.get("token a") is None
    callers.keep("token b", "old row b", began)
    assert callers.get("token b") is None
    callers.keep("token b", "row b", callers.generation)
    callers.forget("token b")
    assert callers.get("token b") is None
    # A lost connection forgets all, and keeps nothing until it listens again.
    callers.keep("token c", "row c", callers.generation)
    callers.listen_state(False)
    callers.keep("token c", "row c", callers.generation)
    assert callers.get("token c") is None
    callers.listen_state(True)
    assert callers.get("token c") is None


def test_callers_forget_rows_past_their_age(monkeypatch):
    from imgest_gateway import auth

    callers = auth.Callers()
    callers.listen_state(True)
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    callers.keep("token a", "row a", callers.generation)
    now[0] += callers.MAX_AGE - 1
    assert callers.get("token a") == "row a"
    now[0] += 2
    assert callers.get("token a") is None
