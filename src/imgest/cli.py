"""The `imgest` command: run the embedded stack, upload files, and developers' chores."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from . import admin

app = typer.Typer(help="imgest: imaging ingestion (DICOM, slides, photos, manifests) into an "
                  "archive.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database chores for developers.", no_args_is_help=True)
app.add_typer(db_app, name="db")
dlq_app = typer.Typer(help="Dead letters: events that failed for good. List, show, replay.",
                      no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(admin.user_app, name="user")
app.add_typer(admin.token_app, name="token")
app.add_typer(admin.project_app, name="project")
bench_app = typer.Typer(help="Benchmark chores: make synthetic data (bench/compare.py runs the "
                        "benchmark itself).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
Bootstrap = Annotated[str, typer.Option(
    "--kafka-bootstrap", envvar="IMGEST_KAFKA_BOOTSTRAP", show_envvar=True,
    help="The broker (default: the one `imgest up` starts).")]

COLOUR = {"gateway": 36, "unpacker": 35, "metadata": 33, "importer": 32, "notifier": 34,
          "imgest": 1}


def _emitter(colour: bool):
    lock = threading.Lock()

    def emit(name: str, line: str) -> None:
        prefix = f"{name:<9}|"
        if colour:
            prefix = f"\x1b[{COLOUR.get(name, 0)}m{prefix}\x1b[0m"
        with lock:
            print(f"{prefix} {line}", flush=True)

    return emit


def _opt(env: str, help: str, **kw):
    return typer.Option(envvar=env, help=help, show_envvar=True, **kw)


class StopRequested:
    """Whether SIGINT or SIGTERM came, from the moment it is made; `forced` once another came
    a while after the first (a second Ctrl-C: kill what still runs). Flags, where a
    threading.Event's lock could hang the stop for ever: a second signal handled while the
    first handler held that lock waited on it in the same thread."""

    AGAIN_AFTER = 0.5  # a process group's kill and uv's passing it on arrive together: one stop

    def __init__(self) -> None:
        self.requested = self.forced = False
        self._first = 0.0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _sig: int, _frame: object) -> None:
        if not self.requested:
            self.requested, self._first = True, time.monotonic()
        elif time.monotonic() - self._first > self.AGAIN_AFTER:
            self.forced = True

    def wait(self, poll: float = 0.2) -> None:
        while not self.requested:
            time.sleep(poll)


@app.command()
def up(
    data_dir: Annotated[Path, _opt("IMGEST_DATA_DIR", "Where all state lives.")] = Path(".imgest"),
    gateway_port: Annotated[int, _opt("IMGEST_GATEWAY_PORT", "Gateway HTTP port.")] = 8080,
    host: Annotated[str, _opt("IMGEST_HTTP_HOST", "Address the services bind.")] = "127.0.0.1",
    tansu_port: Annotated[int, _opt("IMGEST_TANSU_PORT",
                                    "Port of the embedded Tansu broker.")] = 19092,
    kafka_bootstrap: Annotated[str | None, _opt(
        "IMGEST_KAFKA_BOOTSTRAP", "Use this Kafka instead of the embedded Tansu.")] = None,
    database_url: Annotated[str | None, _opt(
        "IMGEST_DATABASE_URL", "Use this PostgreSQL instead of the embedded one.")] = None,
    store: Annotated[str, _opt("IMGEST_STORE", "Object store: local or s3.")] = "local",
    s3_endpoint: Annotated[str | None, _opt("IMGEST_S3_ENDPOINT", "S3 host:port.")] = None,
    smtp_url: Annotated[str | None, _opt(
        "IMGEST_SMTP_URL", "Send mail through this server (else .eml files).")] = None,
    log_level: Annotated[str, _opt("IMGEST_LOG_LEVEL", "Service log level.")] = "INFO",
    colour: Annotated[bool, typer.Option(help="Colour the log prefixes.")] = sys.stdout.isatty(),
) -> None:
    """Start imgest on this machine, until Ctrl-C.

    PostgreSQL, a Kafka-compatible broker, a local object store and the five
    services. A second start on the same data directory picks up where the
    first stopped."""
    from .stack import CannotStart, Stack

    overrides = {"IMGEST_GATEWAY_PORT": str(gateway_port), "IMGEST_HTTP_HOST": host,
                 "IMGEST_STORE": store, "IMGEST_LOG_LEVEL": log_level,
                 "IMGEST_PUBLIC_URL": os.environ.get("IMGEST_PUBLIC_URL",
                                                     f"http://{host}:{gateway_port}")}
    for key, value in {"IMGEST_KAFKA_BOOTSTRAP": kafka_bootstrap,
                       "IMGEST_DATABASE_URL": database_url, "IMGEST_S3_ENDPOINT": s3_endpoint,
                       "IMGEST_SMTP_URL": smtp_url}.items():
        if value:
            overrides[key] = value
    emit = _emitter(colour)
    stack = Stack(data_dir, overrides, emit, tansu_port=tansu_port)
    stopping = StopRequested()
    try:
        try:
            stack.start()
        except CannotStart as e:
            emit("imgest", f"cannot start: {e}")
            raise typer.Exit(1) from None
        started = time.monotonic()
        while not stopping.requested:
            try:
                stack.wait_ready(timeout=1)
                break
            except TimeoutError:
                if time.monotonic() - started > 180:
                    emit("imgest", "services are not ready after 3 minutes; see the logs above")
                    break
        if not stopping.requested:
            url = f"http://{host}:{gateway_port}"
            mail = smtp_url or f"{(data_dir / 'mail').resolve()}/*.eml"
            emit("imgest", f"ready in {time.monotonic() - started:.1f}s. Gateway: {url}  "
                 f"(API docs {url}/docs)")
            token_file = (data_dir / "admin.token").resolve()
            emit("imgest", f"administrator's API token: {token_file}  (TOKEN=$(cat {token_file}))")
            emit("imgest", f"upload a file:   curl -H \"Authorization: Bearer $TOKEN\" "
                 f"-T scan.dcm '{url}/api/v1/uploads/scan.dcm?project=P'   (imgest project create P)")
            emit("imgest", f"see what became of it:   curl -H \"Authorization: Bearer $TOKEN\" "
                 f"{url}/api/v1/uploads/<id>   "
                 f"· emails: {mail}   · Ctrl-C stops")
        stopping.wait()
    finally:
        if stack.postgres or stack.supervisor:  # (not when refused before starting anything)
            emit("imgest", "stopping… (Ctrl-C again: kill what still runs)")
            stack.stop(hurry=lambda: stopping.forced)
            emit("imgest", "stopped")


@app.command()
def upload(
    paths: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False,
                                                help="Files to upload (DICOM, zip, photos).")],
    url: Annotated[str, _opt("IMGEST_PUBLIC_URL", "The gateway.")] = "http://127.0.0.1:8080",
    project: Annotated[str | None, typer.Option(help="Project to import into.")] = None,
    subject: Annotated[str | None, typer.Option(help="Subject label.")] = None,
    session: Annotated[str | None, typer.Option(help="Session label.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until each upload completes.")] = True,
    token: admin.Token = None,
) -> None:
    """Upload files through the gateway, with a progress bar, and show what became of them."""
    import httpx
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    params = {k: v for k, v in {"project": project, "subject": subject,
                                "session": session}.items() if v}
    ids: list[str] = []
    failed = False
    auth = {"Authorization": f"Bearer {admin.resolve_token(token)}"}
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=None),
                      headers=auth) as client, Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn()) as progress:
        for path in paths:
            task = progress.add_task(path.name, total=path.stat().st_size)

            def body(path: Path = path, task=task):
                with path.open("rb") as f:
                    while chunk := f.read(1024 * 1024):
                        progress.advance(task, len(chunk))
                        yield chunk

            response = client.post("/api/v1/uploads", params={"filename": path.name, **params},
                                   content=body(),
                                   headers={"Content-Length": str(path.stat().st_size)})
            if response.status_code != 201:
                progress.console.print(f"[red]{path}: {response.status_code} "
                                       f"{response.text}[/red]")
                failed = True
                continue
            ids.append(response.json()["id"])
            progress.console.print(f"{path.name}: upload {ids[-1]}")
        if wait:
            for upload_id in ids:
                while True:
                    state = client.get(f"/api/v1/uploads/{upload_id}").json()
                    if state["state"] not in ("processing", "received"):
                        break
                    time.sleep(0.3)
                progress.console.print(f"{upload_id}: [bold]{state['state']}[/bold] "
                                       f"{json.dumps(state['counts'])}")
                for f in state["files"]:
                    if f.get("reason"):
                        progress.console.print(f"  {f['path']}: {f['reason']['message']} "
                                               f"[dim]\\[{f['reason']['code']}][/dim]")
                failed |= state["state"] == "failed"
    raise typer.Exit(1 if failed else 0)


def _on_broker(coro, bootstrap: str):
    """Runs a broker conversation; an unreachable broker is a one-line error, not a trace."""
    import asyncio
    import logging

    from aiokafka.errors import KafkaConnectionError

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # we say it once, below

    try:
        return asyncio.run(coro)
    except KafkaConnectionError:
        typer.echo(f"cannot reach the broker at {bootstrap}: is imgest running? "
                   "(--kafka-bootstrap / IMGEST_KAFKA_BOOTSTRAP)", err=True)
        raise typer.Exit(2) from None


@dlq_app.command("list")
def dlq_list(kafka_bootstrap: Bootstrap = "127.0.0.1:19092",
             as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False
             ) -> None:
    """Every dead letter, oldest first, with its error."""
    from rich.console import Console
    from rich.table import Table

    from .dlq import dead_letters

    letters = _on_broker(dead_letters(kafka_bootstrap), kafka_bootstrap)
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(letter.summary()))
        return
    table = Table("id", "time", "service", "tries", "error", "replayed", title=f"{len(letters)} "
                  "dead letter(s)")
    for letter in letters:
        d = letter.summary()
        table.add_row(d["id"], d["time"], d["service"] or "", d["attempts"] or "",
                      d["error"][:80], "yes" if d["replayed"] else "")
    Console().print(table)


@dlq_app.command("show")
def dlq_show(ident: Annotated[str, typer.Argument(metavar="ID", help="topic:partition:offset")],
             kafka_bootstrap: Bootstrap = "127.0.0.1:19092") -> None:
    """One dead letter: its headers (error, attempts, origin) and the event."""
    from .dlq import dead_letters, pretty_value

    found = [d for d in _on_broker(dead_letters(kafka_bootstrap), kafka_bootstrap)
             if d.id == ident]
    if not found:
        typer.echo(f"no dead letter {ident}", err=True)
        raise typer.Exit(1)
    for name, value in sorted(found[0].headers.items()):
        typer.echo(f"{name}: {value}")
    typer.echo(pretty_value(found[0]))


@dlq_app.command("replay")
def dlq_replay(ids: Annotated[list[str] | None, typer.Argument(
                   metavar="[ID]...", help="Dead letters to replay.")] = None,
               all_: Annotated[bool, typer.Option("--all", help="Every one not yet replayed.")
                               ] = False,
               kafka_bootstrap: Bootstrap = "127.0.0.1:19092") -> None:
    """Publish dead letters again on the topic they came from (after fixing the cause)."""
    from .dlq import dead_letters, replay

    letters = _on_broker(dead_letters(kafka_bootstrap), kafka_bootstrap)
    chosen = [d for d in letters if (all_ and not d.replayed) or d.id in (ids or [])]
    unknown = set(ids or []) - {d.id for d in letters}
    if unknown:
        typer.echo(f"no such dead letter: {', '.join(sorted(unknown))}", err=True)
        raise typer.Exit(1)
    if not chosen:
        typer.echo("nothing to replay (name IDs, or --all)")
        return
    _on_broker(replay(kafka_bootstrap, chosen), kafka_bootstrap)
    for d in chosen:
        typer.echo(f"replayed {d.id} onto {d.origin}")


def _size(text: str) -> tuple[int, int]:
    from .benchgen import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@bench_app.command("gen")
def bench_gen(
    out: Annotated[Path, typer.Option(file_okay=False, help="Directory to write into.")],
    instances: Annotated[int, typer.Option(
        min=0, help="CT slices of the study (512×512 16-bit, ~525 KB each).")] = 1000,
    zipped: Annotated[bool, typer.Option("--zip/--no-zip", help="Also one zip of the study "
                                         "(stored: as large as its files).")] = False,
    photos: Annotated[int, typer.Option(min=0, help="JPEG photos with EXIF.")] = 10,
    photo_size: Annotated[str, typer.Option(help="Photos' size, WIDTHxHEIGHT.")] = "4032x3024",
    gps: Annotated[bool, typer.Option(help="GPS position in the photos' EXIF.")] = True,
    slides: Annotated[int, typer.Option(min=0, help="Pyramidal tiled slides.")] = 1,
    slide_size: Annotated[str, typer.Option(help="Slides' full size, WIDTHxHEIGHT.")
                          ] = "20000x15000",
    slide_format: Annotated[Literal["svs", "tiff"], typer.Option(
        help="svs (Aperio-like) or tiff (a generic pyramid, levels in SubIFDs).")] = "svs",
    slide_compression: Annotated[Literal["jpeg", "none"], typer.Option(
        help="The tiles' compression.")] = "jpeg",
    project: Annotated[str, typer.Option(help="Project in the study's routing hint.")] = "BENCH",
    subject: Annotated[str, typer.Option(help="Subject in the routing hint.")] = "SUBJ01",
    session: Annotated[str, typer.Option(help="Session in the routing hint.")] = "SESS01",
    seed: Annotated[int, typer.Option(help="The same seed writes the same bytes.")] = 0,
) -> None:
    """Make synthetic data for benchmarks under OUT.

    A DICOM CT study in dicom/ (one study, one series, `Project: P Subject: S
    Session: E` in Study Comments) and, with --zip, study.zip; JPEG photos with
    EXIF (camera, capture time, GPS) in photos/; tiled pyramidal slides
    (256×256 tiles, levels at 1/4, 1/16…) in slides/, written tile by tile."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .benchgen import generate

    sizes = _size(slide_size), _size(photo_size)
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn()) as progress:

        def task(what: str, total: int):
            ident = progress.add_task(what, total=total)
            return lambda n: progress.advance(ident, n)

        made = generate(out, instances=instances, zipped=zipped, photos=photos, slides=slides,
                        slide_size=sizes[0], slide_format=slide_format,
                        slide_compression=slide_compression, photo_size=sizes[1], gps=gps,
                        seed=seed, project=project, subject=subject, session=session,
                        progress=task)
    total = sum(p.stat().st_size for p in made)
    typer.echo(f"wrote {len(made)} files, {total / 1e6:.0f} MB, under {out}")


def _service_modules():
    import importlib

    from .stack import SERVICES

    return {name: (importlib.import_module(f"imgest_{name}.app"),
                   importlib.import_module(f"imgest_{name}.settings")) for name in SERVICES}


def asyncapi_document() -> dict:
    """One AsyncAPI document for the whole pipeline, from the services' own brokers."""
    from faststream.specification import AsyncAPI
    from imgest_runtime.service import VERSION

    brokers = [mod.bootstrap(st.Settings()).documented() for mod, st in _service_modules().values()]
    return AsyncAPI(*brokers, title="imgest", version=VERSION,
                    description="Every event imgest's services publish and consume. Payloads "
                    "are CloudEvents 1.0 (structured JSON); keys as contracts/README.").to_specification().to_jsonable()


ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_PATH = ROOT / "contracts" / "asyncapi.json"
README_PATH = ROOT / "README.md"
CONFIG_START, CONFIG_END = "<!-- config:start -->", "<!-- config:end -->"


def config_table() -> str:
    """Markdown table of every IMGEST_* variable, from the services' settings classes."""
    from imgest_runtime.settings import RuntimeSettings

    rows: dict[str, tuple[str, str, list[str]]] = {}
    for name, (_mod, st) in _service_modules().items():
        for field_name, info in st.Settings.model_fields.items():
            shared = field_name in RuntimeSettings.model_fields
            default = info.default
            shown = "—" if default is None else f"`{default}`"
            entry = rows.setdefault(field_name, (shown, info.description or "", []))
            if not shared:
                entry[2].append(name)
    lines = ["| Variable | Default | Used by | What it sets |", "|---|---|---|---|"]
    for field_name, (default, description, services) in rows.items():
        used = ", ".join(services) if services else "all"
        lines.append(f"| `IMGEST_{field_name.upper()}` | {default} | {used} | {description} |")
    return "\n".join(lines)


def readme_with_config(text: str) -> str:
    head, rest = text.split(CONFIG_START, 1)
    _, tail = rest.split(CONFIG_END, 1)
    return f"{head}{CONFIG_START}\n{config_table()}\n{CONFIG_END}{tail}"


@app.command("docs")
def write_docs() -> None:
    """Regenerate what is generated and checked in.

    The JSON Schemas, the AsyncAPI document and the README's configuration
    table."""
    from imgest_contracts.schemas import write

    for path in write():
        typer.echo(f"wrote {path}")
    ASYNCAPI_PATH.write_text(json.dumps(asyncapi_document(), indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {ASYNCAPI_PATH}")
    README_PATH.write_text(readme_with_config(README_PATH.read_text()))
    typer.echo(f"wrote the configuration table in {README_PATH}")


@db_app.command("revision")
def db_revision(service: Annotated[str, typer.Argument(help="gateway, importer, …")],
                message: Annotated[str, typer.Option("-m", "--message")] = "change") -> None:
    """Autogenerate a migration for SERVICE against a throwaway embedded PostgreSQL."""
    import tempfile

    from imgest_runtime.db import migrate, revision

    from .infra import Postgres

    mod, st = _service_modules()[service]
    svc = mod.bootstrap(st.Settings())
    with tempfile.TemporaryDirectory() as tmp:
        pg = Postgres(Path(tmp) / "pg")
        url = pg.start()
        try:
            migrate(url, svc.metadata, svc.versions_dir)
            revision(url, svc.metadata, svc.versions_dir, message)
        finally:
            pg.stop()


def main() -> None:
    app()
