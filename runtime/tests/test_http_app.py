"""The HTTP app every service builds (imgest_runtime.service.create_app)."""

from __future__ import annotations

import fastapi.routing
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from imgest_runtime.service import warm_routes


def test_routes_are_built_before_the_first_request(monkeypatch):
    """FastAPI builds an included router's routes on their first match (0.1-0.2 s for the
    gateway's, in each worker's first request); `warm_routes`, run as the app starts, builds
    them all, so a request builds none. (Should a FastAPI to come no longer have this
    builder, the test fails here: then see whether warm_routes is still needed.)"""
    context = fastapi.routing._EffectiveRouteContext
    built: list[str] = []
    original = context.from_api_route.__func__

    def counting(cls, *, original_route, **kwargs):
        built.append(original_route.path)
        return original(cls, original_route=original_route, **kwargs)

    monkeypatch.setattr(context, "from_api_route", classmethod(counting))

    def app() -> FastAPI:
        inner, outer = APIRouter(), APIRouter()
        for i in range(20):
            inner.add_api_route(f"/item{i}", lambda: {"ok": True}, methods=["GET"])
        outer.include_router(inner, prefix="/inner")
        made = FastAPI()
        made.include_router(outer, prefix="/api")
        return made

    cold = app()
    assert TestClient(cold).get("/api/inner/item19").json() == {"ok": True}
    assert len(built) == 20  # what the first request built, without warm_routes

    built.clear()
    warm = app()
    warm_routes(warm)
    assert len(built) == 20
    built.clear()
    client = TestClient(warm)
    assert client.get("/api/inner/item19").json() == {"ok": True}
    assert client.get("/api/nowhere").status_code == 404
    assert built == []
