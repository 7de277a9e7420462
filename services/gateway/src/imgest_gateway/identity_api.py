"""Users, tokens, projects and their members over HTTP (what `imgest user|token|project` call)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from imgest_contracts import EMAIL, Contact, ProjectSettings, ProjectUpdated
from imgest_contracts.events import json_int
from imgest_runtime.service import Service, problem, problem_responses
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy import update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .auth import AdminDep, CallerDep, forbidden, issue_token
from .identity import (
    MIN_PASSWORD,
    PROJECT_ID,
    UNASSIGNED,
    USERNAME,
    Action,
    Caller,
    Role,
    hash_password,
)
from .models import ApiToken, Membership, Project, User
from .views import json_response

Username = Annotated[str, PathParam(pattern=USERNAME, description="A user name.")]
# Text a person writes: no control characters (PostgreSQL refuses NUL, and none belongs there).
Text = Annotated[str, Field(pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$")]
Password = Annotated[str, Field(min_length=MIN_PASSWORD, max_length=1024,
                                pattern=r"^[^\x00]*$")]
ProjectId = Annotated[str, PathParam(pattern=PROJECT_ID, description="A project's ID.")]


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(pattern=USERNAME)
    email: str | None = Field(None, max_length=320, pattern=EMAIL)
    password: Password | None = Field(None, description="None: tokens only.")
    admin: StrictBool = False


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str | None = Field(None, max_length=320, pattern=EMAIL)
    password: Password | None = None
    admin: StrictBool | None = Field(None, description="Administrators only.")
    active: StrictBool | None = Field(None, description="Administrators only; false also revokes "
                                "every token.")
    success_emails: StrictBool | None = Field(
        None, description="false: no email when an upload succeeds (failures are always told).")


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field("token", min_length=1, max_length=200,
                       description="What it is for (a script, a scanner).")
    expires_in_days: json_int(1, 3650) | None = Field(  # type: ignore[valid-type]
        None, description="None: never expires.")


class NewProject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=PROJECT_ID, description="The project's ID (XNAT's characters).")
    name: Text | None = Field(None, max_length=200, description="Default: the ID.")
    description: Text = Field("", max_length=4000)
    settings: ProjectSettings = Field(default_factory=ProjectSettings)
    owners: list[Annotated[str, Field(pattern=USERNAME)]] = Field(
        default_factory=list, description="Users made its owners.")


class ProjectChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(None, min_length=1, max_length=200)
    description: Text | None = Field(None, max_length=4000)
    settings: ProjectSettings | None = Field(
        None, description="Settings to change; those not given stay as they are.")


class RoleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role


def user_view(user: User) -> dict[str, Any]:
    return {"username": user.username, "email": user.email, "admin": user.admin,
            "active": user.active, "has_password": user.password_hash is not None,
            "success_emails": user.success_emails,
            "created_at": user.created_at.isoformat()}


def token_view(token: ApiToken) -> dict[str, Any]:
    return {"id": token.id, "username": token.username, "name": token.name,
            "created_at": token.created_at, "expires_at": token.expires_at,
            "last_used_at": token.last_used_at, "revoked": token.revoked_at is not None}


def project_view(project: Project, members: list[Membership] | None = None) -> dict[str, Any]:
    view = {"id": project.id, "name": project.name, "description": project.description,
            "settings": project.settings, "created_at": project.created_at,
            "updated_at": project.updated_at}
    if members is not None:
        view["members"] = [{"username": m.username, "role": m.role} for m in members]
    return view


async def _publish_project(svc: Service, session: AsyncSession, project: Project) -> None:
    """Every change goes out as the project's whole state, so a consumer needs only the last."""
    owners = (await session.exec(select(User.username, User.email).join(
        Membership, col(Membership.username) == User.username).where(
        Membership.project == project.id, Membership.role == Role.owner.value).order_by(
        col(User.username)))).all()
    await svc.outbox.add(session, ProjectUpdated(
        project=project.id, name=project.name,
        settings=ProjectSettings.model_validate(project.settings),
        owners=[Contact(username=u, email=e) for u, e in owners], updated_at=project.updated_at))


async def _members_changed(svc: Service, session: AsyncSession, project: Project) -> None:
    """Its owners are part of a project's state (they are told when a session needs
    attention): a change of members is a change of the project."""
    await session.flush()
    project.updated_at = datetime.now(UTC)
    session.add(project)
    await _publish_project(svc, session, project)


def identity_router(svc: Service) -> APIRouter:
    api = APIRouter(prefix="/api/v1", responses=problem_responses(400, 401, 403, 404, 422))

    # --- the caller ------------------------------------------------------------------------------

    @api.get("/me", tags=["identity"], summary="Who I am, and my roles by project")
    async def me(caller: CallerDep) -> JSONResponse:
        return json_response({"username": caller.username, "email": caller.email, "admin": caller.admin,
                      "projects": {p: r.value for p, r in sorted(caller.roles.items())}})

    # --- users -----------------------------------------------------------------------------------

    @api.get("/users", tags=["identity"], summary="Every user (administrators)")
    async def list_users(_admin: AdminDep) -> JSONResponse:
        async with svc.db.session() as session:
            users = (await session.exec(select(User).order_by(col(User.username)))).all()
        return json_response([user_view(u) for u in users])

    @api.post("/users", tags=["identity"], status_code=201, summary="Add a user (administrators)",
              responses=problem_responses(409))
    async def add_user(body: NewUser, _admin: AdminDep) -> JSONResponse:
        async with svc.db.session() as session:
            if await session.get(User, body.username) is not None:
                return problem(409, "Conflict", f"User {body.username!r} exists.")
            user = User(username=body.username, email=body.email, admin=body.admin,
                        password_hash=hash_password(body.password) if body.password else None,
                        created_at=datetime.now(UTC))
            session.add(user)
        return json_response(user_view(user), 201)

    @api.get("/users/{username}", tags=["identity"], summary="A user (themself or an admin)")
    async def get_user(username: Username, caller: CallerDep) -> JSONResponse:
        _self_or_admin(caller, username)
        async with svc.db.session() as session:
            user = await session.get(User, username)
        if user is None:
            return problem(404, "Not Found", f"No user {username!r}.")
        return json_response(user_view(user))

    @api.patch("/users/{username}", tags=["identity"],
               summary="Change a user's email or password (themself or an admin); admin flag "
               "and deactivation (admins)")
    async def change_user(username: Username, body: UserChange, caller: CallerDep
                          ) -> JSONResponse:
        _self_or_admin(caller, username)
        if (body.admin is not None or body.active is not None) and not caller.admin:
            raise forbidden("Only an administrator may change 'admin' or 'active'.")
        if username == caller.username and (body.admin is False or body.active is False):
            # Another administrator does it, so that imgest is never left without one.
            raise forbidden("You may not take away your own administrator rights or account.")
        async with svc.db.session() as session:
            user = await session.get(User, username, with_for_update=True)
            if user is None:
                return problem(404, "Not Found", f"No user {username!r}.")
            if body.email is not None:
                user.email = body.email
            if body.password is not None:
                user.password_hash = hash_password(body.password)
            if body.admin is not None:
                user.admin = body.admin
            if body.success_emails is not None:
                user.success_emails = body.success_emails
            if body.active is not None:
                user.active = body.active
                if not body.active:
                    await session.execute(update(ApiToken).where(
                        col(ApiToken.username) == username, col(ApiToken.revoked_at).is_(None))
                        .values(revoked_at=datetime.now(UTC)))
            session.add(user)
        return json_response(user_view(user))

    # --- tokens ----------------------------------------------------------------------------------

    @api.post("/users/{username}/tokens", tags=["identity"], status_code=201,
              summary="Create an API token (shown this once)",
              responses={201: {"description": "The token (its secret in `token`, this once).",
                               "links": {"RevokeToken": {
                                   "operationId": "revoke_token",
                                   "parameters": {"username": "$response.body#/username",
                                                  "token_id": "$response.body#/id"}}}}})
    async def create_token(username: Username, caller: CallerDep,
                           body: Annotated[NewToken | None, Body()] = None) -> JSONResponse:
        _self_or_admin(caller, username)
        body = body or NewToken()
        expires = (datetime.now(UTC) + timedelta(days=body.expires_in_days)
                   if body.expires_in_days else None)
        async with svc.db.session() as session:
            user = await session.get(User, username)
            if user is None or not user.active:
                return problem(404, "Not Found", f"No active user {username!r}.")
            row, secret = await issue_token(session, username, body.name, expires)
        return json_response({**token_view(row), "token": secret}, 201)

    @api.get("/users/{username}/tokens", tags=["identity"], summary="A user's tokens (no secrets)")
    async def list_tokens(username: Username, caller: CallerDep) -> JSONResponse:
        _self_or_admin(caller, username)
        async with svc.db.session() as session:
            rows = (await session.exec(select(ApiToken).where(ApiToken.username == username)
                                       .order_by(col(ApiToken.created_at)))).all()
        return json_response([token_view(t) for t in rows])

    @api.delete("/users/{username}/tokens/{token_id}", tags=["identity"], status_code=204,
                summary="Revoke a token", operation_id="revoke_token")
    async def revoke_token(username: Username, caller: CallerDep,
                           token_id: Annotated[str, PathParam(max_length=32)]) -> Response:
        _self_or_admin(caller, username)
        async with svc.db.session() as session:
            row = await session.get(ApiToken, token_id, with_for_update=True)
            if row is None or row.username != username:
                return problem(404, "Not Found", f"User {username!r} has no token {token_id!r}.")
            row.revoked_at = row.revoked_at or datetime.now(UTC)
            session.add(row)
        return Response(status_code=204)

    # --- projects --------------------------------------------------------------------------------

    @api.get("/projects", tags=["projects"], summary="Projects I have a role in (admins: all)")
    async def list_projects(caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            rows = await visible_projects(session, caller)
        return json_response([{**project_view(p), "role": caller.roles.get(p.id)} for p in rows])

    @api.post("/projects", tags=["projects"], status_code=201,
              summary="Create a project (administrators)", responses=problem_responses(409))
    async def create_project(body: NewProject, _admin: AdminDep) -> JSONResponse:
        if body.id.lower() == UNASSIGNED.lower():
            return problem(409, "Reserved name", f"{UNASSIGNED!r} is where sessions without a "
                           "project go; it cannot be a project.")
        now = datetime.now(UTC)
        async with svc.db.session() as session:
            if await session.get(Project, body.id) is not None:
                return problem(409, "Conflict", f"Project {body.id!r} exists.")
            for owner in body.owners:
                if await session.get(User, owner) is None:
                    return problem(404, "Not Found", f"No user {owner!r} (to be an owner).")
            project = Project(id=body.id, name=body.name or body.id, description=body.description,
                              settings=body.settings.model_dump(mode="json"), created_at=now,
                              updated_at=now)
            session.add(project)
            members = [Membership(project=body.id, username=u, role=Role.owner.value)
                       for u in dict.fromkeys(body.owners)]
            session.add_all(members)
            await session.flush()
            await _publish_project(svc, session, project)
        return json_response(project_view(project, members), 201)

    @api.get("/projects/{project_id}", tags=["projects"], summary="A project, its settings and "
             "members")
    async def get_project(project_id: ProjectId, caller: CallerDep) -> JSONResponse:
        async with svc.db.session() as session:
            project = await visible_project(session, caller, project_id)
            members = (await session.exec(select(Membership).where(
                Membership.project == project_id).order_by(col(Membership.username)))).all()
        return json_response(project_view(project, list(members)))

    @api.patch("/projects/{project_id}", tags=["projects"],
               summary="Change a project's name, description or settings (owners, admins)")
    async def change_project(project_id: ProjectId, body: ProjectChange, caller: CallerDep
                             ) -> JSONResponse:
        _may_manage(caller, project_id)
        async with svc.db.session() as session:
            project = await session.get(Project, project_id, with_for_update=True)
            if project is None:
                return problem(404, "Not Found", f"No project {project_id!r}.")
            if body.settings is not None:
                project.settings = {**project.settings,
                                    **body.settings.model_dump(mode="json", exclude_unset=True)}
            if body.name is not None:
                project.name = body.name
            if body.description is not None:
                project.description = body.description
            project.updated_at = datetime.now(UTC)
            session.add(project)
            await _publish_project(svc, session, project)
        return json_response(project_view(project))

    @api.put("/projects/{project_id}/members/{username}", tags=["projects"],
             summary="Give a user a role in the project (owners, admins)")
    async def set_member(project_id: ProjectId, username: Username, body: RoleBody,
                         caller: CallerDep) -> JSONResponse:
        _may_manage(caller, project_id)
        async with svc.db.session() as session:
            project = await session.get(Project, project_id, with_for_update=True)
            if project is None:
                return problem(404, "Not Found", f"No project {project_id!r}.")
            if await session.get(User, username) is None:
                return problem(404, "Not Found", f"No user {username!r}.")
            row = await session.get(Membership, (project_id, username), with_for_update=True)
            row = row or Membership(project=project_id, username=username, role=body.role.value)
            row.role = body.role.value
            session.add(row)
            await _members_changed(svc, session, project)
        return json_response({"project": project_id, "username": username, "role": body.role.value})

    @api.delete("/projects/{project_id}/members/{username}", tags=["projects"], status_code=204,
                summary="Take a user's role in the project away (owners, admins)")
    async def remove_member(project_id: ProjectId, username: Username, caller: CallerDep
                            ) -> Response:
        _may_manage(caller, project_id)
        async with svc.db.session() as session:
            row = await session.get(Membership, (project_id, username))
            if row is None:
                return problem(404, "Not Found", f"{username!r} has no role in {project_id!r}.")
            await session.delete(row)
            project = await session.get(Project, project_id, with_for_update=True)
            assert project is not None
            await _members_changed(svc, session, project)
        return Response(status_code=204)

    return api


def _self_or_admin(caller: Caller, username: str) -> None:
    if caller.username != username and not caller.admin:
        raise forbidden("Only the user themself or an administrator may do this.")


def _may_manage(caller: Caller, project_id: str) -> None:
    if not caller.may(Action.manage, project_id):
        raise forbidden(f"Only an owner of {project_id!r} or an administrator may change it.")


async def visible_projects(session: AsyncSession, caller: Caller) -> list[Project]:
    """The projects the caller has a role in (an administrator: all), by ID."""
    query = select(Project).order_by(col(Project.id))
    if not caller.admin:
        query = query.where(col(Project.id).in_(list(caller.roles)))
    return list((await session.exec(query)).all())


async def visible_project(session: AsyncSession, caller: Caller, project_id: str) -> Project:
    from starlette.exceptions import HTTPException

    if not (caller.admin or project_id in caller.roles):
        raise forbidden(f"You have no role in project {project_id!r}.")
    project = await session.get(Project, project_id)
    if project is None:
        raise HTTPException(404, f"No project {project_id!r}.")
    return project
