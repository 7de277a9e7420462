"""`imgest user|token|project`: administer users, tokens and projects through the gateway's API.

Each command calls the gateway as the holder of a token: `--token`/`IMGEST_TOKEN`, else the
administrator's token that the first start wrote to `$IMGEST_DATA_DIR/admin.token`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

Url = Annotated[str, typer.Option("--url", envvar="IMGEST_PUBLIC_URL", show_envvar=True,
                                  help="The gateway.")]
Token = Annotated[str | None, typer.Option(
    "--token", envvar="IMGEST_TOKEN", show_envvar=True,
    help="API token to act with (default: $IMGEST_DATA_DIR/admin.token).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_URL = "http://127.0.0.1:8080"
ROLES = ("owner", "member", "uploader")

user_app = typer.Typer(help="Users: add, list, change.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens: create (shown once), list, revoke.",
                        no_args_is_help=True)
project_app = typer.Typer(help="Projects: create, change settings and members, list, show.",
                          no_args_is_help=True)


def resolve_token(token: str | None) -> str:
    if token:
        return token
    path = Path(os.environ.get("IMGEST_DATA_DIR", ".imgest")) / "admin.token"
    try:
        return path.read_text().strip()
    except OSError:
        _fail(f"no token: pass --token or set IMGEST_TOKEN (the administrator's is in "
              f"{path} after the first `imgest up`)")
        raise  # unreachable; keeps type checkers calm


def client(url: str, token: str | None):
    import httpx

    return httpx.Client(base_url=url, timeout=30,
                        headers={"Authorization": f"Bearer {resolve_token(token)}"})


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def call(url: str, token: str | None, method: str, path: str, **kw: Any) -> Any:
    """One API call; a refusal is printed as the gateway's problem detail, exit 1."""
    import httpx

    try:
        with client(url, token) as http:
            response = http.request(method, path, **kw)
    except httpx.TransportError as e:
        _fail(f"the gateway at {url} does not answer ({e}); is `imgest up` running?")
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail", response.text)
            for error in body.get("errors") or []:
                detail += f"\n  {'.'.join(map(str, error['loc']))}: {error['msg']}"
        except ValueError:
            detail = response.text
        _fail(f"{response.status_code}: {detail}")
    return response.json() if response.content else None


def _table(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console().print(table)


def _password(password_stdin: bool, prompt: bool) -> str | None:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if prompt:
        return typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return None


# --- users ---------------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="Letters, digits and _ . @ -")],
    email: Annotated[str | None, typer.Option(help="Where their emails go.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Make them an administrator.")] = False,
    password: Annotated[bool, typer.Option("--password", help="Ask for a password.")] = False,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from stdin (scripts).")] = False,
    with_token: Annotated[bool, typer.Option(
        "--token-create", help="Also create a token for them and print it (once).")] = False,
    url: Url = DEFAULT_URL, token: Token = None,
) -> None:
    """Add a user. Without a password they log in with tokens only."""
    body = {"username": username, "email": email, "admin": admin,
            "password": _password(password_stdin, password)}
    user = call(url, token, "POST", "/api/v1/users", json=body)
    typer.echo(f"added {user['username']}{' (administrator)' if user['admin'] else ''}")
    if with_token:
        created = call(url, token, "POST", f"/api/v1/users/{username}/tokens",
                       json={"name": "created with the user"})
        typer.echo(f"token (shown this once): {created['token']}")


@user_app.command("list")
def user_list(as_json: AsJson = False, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Every user (administrators)."""
    _table(call(url, token, "GET", "/api/v1/users"),
           ["username", "email", "admin", "active", "has_password", "created_at"], as_json)


@user_app.command("set")
def user_set(
    username: str,
    email: Annotated[str | None, typer.Option(help="New email address.")] = None,
    password: Annotated[bool, typer.Option("--password", help="Ask for a new password.")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
    admin: Annotated[bool | None, typer.Option("--admin/--no-admin")] = None,
    active: Annotated[bool | None, typer.Option(
        "--active/--deactivate", help="Deactivating also revokes their tokens.")] = None,
    url: Url = DEFAULT_URL, token: Token = None,
) -> None:
    """Change a user's email, password, admin flag, or deactivate them."""
    body = {k: v for k, v in {"email": email, "password": _password(password_stdin, password),
                              "admin": admin, "active": active}.items() if v is not None}
    if not body:
        _fail("nothing to change: give --email, --password, --admin/--no-admin or --deactivate")
    user = call(url, token, "PATCH", f"/api/v1/users/{username}", json=body)
    typer.echo(json.dumps(user, indent=2))


# --- tokens --------------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    username: Annotated[str | None, typer.Argument(help="Whose (default: yours).")] = None,
    name: Annotated[str, typer.Option(help="What it is for.")] = "token",
    expires_in_days: Annotated[int | None, typer.Option(help="Default: never.")] = None,
    url: Url = DEFAULT_URL, token: Token = None,
) -> None:
    """Create a token; it is printed this once (keep it: only its hash is stored)."""
    username = username or call(url, token, "GET", "/api/v1/me")["username"]
    created = call(url, token, "POST", f"/api/v1/users/{username}/tokens",
                   json={"name": name, "expires_in_days": expires_in_days})
    typer.echo(created["token"])
    typer.secho(f"token {created['id']} for {username}; shown this once.", err=True, dim=True)


@token_app.command("list")
def token_list(username: Annotated[str | None, typer.Argument()] = None, as_json: AsJson = False,
               url: Url = DEFAULT_URL, token: Token = None) -> None:
    """A user's tokens (default: yours), without their secrets."""
    username = username or call(url, token, "GET", "/api/v1/me")["username"]
    _table(call(url, token, "GET", f"/api/v1/users/{username}/tokens"),
           ["id", "name", "created_at", "expires_at", "last_used_at", "revoked"], as_json)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")],
                 username: Annotated[str | None, typer.Option(
                     "--user", help="Whose (default: yours).")] = None,
                 url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Revoke a token: it stops working at once."""
    username = username or call(url, token, "GET", "/api/v1/me")["username"]
    call(url, token, "DELETE", f"/api/v1/users/{username}/tokens/{token_id}")
    typer.echo(f"revoked {token_id}")


# --- projects ------------------------------------------------------------------------------------

AutoArchive = Annotated[str | None, typer.Option(
    help="manual (prearchive for review), auto, or auto-overwrite.")]
Quarantine = Annotated[bool | None, typer.Option("--quarantine/--no-quarantine")]
Required = Annotated[list[str] | None, typer.Option(
    "--required-field", help="An upload field every upload must carry (repeat).")]
MaxFiles = Annotated[int | None, typer.Option(help="Most files one upload may hold.")]
Kinds = Annotated[list[str] | None, typer.Option(
    "--accept", help="A kind of file the project takes: dicom, photo, slide, csv (repeat).")]
Notify = Annotated[list[str] | None, typer.Option("--notify", help="Address told of every "
                                                  "upload's outcome (repeat).")]


def _settings(auto_archive: str | None, quarantine: bool | None, required: list[str] | None,
              max_files: int | None, kinds: list[str] | None, notify: list[str] | None,
              setting: list[str] | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for item in setting or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--set takes key=JSON, e.g. max_files_per_upload=200 (got {item!r})")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    settings.update({k: v for k, v in {
        "auto_archive": auto_archive, "quarantine": quarantine, "required_fields": required,
        "max_files_per_upload": max_files, "accepted_kinds": kinds, "notify": notify,
    }.items() if v is not None})
    return settings


Set = Annotated[list[str] | None, typer.Option(
    "--set", help="Any setting as key=JSON, e.g. metadata_rules='{\"photo\": {…}}' (repeat).")]


@project_app.command("create")
def project_create(
    project_id: Annotated[str, typer.Argument(metavar="ID", help="Letters, digits, _ and -.")],
    name: Annotated[str | None, typer.Option(help="Default: the ID.")] = None,
    description: Annotated[str, typer.Option()] = "",
    owner: Annotated[list[str] | None, typer.Option(help="Make this user an owner (repeat).")
                     ] = None,
    auto_archive: AutoArchive = None, quarantine: Quarantine = None, required_field: Required = None,
    max_files: MaxFiles = None, accept: Kinds = None, notify: Notify = None, set_: Set = None,
    url: Url = DEFAULT_URL, token: Token = None,
) -> None:
    """Create a project (administrators)."""
    body = {"id": project_id, "name": name, "description": description, "owners": owner or [],
            "settings": _settings(auto_archive, quarantine, required_field, max_files, accept,
                                  notify, set_)}
    project = call(url, token, "POST", "/api/v1/projects", json=body)
    typer.echo(f"created project {project['id']}")


@project_app.command("set")
def project_set(
    project_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    member: Annotated[list[str] | None, typer.Option(
        help="USER=ROLE: give a user a role (owner, member, uploader); repeat.")] = None,
    remove_member: Annotated[list[str] | None, typer.Option(help="Take USER's role away.")
                             ] = None,
    auto_archive: AutoArchive = None, quarantine: Quarantine = None, required_field: Required = None,
    max_files: MaxFiles = None, accept: Kinds = None, notify: Notify = None, set_: Set = None,
    url: Url = DEFAULT_URL, token: Token = None,
) -> None:
    """Change a project's settings and members (its owners, administrators)."""
    settings = _settings(auto_archive, quarantine, required_field, max_files, accept, notify,
                         set_)
    body = {k: v for k, v in {"name": name, "description": description,
                              "settings": settings or None}.items() if v is not None}
    grants = []
    for item in member or []:
        user, _, role = item.partition("=")
        if role not in ROLES:
            _fail(f"--member takes USER=ROLE with ROLE one of {', '.join(ROLES)} (got {item!r})")
        grants.append((user, role))
    if not (body or grants or remove_member):
        _fail("nothing to change")
    if body:
        call(url, token, "PATCH", f"/api/v1/projects/{project_id}", json=body)
    for user, role in grants:
        call(url, token, "PUT", f"/api/v1/projects/{project_id}/members/{user}",
             json={"role": role})
    for user in remove_member or []:
        call(url, token, "DELETE", f"/api/v1/projects/{project_id}/members/{user}")
    project_show(project_id, url=url, token=token)


@project_app.command("list")
def project_list(as_json: AsJson = False, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Projects you have a role in (administrators: all)."""
    rows = [{**p, "auto_archive": p["settings"].get("auto_archive")}
            for p in call(url, token, "GET", "/api/v1/projects")]
    _table(rows, ["id", "name", "role", "auto_archive", "created_at"], as_json)


@project_app.command("show")
def project_show(project_id: Annotated[str, typer.Argument(metavar="ID")],
                 url: Url = DEFAULT_URL, token: Token = None) -> None:
    """A project's settings and members, as JSON."""
    typer.echo(json.dumps(call(url, token, "GET", f"/api/v1/projects/{project_id}"), indent=2))
