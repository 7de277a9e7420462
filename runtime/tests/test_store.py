"""The object store port, against both adapters: LocalStore and S3Store (moto's S3 over HTTP)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hashlib
import io
import itertools
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from imgest_runtime.settings import RuntimeSettings
from imgest_runtime.store import (
    CHUNK,
    DIRECT_ALIGN,
    DIRECT_BUFFER,
    DIRECT_FROM,
    MAX_NAME,
    MIN_PART,
    InvalidKey,
    IterReader,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StoredObject,
    StoreError,
    _DirectReader,
    _DirectWriter,
    _FullReads,
    _SpareBuffers,
    check_key,
    each_side_by_side,
    fit_name,
    open_store,
    part_size_for,
    pieces,
    put_async,
    spare_buffer,
)

MiB = 1024 * 1024
BIG = os.urandom(12 * MiB + 12345)  # not a multiple of any chunk or part size
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- fixtures ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(moto_endpoint: str) -> S3Store:
    store = S3Store(endpoint=moto_endpoint, access_key="test", secret_key="test",
                    bucket="imgest-test", secure=False, region="us-east-1")
    store.ensure_bucket()
    store.ensure_bucket()  # a second time is a no-op
    return store


class Scoped:
    """A store and a prefix of its own, so tests sharing the moto bucket do not see each other."""

    def __init__(self, store: ObjectStore, ns: str):
        self.store = store
        self.ns = ns

    def k(self, name: str) -> str:
        return f"{self.ns}/{name}"


@pytest.fixture(params=["local", "s3"])
def st(request: pytest.FixtureRequest, tmp_path: Path) -> Scoped:
    ns = f"t-{uuid.uuid4().hex[:12]}"
    if request.param == "local":
        return Scoped(LocalStore(tmp_path / "store", fsync=False), ns)
    return Scoped(request.getfixturevalue("s3"), ns)


def put_bytes(store: ObjectStore, key: str, data: bytes, length: int | None = -1) -> StoredObject:
    return store.put(key, io.BytesIO(data), len(data) if length == -1 else length)


# --- round trips ---------------------------------------------------------------------------------


def test_put_stat_read_range_open(st: Scoped) -> None:
    store, key = st.store, st.k("a/b/hello.bin")
    data = bytes(range(256)) * 40
    stored = put_bytes(store, key, data)
    assert stored == StoredObject(key, len(data), sha(data))

    info = store.stat(key)
    assert info is not None and info.key == key and info.size == len(data)

    assert store.read_range(key, 0, 8) == data[:8]
    assert store.read_range(key, 1000, 300) == data[1000:1300]
    assert store.read_range(key, len(data) - 5, 100) == data[-5:]  # fewer at the end
    assert store.read_range(key, len(data), 10) == b""  # from the end: nothing
    assert store.read_range(key, len(data) + 100, 10) == b""
    assert store.read_range(key, 0, 0) == b""

    with store.open(key) as f:
        assert f.read(10) == data[:10]
        assert f.read() == data[10:]
        assert f.read() == b""


def test_put_empty_object(st: Scoped) -> None:
    key = st.k("empty")
    assert put_bytes(st.store, key, b"") == StoredObject(key, 0, sha(b""))
    assert st.store.stat(key) == StoredObject(key, 0)
    assert st.store.read_range(key, 0, 10) == b""
    assert list(st.store.iter_chunks(key)) == []


def test_put_replaces(st: Scoped) -> None:
    key = st.k("x")
    put_bytes(st.store, key, b"first version, longer")
    put_bytes(st.store, key, b"second")
    with st.store.open(key) as f:
        assert f.read() == b"second"
    assert st.store.stat(key).size == 6  # type: ignore[union-attr]


def test_big_known_length_iter_chunks(st: Scoped) -> None:
    key = st.k("big-known.bin")
    stored = put_bytes(st.store, key, BIG)
    assert (stored.size, stored.sha256) == (len(BIG), BIG_SHA)
    chunks = list(st.store.iter_chunks(key))
    assert all(0 < len(c) <= CHUNK for c in chunks)
    assert sha(b"".join(chunks)) == BIG_SHA
    small = list(st.store.iter_chunks(key, chunk=3 * MiB))
    assert max(len(c) for c in small) <= 3 * MiB
    assert sha(b"".join(small)) == BIG_SHA
    if isinstance(st.store, S3Store):  # a known length over 5 MiB goes up in parts
        etag = st.store.client.stat_object(st.store.bucket, key).etag
        assert etag.endswith("-3"), etag  # 12 MiB in 5 MiB parts


def test_big_unknown_length(st: Scoped) -> None:
    key = st.k("big-unknown.bin")
    stored = st.store.put(key, IterReader(BIG[i:i + 777_777] for i in range(0, len(BIG), 777_777)))
    assert (stored.size, stored.sha256) == (len(BIG), BIG_SHA)
    assert st.store.stat(key).size == len(BIG)  # type: ignore[union-attr]
    assert sha(b"".join(st.store.iter_chunks(key))) == BIG_SHA
    assert st.store.read_range(key, 7 * MiB, 10) == BIG[7 * MiB:7 * MiB + 10]


def test_s3_unknown_length_past_one_part_is_multipart(s3: S3Store) -> None:
    # With length=None minio buffers parts of part_size_for(None) = 64 MiB; 12 MiB goes up in a
    # single PUT, so only a stream longer than 64 MiB takes the multipart path.
    key = f"mp-{uuid.uuid4().hex[:8]}/unknown.bin"
    block = os.urandom(MiB)
    tail = b"tail" * 1000
    blocks = 64
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)
    digest.update(tail)
    stored = s3.put(key, IterReader(iter([block] * blocks + [tail])))
    assert stored == StoredObject(key, blocks * MiB + len(tail), digest.hexdigest())
    assert s3.client.stat_object(s3.bucket, key).etag.endswith("-2")
    assert s3.read_range(key, blocks * MiB, 10_000) == tail
    s3.delete(key)


def test_part_size_for() -> None:
    assert part_size_for(None) == 64 * MiB
    assert part_size_for(-1) == 64 * MiB
    assert part_size_for(0) == MIN_PART
    assert part_size_for(12 * MiB) == MIN_PART
    size = part_size_for(100 * 1024**3)  # 100 GiB must fit in 10,000 parts
    assert size % MiB == 0 and size * 10_000 >= 100 * 1024**3 and size > MIN_PART
    assert (size - MiB) * 10_000 < 100 * 1024**3  # and is the smallest such


# --- copy, move, delete, list --------------------------------------------------------------------


def test_copy(st: Scoped) -> None:
    src, dst = st.k("src/one.dcm"), st.k("dst/deep/one.dcm")
    put_bytes(st.store, src, b"payload")
    put_bytes(st.store, dst, b"old content to be replaced")
    st.store.copy(src, dst)
    assert st.store.read_range(dst, 0, 100) == b"payload"
    assert st.store.read_range(src, 0, 100) == b"payload"  # the source stays


def test_a_copy_keeps_its_bytes_when_the_source_is_written_again_or_deleted(st: Scoped
                                                                            ) -> None:
    src, dst = st.k("staging/a.dcm"), st.k("archive/a.dcm")
    put_bytes(st.store, src, b"first")
    st.store.copy(src, dst)  # (a hard link on a local disk)
    put_bytes(st.store, src, b"second, longer")
    assert st.store.read_range(dst, 0, 100) == b"first"
    st.store.delete(src)
    assert st.store.read_range(dst, 0, 100) == b"first"


def test_copy_missing_source(st: Scoped) -> None:
    with pytest.raises(ObjectNotFound):
        st.store.copy(st.k("nope"), st.k("dst"))
    assert st.store.stat(st.k("dst")) is None


def test_copy_all_copies_what_is_missing_and_replaces_what_it_must(st: Scoped) -> None:
    store = st.store
    for n in range(20):
        put_bytes(store, st.k(f"staging/{n}.dcm"), f"new {n}".encode())
    put_bytes(store, st.k("archive/0.dcm"), b"kept")
    put_bytes(store, st.k("archive/1.dcm"), b"replaced")
    store.copy_all([(st.k(f"staging/{n}.dcm"), st.k(f"archive/{n}.dcm"), n == 1)
                    for n in range(20)])
    assert store.read_range(st.k("archive/0.dcm"), 0, 100) == b"kept"
    assert store.read_range(st.k("archive/1.dcm"), 0, 100) == b"new 1"
    assert all(store.read_range(st.k(f"archive/{n}.dcm"), 0, 100) == f"new {n}".encode()
               for n in range(2, 20))
    with pytest.raises(ObjectNotFound):
        store.copy_all([(st.k("staging/0.dcm"), st.k("other/0.dcm"), False),
                        (st.k("staging/gone.dcm"), st.k("other/gone.dcm"), False)])


def test_move_is_idempotent(st: Scoped) -> None:
    src, dst = st.k("staging/f.bin"), st.k("archive/P/S/E/f.bin")
    put_bytes(st.store, src, b"moved bytes")
    st.store.move(src, dst)
    assert st.store.stat(src) is None
    assert st.store.read_range(dst, 0, 100) == b"moved bytes"
    st.store.move(src, dst)  # a redelivery: already done, not an error
    assert st.store.read_range(dst, 0, 100) == b"moved bytes"
    with pytest.raises(ObjectNotFound):
        st.store.move(st.k("never/was"), st.k("nor/is"))


def test_move_replaces_destination(st: Scoped) -> None:
    src, dst = st.k("a"), st.k("b")
    put_bytes(st.store, src, b"new")
    put_bytes(st.store, dst, b"old old")
    st.store.move(src, dst)
    assert st.store.read_range(dst, 0, 100) == b"new" and st.store.stat(src) is None


def test_delete(st: Scoped) -> None:
    key = st.k("gone")
    put_bytes(st.store, key, b"x")
    st.store.delete(key)
    assert st.store.stat(key) is None
    st.store.delete(key)  # already gone: no error
    st.store.delete(st.k("never/existed"))


def test_list_and_delete_prefix(st: Scoped) -> None:
    names = ["up1/members/a/1.dcm", "up1/members/b/2.dcm", "up1/members/b/3.dcm",
             "up1/objects/x.zip", "up10/objects/y.zip", "up2/objects/z.zip"]
    for i, name in enumerate(names):
        put_bytes(st.store, st.k(name), b"z" * (i + 1))

    def listed(prefix: str) -> list[tuple[str, int]]:
        return sorted((o.key, o.size) for o in st.store.list(st.k(prefix)))

    assert listed("up1/members/") == [(st.k(n), i + 1) for i, n in enumerate(names[:3])]
    assert [k for k, _ in listed("up1/")] == [st.k(n) for n in names[:4]]
    assert [k for k, _ in listed("up1/members/b/2")] == [st.k(names[1])]
    assert listed("nothing/here/") == []
    assert len(listed("")) == len(names)

    assert st.store.delete_prefix(st.k("up1/members/")) == 3
    assert listed("up1/members/") == []
    assert [k for k, _ in listed("")] == [st.k(n) for n in names[3:]]
    assert st.store.delete_prefix(st.k("up1/members/")) == 0


def test_local_delete_prefix_leaves_no_empty_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for key in ("staging/u1/a1/1.dcm", "staging/u1/b2/2.dcm", "staging/u2/c3/3.dcm"):
        put_bytes(store, key, b"x")
    assert store.delete_prefix("staging/u1/") == 2
    assert not (tmp_path / "staging" / "u1").exists()
    assert [o.key for o in store.list("staging/")] == ["staging/u2/c3/3.dcm"]
    assert store.delete_prefix("staging/u1/") == 0  # again: nothing, and no error


def test_local_delete_prefix_removes_what_killed_writers_left(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    put_bytes(store, "staging/u1/members/1.dcm", b"x")
    (tmp_path / "staging" / "u1" / "members" / f".{'0' * 32}.part").write_bytes(b"half")
    (tmp_path / "staging" / "u1" / f".{'a' * 32}.part").write_bytes(b"half")
    assert store.delete_prefix("staging/u1/") == 1
    assert not (tmp_path / "staging" / "u1").exists()


def test_local_stale_temporaries_are_swept(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path, fsync=False)
    put_bytes(store, "archive/p/s/1.dcm", b"x")
    put_bytes(store, "archive/p/s/.notes.part", b"a user's file, so named")
    stale = tmp_path / "archive" / "p" / "s" / f".{'0123abcd' * 4}.part"
    stale.write_bytes(b"half")
    assert store.remove_stale_temporaries(3600) == 0  # (its writer may still be at it)
    assert stale.exists()
    later = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.remove_stale_temporaries(3600) == 1
    assert not stale.exists()
    assert [o.key for o in store.list("")] == ["archive/p/s/.notes.part", "archive/p/s/1.dcm"]


@pytest.mark.parametrize("st", [
    "local",
    "s3",
], indirect=True)
def test_list_prefix_is_a_string_prefix(st: Scoped) -> None:
    for name in ("up1/a", "up10/b", "up1x", "up2/c"):
        put_bytes(st.store, st.k(name), b"z")
    assert sorted(o.key for o in st.store.list(st.k("up1"))) == \
        [st.k("up1/a"), st.k("up10/b"), st.k("up1x")]


def test_list_skips_local_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    put_bytes(store, "d/real.bin", b"1")
    (tmp_path / "d" / f".{'f' * 32}.part").write_bytes(b"half")
    assert [o.key for o in store.list("d/")] == ["d/real.bin"]


def test_local_put_failure_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=True)

    def broken() -> Iterator[bytes]:
        yield b"a" * 100
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put("d/f.bin", IterReader(broken()))
    assert [p.name for p in (tmp_path / "d").iterdir()] == []
    assert store.stat("d/f.bin") is None


# --- missing objects, bad keys -------------------------------------------------------------------


def test_missing_objects(st: Scoped) -> None:
    key = st.k("missing/obj")
    assert st.store.stat(key) is None
    with pytest.raises(ObjectNotFound):
        st.store.open(key)
    with pytest.raises(ObjectNotFound):
        st.store.read_range(key, 0, 10)
    with pytest.raises(ObjectNotFound):
        list(st.store.iter_chunks(key))
    assert issubclass(ObjectNotFound, StoreError)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "", "a//b", "./a", "a/.", "a/",
                                 "a\x00b"])
def test_check_key_refuses(key: str) -> None:
    with pytest.raises(InvalidKey):
        check_key(key)


@pytest.mark.parametrize("key", ["a", "a/b/c.dcm", "staging/u1/members/abc/IM 1.dcm", "..a/b..",
                                 ".hidden/x"])
def test_check_key_accepts(key: str) -> None:
    assert check_key(key) == key


def test_local_refuses_bad_keys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", fsync=False)
    for key in ("../x", "/abs", ""):
        with pytest.raises(InvalidKey):
            put_bytes(store, key, b"evil")
        with pytest.raises(InvalidKey):
            store.open(key)
        with pytest.raises(InvalidKey):
            store.stat(key)
        with pytest.raises(InvalidKey):
            store.delete(key)
        with pytest.raises(InvalidKey):
            store.read_range(key, 0, 1)
    put_bytes(store, "ok", b"fine")
    with pytest.raises(InvalidKey):
        store.copy("ok", "../escaped")
    with pytest.raises(InvalidKey):
        store.move("ok", "/abs")
    assert not (tmp_path / "x").exists() and not (tmp_path / "escaped").exists()


def test_s3_refuses_bad_keys_with_a_store_error(s3: S3Store) -> None:
    # whatever its class, a bad key never reaches S3
    for key in ("../x", "/abs", ""):
        with pytest.raises(StoreError):
            put_bytes(s3, key, b"evil")
        with pytest.raises(StoreError):
            s3.open(key)
        with pytest.raises(StoreError):
            s3.read_range(key, 0, 1)
    assert [o.key for o in s3.list("..")] == []


@pytest.mark.parametrize("op", ["put", "open", "read_range", "stat", "delete"])
def test_s3_bad_keys_raise_invalid_key(s3: S3Store, op: str) -> None:
    calls = {"put": lambda: put_bytes(s3, "../x", b"evil"), "open": lambda: s3.open("../x"),
             "read_range": lambda: s3.read_range("../x", 0, 1), "stat": lambda: s3.stat("../x"),
             "delete": lambda: s3.delete("../x")}
    with pytest.raises(InvalidKey):
        calls[op]()


def test_local_list_stays_inside_root(tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_bytes(b"secret")
    store = LocalStore(tmp_path / "root", fsync=False)
    put_bytes(store, "inside", b"x")
    try:
        listed = [o.key for o in store.list("../")]
    except InvalidKey:
        return
    assert listed == []


# --- put_async -----------------------------------------------------------------------------------


async def _agen(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i:i + step]
        if i % (step * 16) == 0:
            await asyncio.sleep(0)


async def test_put_async(st: Scoped) -> None:
    key = st.k("async/big.bin")
    stored = await put_async(st.store, key, _agen(BIG, 64 * 1024))
    assert stored == StoredObject(key, len(BIG), BIG_SHA)
    assert st.store.stat(key).size == len(BIG)  # type: ignore[union-attr]
    assert sha(b"".join(st.store.iter_chunks(key))) == BIG_SHA


async def test_put_async_small_and_known_length(st: Scoped) -> None:
    key = st.k("async/small.bin")
    data = b"hello async world"
    stored = await put_async(st.store, key, _agen(data, 5), length=len(data))
    assert stored == StoredObject(key, len(data), sha(data))
    assert st.store.read_range(key, 0, 100) == data


async def test_put_async_empty(st: Scoped) -> None:
    key = st.k("async/empty")
    stored = await put_async(st.store, key, _agen(b"", 1))
    assert stored == StoredObject(key, 0, sha(b""))
    assert st.store.stat(key) == StoredObject(key, 0)


async def test_put_async_interrupted_stream_leaves_nothing(st: Scoped) -> None:
    key = st.k("async/broken.bin")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (3 * MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await put_async(st.store, key, broken())
    assert st.store.stat(key) is None
    assert list(st.store.list(st.ns)) == []
    if isinstance(st.store, LocalStore):
        assert list(st.store.root.rglob("*.part")) == []


async def test_put_async_bad_key(st: Scoped) -> None:
    with pytest.raises(StoreError):
        await put_async(st.store, "../evil", _agen(b"x" * (3 * MiB), 64 * 1024))


# --- IterReader ----------------------------------------------------------------------------------


def test_iter_reader_reads_across_chunks() -> None:
    r = IterReader(iter([b"abc", b"defg", b"h"]))
    assert r.readable()
    assert r.read(2) == b"ab"
    assert r.read(2) == b"c"  # at most what one chunk still holds
    assert r.read(10) == b"defg"
    assert r.read() == b"h"
    assert r.read() == b"" and r.read(5) == b""


def test_full_reads_fill_each_read_unless_the_source_ends() -> None:
    # What S3Store.put gives minio, which gathers a part by adding read to read.
    r = _FullReads(IterReader(iter([b"abc", b"defg", b"h"])))
    assert r.read(5) == b"abcde"
    assert r.read(10) == b"fgh"
    assert r.read(3) == b""


def test_iter_reader_readall_and_buffered() -> None:
    parts = [os.urandom(n) for n in (1, 1000, 65536, 3, 200_000)]
    assert IterReader(iter(parts)).readall() == b"".join(parts)
    assert io.BufferedReader(IterReader(iter(parts))).read() == b"".join(parts)
    buf = bytearray(7)
    r = IterReader(iter([b"0123456789"]))
    assert r.readinto(buf) == 7 and bytes(buf) == b"0123456"
    assert r.readinto(buf) == 3 and bytes(buf[:3]) == b"789"
    assert r.readinto(buf) == 0


def test_iter_reader_from_generator_into_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    gen = (bytes([i]) * 100_000 for i in range(30))
    stored = store.put("g", IterReader(gen))
    expected = b"".join(bytes([i]) * 100_000 for i in range(30))
    assert stored == StoredObject("g", len(expected), sha(expected))


def test_iter_reader_skips_empty_chunks() -> None:
    assert IterReader(iter([b"abc", b"", b"def"])).readall() == b"abcdef"


def test_a_name_as_long_as_a_name_can_be_round_trips(st: Scoped) -> None:
    """255 bytes is every local file system's limit for one name; the temporary file an object
    is written to first must not be longer than the object's own name (it once was: a 500)."""
    fitted = fit_name("é" * 126 + ".dcm")  # 256 bytes: one too many
    assert len(fitted.encode()) == MAX_NAME - 1 and fitted == "é" * 125 + ".dcm"
    fitted += "x"  # exactly 255 bytes
    key = st.k(f"long/{fitted}")
    assert put_bytes(st.store, key, b"data").size == 4
    st.store.copy(key, st.k(f"copy/{fitted}"))
    assert st.store.read_range(st.k(f"copy/{fitted}"), 0, 10) == b"data"


def test_a_key_part_longer_than_a_name_is_refused() -> None:
    check_key("a/" + "x" * MAX_NAME)
    with pytest.raises(InvalidKey, match="longer than 255 bytes"):
        check_key("a/" + "x" * (MAX_NAME + 1))


@pytest.mark.parametrize(("name", "expected"), [
    ("short.dcm", "short.dcm"),
    ("a" * 300 + ".dcm", "a" * 251 + ".dcm"),
    ("é" * 200, "é" * 127),  # never half a character
    ("x." + "y" * 300, "x." + "y" * 253),  # an "extension" past 32 bytes is no extension
])
def test_fit_name(name: str, expected: str) -> None:
    assert fit_name(name) == expected


@pytest.mark.parametrize("sizes", [
    [MIN_PART, MIN_PART, 1234],  # parts S3 can compose server-side
    [1000, MIN_PART + 1, 17],  # a short one first: streamed through instead
    [4321],
])
def test_concat(st: Scoped, sizes: list[int]) -> None:
    """A resumable upload's segments become one object, in order."""
    store = st.store
    parts = [os.urandom(n) for n in sizes]
    keys = [st.k(f"seg/{i:03d}") for i in range(len(parts))]
    for key, data in zip(keys, parts):
        put_bytes(store, key, data)
    whole = b"".join(parts)
    stored = store.concat(keys, st.k("whole.bin"))
    assert stored.size == len(whole)
    assert store.read_range(st.k("whole.bin"), 0, len(whole) + 1) == whole
    assert all(store.stat(k) is not None for k in keys)  # the caller deletes the segments


def test_local_store_writes_in_place_and_keeps_what_lies_past(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")  # with fsync, as it runs
    assert store.writes_in_place and not S3Store.writes_in_place
    assert store.write_at("tus/x/data", 0, io.BytesIO(b"aaaa")).size == 4
    assert store.write_at("tus/x/data", 4, io.BytesIO(b"bbbbbb")).size == 6
    # A resume at 6 writes over a broken-off draft; what lies past it stays until then.
    assert store.write_at("tus/x/data", 6, io.BytesIO(b"C")).size == 1
    assert store.read_range("tus/x/data", 0, 100) == b"aaaabbCbbb"
    store.write_at("tus/x/data", 7, io.BytesIO(b"DDD"))
    store.move("tus/x/data", "staging/u/file")
    assert store.read_range("staging/u/file", 0, 100) == b"aaaabbCDDD"
    assert store.stat("tus/x/data") is None


def test_unpacked_members_made_durable_later(st: Scoped) -> None:
    stored = st.store.put(st.k("m"), io.BytesIO(b"member"), durable=False)
    st.store.make_durable(st.k("m"))  # an fsync on the local store; nothing to do on S3
    assert stored.size == 6 and st.store.read_range(st.k("m"), 0, 10) == b"member"


def test_many_objects_are_made_durable_with_one_syncfs_unless_much_is_unwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A form's files or an archive's members: one syncfs (one journal commit) for them all,
    on the store's directory opened before they were written (so that it is told of their
    write-back errors), unless the machine has much else waiting to be written, which a syncfs
    would wait for too: then an fsync each. A failed syncfs is an error."""
    import ctypes
    import errno

    from imgest_runtime import store as store_module

    store = LocalStore(tmp_path / "store")
    keys = [f"staging/u/{i}" for i in range(3)]
    real_syncfs, real_fsync = store_module._syncfs(), os.fsync
    if real_syncfs is not None:  # Linux 5.8 or later: the real calls, on the store
        assert store_module._unwritten_bytes() is not None
        with store.durable_batch() as batch:
            for key in keys:
                store.put(key, io.BytesIO(key.encode()), durable=False)
            batch.make_durable(keys)
    calls: list[tuple[str, int]] = []
    result = [0]

    def syncfs(fd: int) -> int:
        calls.append(("syncfs", fd))
        if result[0]:
            ctypes.set_errno(errno.EIO)
        return result[0] or (real_syncfs(fd) if real_syncfs else 0)

    monkeypatch.setattr(store_module, "_syncfs", lambda: syncfs)
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", fd)), real_fsync(fd))[1])
    unwritten = [0]
    monkeypatch.setattr(store_module, "_unwritten_bytes", lambda: unwritten[0])

    with store.durable_batch() as batch:
        opened = batch.fd  # type: ignore[attr-defined]
        assert opened is not None and os.path.samestat(os.fstat(opened), os.stat(store.root))
        for key in keys:
            store.put(key, io.BytesIO(key.encode()), durable=False)
        batch.make_durable(keys)
        assert calls == [("syncfs", opened)]  # the descriptor from before the writes
        calls.clear()
        batch.make_durable(keys[:1])  # one file: its own fsync
        assert [c for c, _ in calls] == ["fsync"]
        calls.clear()
        unwritten[0] = store_module.SYNCFS_UNWRITTEN_MAX + 1
        batch.make_durable(keys)
        assert [c for c, _ in calls] == ["fsync"] * 3
        calls.clear()
        unwritten[0], result[0] = 0, -1
        with pytest.raises(OSError, match="syncfs of the store") as failed:
            batch.make_durable(keys)
        assert failed.value.errno == errno.EIO
    assert batch.fd is None  # type: ignore[attr-defined]
    calls.clear()
    with LocalStore(tmp_path / "nosync", fsync=False).durable_batch() as batch:
        batch.make_durable(keys)  # a store without durability (tests) asks nothing of the disk
    assert calls == []


class _Flaky(LocalStore):
    """A local store whose puts of some keys fail, or take their time."""

    def __init__(self, root: Path, fail: dict[str, BaseException], slow: float = 0.0):
        super().__init__(root, fsync=False)
        self.fail, self.slow = fail, slow

    def put(self, key, data, length=None, *, durable=True):  # type: ignore[no-untyped-def]
        if self.slow:
            import time

            time.sleep(self.slow)
        if key in self.fail:
            raise self.fail[key]
        return super().put(key, data, length, durable=durable)


async def test_small_objects_are_written_by_one_thread_each_with_its_outcome(
        tmp_path: Path) -> None:
    """Each object's own outcome: a store error fails that object only; more objects than
    the queue holds wait their turn (nothing dropped)."""
    from imgest_runtime.store import SmallObjects

    store = _Flaky(tmp_path, {"s/bad": StoreError("disk on fire")})
    small = SmallObjects(store, depth=1)
    for i in range(5):
        await small.put(f"s/{i}", [b"ab", str(i).encode()])
    await small.put("s/bad", [b"x"])
    written = await small.finish()
    assert isinstance(written["s/bad"], StoreError)
    for i in range(5):
        assert written[f"s/{i}"].size == 3  # type: ignore[union-attr]
        assert store.read_range(f"s/{i}", 0, 10) == b"ab" + str(i).encode()
    assert await small.finish() is written  # again: nothing more to wait for


async def test_small_objects_writer_dying_is_told_and_a_cancelled_finish_can_wait_again(
        tmp_path: Path) -> None:
    """A writer that dies of something else than a store error is an error of the form (at
    the next put, not only at the end); a finish cancelled midway leaves the writer going, and
    a second finish waits for it, so that what it wrote can be deleted."""
    from imgest_runtime.store import SmallObjects

    dying = SmallObjects(_Flaky(tmp_path / "a", {"s/0": RuntimeError("a bug")}))
    await dying.put("s/0", [b"x"])
    await asyncio.sleep(0.2)
    with pytest.raises(RuntimeError, match="a bug"):
        await dying.put("s/1", [b"y"])

    slow = SmallObjects(_Flaky(tmp_path / "b", {}, slow=0.2))
    for i in range(3):
        await slow.put(f"s/{i}", [b"z"])
    finishing = asyncio.create_task(slow.finish())
    await asyncio.sleep(0.1)
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    written = await slow.finish()
    assert sorted(written) == ["s/0", "s/1", "s/2"]
    assert slow.threads is not None and slow.threads.done()


async def test_write_at_async_streams_chunks(tmp_path: Path) -> None:
    from imgest_runtime.store import write_at_async

    store = LocalStore(tmp_path / "store", fsync=False)

    async def chunks():
        for part in (b"12", b"34", b"5"):
            yield part

    with pytest.raises(FileNotFoundError):  # past 0 the object must be there: never zeros
        await write_at_async(store, "f", 3, chunks())
    store.write_at("f", 0, io.BytesIO(b"abc"))
    assert (await write_at_async(store, "f", 3, chunks())).size == 5
    assert store.read_range("f", 0, 10) == b"abc12345"


@pytest.mark.parametrize(("side_by_side", "most", "threads"), [(1, None, 1), (8, None, 8),
                                                              (8, 3, 3), (8, 100, 8)])
def test_each_side_by_side_keeps_the_order_in_as_many_threads_as_the_store_says(
        tmp_path, monkeypatch, side_by_side, most, threads):
    store = LocalStore(tmp_path / "s", fsync=False)
    store.side_by_side = side_by_side
    handed: list[int] = []  # items per hand-off to a thread
    to_thread = asyncio.to_thread

    async def counting(work, share):
        handed.append(len(share))
        return await to_thread(work, share)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    items = list(range(23))
    assert asyncio.run(each_side_by_side(store, lambda i: i * i, items, most)) == [
        i * i for i in items]
    assert len(handed) == threads and sum(handed) == len(items)
    assert asyncio.run(each_side_by_side(store, lambda i: i, [], most)) == []


def test_iter_reader_hands_whole_chunks_on_and_parts_of_them_in_order():
    chunks = [b"abc", b"", b"defgh", b"ij"]
    reader = IterReader(iter(chunks))
    assert reader.read(2) == b"ab"
    assert reader.read(10) == b"c"
    whole = reader.read(10)
    assert whole is chunks[2]  # as it came: not a copy
    assert reader.read(1) == b"i" and reader.read() == b"j" and reader.read(5) == b""
    buffered = io.BufferedReader(IterReader(iter(chunks)), 4)  # (readinto)
    assert buffered.read() == b"abcdefghij"


_PWRITE, _PREADV = os.pwrite, os.preadv  # the real ones, under any log
needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")


class _DirectLog:
    """os.pwrite or os.preadv (`call`), counting the bytes moved through descriptors opened
    with O_DIRECT (each call checked aligned: offset, length and memory); or refusing such
    calls, or failing the `fail_direct_after`-th of them with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, call: str = "pwrite",
                 refuse_direct: bool = False, fail_direct_after: int | None = None):
        self.direct = self.calls = 0
        real = {"pwrite": _PWRITE, "preadv": _PREADV}[call]

        def direct(fd: int, data, offset: int) -> int:
            if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                return real(fd, data, offset)
            if refuse_direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            self.calls += 1
            if fail_direct_after is not None and self.calls > fail_direct_after:
                raise OSError(errno.ENOSPC, "No space left on device")
            for buffer in data if call == "preadv" else [data]:
                address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
                assert (offset % DIRECT_ALIGN, len(buffer) % DIRECT_ALIGN,
                        address % DIRECT_ALIGN) == (0, 0, 0)
            moved = real(fd, data, offset)  # an EINVAL here fails the test
            self.direct += moved
            return moved

        monkeypatch.setattr(os, call, direct)


@needs_o_direct
def test_files_go_past_the_page_cache_beyond_their_first_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, data = LocalStore(tmp_path / "store"), os.urandom(DIRECT_FROM + 3 * MiB + 4321)
    log = _DirectLog(monkeypatch)
    # A put (an imported zip, an archive's member, a file sent whole), in pieces no block size
    # divides: its first DIRECT_FROM bytes cached (its headers are read next), then by
    # O_DIRECT but for the unaligned tail.
    store.put("zip", IterReader(data[i:i + 65_537] for i in range(0, len(data), 65_537)))
    assert store.read_range("zip", 0, len(data) + 1) == data
    assert log.direct == 3 * MiB + 4096
    assert store.put("small", io.BytesIO(data[:DIRECT_FROM])).size == DIRECT_FROM
    assert log.direct == 3 * MiB + 4096  # all of it cached
    # A tus upload's segments, at offsets no block size divides: past DIRECT_FROM each is
    # written by O_DIRECT from its first aligned byte, the unaligned ends through the cache.
    log.direct = 0
    cuts = [0, 5000, DIRECT_FROM + 1, DIRECT_FROM + MiB + 4097, len(data)]
    for start, end in itertools.pairwise(cuts):
        store.write_at("tus/x", start, io.BytesIO(data[start:end]))
    assert store.read_range("tus/x", 0, len(data) + 1) == data
    assert 3 * MiB - 3 * DIRECT_ALIGN <= log.direct <= 3 * MiB + 4321
    # Turned off (IMGEST_STORE_DIRECT_IO=false): all through the page cache, reads too.
    log.direct = 0
    monkeypatch.setenv("IMGEST_STORE_DIRECT_IO", "false")
    cached = open_store(RuntimeSettings(data_dir=tmp_path / "cached"))
    cached.put("zip", io.BytesIO(data))
    for start, end in itertools.pairwise(cuts):
        cached.write_at("tus/x", start, io.BytesIO(data[start:end]))
    assert cached.read_range("tus/x", 0, len(data) + 1) == data and log.direct == 0
    with cached.open_once("zip") as f:
        assert not isinstance(f, _DirectReader) and f.read() == data


@needs_o_direct
@pytest.mark.parametrize("refused", [False, True], ids=["direct", "refused"])
def test_a_file_read_once_is_read_past_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: bool) -> None:
    store, data = LocalStore(tmp_path / "store"), os.urandom(9 * MiB + 123)
    store.put("zip", io.BytesIO(data))
    log = _DirectLog(monkeypatch, "preadv", refuse_direct=refused)
    descriptors = len(os.listdir("/proc/self/fd"))
    with store.open_once("zip") as f:
        # Small reads close together come from one read of the disk; then reads at offsets
        # no block divides, across the buffer's end and past the file's.
        f.seek(5000)
        assert (f.read(30), f.read(20), f.read(512)) == (
            data[5000:5030], data[5030:5050], data[5050:5562])
        assert log.calls == (0 if refused else 1) and f.tell() == 5562
        for at, n in [(4095, 1), (MiB + 7, 5 * MiB + 3), (len(data) - 10, 100),
                      (len(data), 5), (len(data) + 4096, 1)]:
            f.seek(at)
            assert f.read(n) == data[at:at + n]
        f.seek(-3, os.SEEK_END)
        assert f.read() == data[-3:]
    # Views of the reader's own buffer (an archive's member unpacked in place); of a spare
    # buffer from any other reader.
    for opened in (lambda: store.open_once("zip"), lambda: io.BytesIO(data)):
        with opened() as f:
            f.seek(7)
            got, own = [], []  # (a view is valid until the next is asked for)
            for piece in pieces(f, 3 * MiB + 5, MiB):
                got.append(bytes(piece))
                own.append(piece.obj is getattr(f, "buffer", None))
            assert b"".join(got) == data[7:3 * MiB + 12] and max(map(len, got)) == MiB
            assert all(own) == isinstance(f, _DirectReader)  # its own buffer: nothing copied
            f.seek(len(data) - 5)
            assert b"".join(bytes(piece) for piece in pieces(f, 100)) == data[-5:]
    log.direct = 0
    assert b"".join(store.iter_chunks("zip")) == data  # (an archive streamed, a download)
    assert refused or len(data) <= log.direct <= len(data) + DIRECT_ALIGN
    assert len(os.listdir("/proc/self/fd")) == descriptors
    with pytest.raises(ObjectNotFound):
        store.open_once("nothing")


@needs_o_direct
def test_a_file_read_once_reads_what_is_there_now(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store, data = LocalStore(tmp_path / "store"), os.urandom(100_000)
    store.write_at("tus/x", 0, io.BytesIO(data[:70_000]))
    with store.open_once("tus/x") as f:
        assert f.read() == data[:70_000] and f.read(5) == b""  # its end, as it stands
        store.write_at("tus/x", 70_000, io.BytesIO(data[70_000:]))  # then it grows
        f.seek(0)
        assert f.read() == data
        with pytest.raises(OSError, match="negative"):
            f.seek(-1)
        assert fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_DIRECT  # still past the cache
        assert f.seek(-3, os.SEEK_END) == len(data) - 3 and f.read() == data[-3:]
    # A file system refusing O_DIRECT when the file is opened: read through the page cache.
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a: (
        _raise(OSError(errno.EINVAL, "Invalid argument")) if flags & os.O_DIRECT
        else real_open(path, flags, *a)))
    with store.open_once("tus/x") as f:
        assert not isinstance(f, _DirectReader) and f.read() == data


def _raise(error: BaseException) -> None:
    raise error


def test_a_store_whose_directory_is_away_is_not_a_store_without_the_object(
        tmp_path: Path) -> None:
    """Its directory moved away (or unmounted): reads fail as a store away does, to be tried
    again, not as an object that is gone for good; back, everything is there."""
    store = LocalStore(tmp_path / "store")
    store.put("a/x", io.BytesIO(b"hello"))
    with pytest.raises(ObjectNotFound):
        store.open("a/none")
    assert store.stat("a/none") is None
    store.root.rename(tmp_path / "away")
    for call in (lambda: store.open("a/x"), lambda: store.open_once("a/x"),
                 lambda: store.stat("a/x"), lambda: store.read_range("a/x", 0, 5),
                 lambda: store.copy("a/x", "b/x"), lambda: store.move("a/x", "b/y")):
        with pytest.raises(StoreError) as away:
            call()
        assert not isinstance(away.value, ObjectNotFound), away.value
    with pytest.raises(StoreError):  # nor a write: it would make the directory anew
        store.put("c/x", io.BytesIO(b"new"))
    assert not store.root.exists()
    (tmp_path / "away").rename(store.root)
    assert store.read_range("a/x", 0, 5) == b"hello"


@needs_o_direct
def test_full_buffers_go_to_the_disk_from_another_thread_while_the_next_fills(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer's full buffer is written by another thread while the caller reads on and
    fills its twin: one write on its way at a time, in order, and the last (part) buffer by
    the caller; the bytes intact though the disk is slow."""
    import threading

    store = LocalStore(tmp_path / "store")
    data = os.urandom(DIRECT_FROM + 3 * DIRECT_BUFFER + 12345)
    writes: list[tuple[str, int, bool]] = []  # (thread, offset, the caller read on meanwhile)
    read = on_the_way = most = 0

    def chunks():
        nonlocal read
        for i in range(0, len(data), 65_537):
            read += 1
            yield data[i:i + 65_537]

    def pwrite(fd: int, buffer, offset: int) -> int:
        nonlocal on_the_way, most
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            return _PWRITE(fd, buffer, offset)
        on_the_way += 1
        most = max(most, on_the_way)
        time.sleep(0.2)  # a slow disk
        # Read past the chunk that filled this buffer? (Written in turn, the caller would
        # still wait at that chunk.)
        past = read > -(-(offset + len(buffer)) // 65_537)
        writes.append((threading.current_thread().name, offset, past))
        on_the_way -= 1
        return _PWRITE(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    store.put("big", IterReader(chunks()))
    assert store.read_range("big", 0, len(data) + 1) == data
    assert [offset for _, offset, _ in writes] == sorted(offset for _, offset, _ in writes)
    assert all(name.startswith("imgest-direct-writes") and overlapped
               for name, _, overlapped in writes[:3])
    assert not writes[-1][0].startswith("imgest-direct-writes") and len(writes) == 4
    assert most == 1


@needs_o_direct
def test_a_file_system_without_direct_writes_gets_them_through_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, data = LocalStore(tmp_path / "store"), os.urandom(DIRECT_FROM + 5 * MiB + 99)
    log = _DirectLog(monkeypatch, refuse_direct=True)  # the flag taken, the writes refused
    descriptors = len(os.listdir("/proc/self/fd"))
    assert store.write_at("big", 0, io.BytesIO(data)).size == len(data)
    assert store.read_range("big", 0, len(data) + 1) == data and log.direct == 0
    monkeypatch.setattr(_DirectWriter, "open", classmethod(lambda cls, fd, at: None))
    assert store.write_at("big", 3, io.BytesIO(data[3:])).size == len(data) - 3  # not opened
    assert store.read_range("big", 0, len(data) + 1) == data
    assert len(os.listdir("/proc/self/fd")) == descriptors  # the refused one closed too


@needs_o_direct
def test_a_failed_direct_write_raises_its_own_error_and_leaves_nothing_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, data = LocalStore(tmp_path / "store"), os.urandom(DIRECT_FROM + 9 * MiB + 5)
    descriptors = len(os.listdir("/proc/self/fd"))
    # No spare kept (as when other uploads fill the spares): a failed writer's buffer is let go.
    monkeypatch.setattr(_SpareBuffers, "KEPT", 0)
    for writes_that_succeed in (0, 1, 2):  # the disk full at the first, second, last write
        _DirectLog(monkeypatch, fail_direct_after=writes_that_succeed)
        with pytest.raises(OSError) as failed:
            store.write_at("tus/x", 0, io.BytesIO(data))
        assert failed.value.errno == errno.ENOSPC  # not a BufferError over it
        del failed  # (its traceback holds a slice of the buffer)
        assert len(os.listdir("/proc/self/fd")) == descriptors
    monkeypatch.undo()
    assert store.write_at("tus/x", 0, io.BytesIO(data)).size == len(data)  # all is well again
    assert store.read_range("tus/x", 0, len(data) + 1) == data


def test_spare_buffers_are_aligned_and_kept_for_the_next_caller() -> None:
    with spare_buffer() as first:
        assert len(first) == DIRECT_BUFFER
        assert ctypes.addressof(ctypes.c_char.from_buffer(first)) % DIRECT_ALIGN == 0
        first[:5] = b"hello"
    with spare_buffer() as again:  # the same memory, already touched (a fresh one is zeros)
        assert again[:5] == b"hello"
        with spare_buffer() as other:  # one in use: another
            assert other[:5] != b"hello"
