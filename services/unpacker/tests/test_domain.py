"""imgest_unpacker: archive detection, member paths, bomb guards, and unpack_zip on a real store."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from imgest_contracts import ObjectStored
from imgest_runtime.store import LocalStore
from imgest_unpacker.app import unpack
from imgest_unpacker.domain import (
    ArchiveError,
    Limits,
    archive_format,
    check_growth,
    file_id,
    member_path,
)

GENEROUS = Limits(max_members=1000, max_unpacked_bytes=1024**3, max_ratio=1000)

# --- archive_format ------------------------------------------------------------------------------


def _zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_archive_format_recognises_zip_and_empty_zip() -> None:
    assert archive_format(_zip_bytes({"a.txt": b"x"})[:8]) == "zip"
    empty = _zip_bytes({})
    assert empty[:4] == b"PK\x05\x06"
    assert archive_format(empty) == "zip"


@pytest.mark.parametrize("head", [b"", b"PK", b"PK\x01\x02....", b"\x1f\x8b\x08\x00",
                                  b"\x00" * 128 + b"DICM", b"\xff\xd8\xff\xe0", b"Rar!\x1a\x07"])
def test_archive_format_refuses_others(head: bytes) -> None:
    assert archive_format(head) is None


# --- member_path ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"scan.dcm", "scan.dcm"),
        (b"study/series/IM0001.dcm", "study/series/IM0001.dcm"),
        (b"./study/./IM1", "study/IM1"),
        (b"study//IM1", "study/IM1"),
        (b"study\\series\\IM2.dcm", "study/series/IM2.dcm"),
        ("Patiënt/ß.dcm".encode(), "Patiënt/ß.dcm"),
        (b"a/..b/c..", "a/..b/c.."),  # dots inside a name are not traversal
    ],
)
def test_member_path_keeps_normal_paths(raw: bytes, expected: str) -> None:
    assert member_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"study/", b"study/series/", b"dir\\",  # directories
        b"__MACOSX/._scan.dcm", b"study/__MACOSX/scan.dcm", b"__MACOSX/study/x",
        b".DS_Store", b"study/.DS_Store", b"Thumbs.db", b"a/desktop.ini",
        b"._scan.dcm", b"study/._IM1",
        b".", b"./",
    ],
)
def test_member_path_skips_directories_and_junk(raw: bytes) -> None:
    assert member_path(raw) is None


@pytest.mark.parametrize(
    "raw",
    [b"../x", b"a/../../x", b"study/../x", b"/abs", b"/etc/passwd", b"C:/x", b"C:\\Windows\\x",
     b"..\\evil", b"\\abs"],
)
def test_member_path_refuses_escaping_paths(raw: bytes) -> None:
    with pytest.raises(ArchiveError) as err:
        member_path(raw)
    assert err.value.code == "archive.unsafe_path"
    assert err.value.message == str(err.value)


def test_member_path_tolerates_undecodable_bytes() -> None:
    path = member_path(b"dir/\xff\xfe.dcm")
    assert path is not None and path.startswith("dir/") and path.endswith(".dcm")


# --- check_growth --------------------------------------------------------------------------------


def test_check_growth_accepts_within_limits() -> None:
    limits = Limits(max_members=10, max_unpacked_bytes=100 * 1024**2, max_ratio=100)
    check_growth(unpacked=50 * 1024**2, packed=1024**2, members=10, limits=limits)  # ratio 50
    check_growth(unpacked=0, packed=0, members=0, limits=limits)


def test_check_growth_member_count() -> None:
    limits = Limits(max_members=10, max_unpacked_bytes=10**12, max_ratio=10**6)
    with pytest.raises(ArchiveError) as err:
        check_growth(unpacked=1, packed=1, members=11, limits=limits)
    assert err.value.code == "archive.too_many_members"
    assert "10" in err.value.message


def test_check_growth_total_bytes() -> None:
    limits = Limits(max_members=10, max_unpacked_bytes=1000, max_ratio=10**6)
    check_growth(unpacked=1000, packed=1000, members=1, limits=limits)
    with pytest.raises(ArchiveError) as err:
        check_growth(unpacked=1001, packed=1000, members=1, limits=limits)
    assert err.value.code == "archive.too_large"


def test_check_growth_ratio() -> None:
    limits = Limits(max_members=10, max_unpacked_bytes=10**12, max_ratio=100)
    packed = 100 * 1024
    check_growth(unpacked=100 * packed, packed=packed, members=1, limits=limits)  # exactly 100×
    with pytest.raises(ArchiveError) as err:
        check_growth(unpacked=100 * packed + 1, packed=packed, members=1, limits=limits)
    assert err.value.code == "archive.bomb"
    assert "100" in err.value.message


def test_check_growth_ratio_ignored_below_one_mebibyte() -> None:
    limits = Limits(max_members=10, max_unpacked_bytes=10**12, max_ratio=2)
    # 1 MiB from 10 bytes is a huge ratio, but small archives are not judged by their ratio
    check_growth(unpacked=1024**2, packed=10, members=1, limits=limits)
    with pytest.raises(ArchiveError):
        check_growth(unpacked=1024**2 + 1, packed=10, members=1, limits=limits)
    # unknown packed size (0): no ratio at all
    check_growth(unpacked=10 * 1024**2, packed=0, members=1, limits=limits)


def test_check_growth_order_members_before_bytes() -> None:
    limits = Limits(max_members=1, max_unpacked_bytes=1, max_ratio=1)
    with pytest.raises(ArchiveError) as err:
        check_growth(unpacked=10**9, packed=1, members=2, limits=limits)
    assert err.value.code == "archive.too_many_members"


# --- file_id -------------------------------------------------------------------------------------


def test_file_id_is_deterministic_and_distinct() -> None:
    a = file_id("u1", "staging/u1/x.zip", "a/b.dcm")
    assert a == file_id("u1", "staging/u1/x.zip", "a/b.dcm")
    assert len(a) == 32 and all(c in "0123456789abcdef" for c in a)
    assert a != file_id("u2", "staging/u1/x.zip", "a/b.dcm")
    assert a != file_id("u1", "staging/u1/y.zip", "a/b.dcm")
    assert a != file_id("u1", "staging/u1/x.zip", "a/c.dcm")
    # None and '' mean the object itself
    assert file_id("u1", "k", None) == file_id("u1", "k", "")
    assert file_id("u1", "k", None) != file_id("u1", "k", "k")
    # the separator keeps fields apart
    assert file_id("ab", "c", None) != file_id("a", "bc", None)
    expected = hashlib.sha256(b"u1\0staging/u1/x.zip\0a/b.dcm").hexdigest()[:32]
    assert a == expected


# --- unpack_zip against a real LocalStore --------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


def _stored(store: LocalStore, data: bytes, upload_id: str = "up-1",
            filename: str = "study.zip") -> ObjectStored:
    key = f"staging/{upload_id}/objects/{filename}"
    put = store.put(key, io.BytesIO(data))
    assert put.size == len(data)
    return ObjectStored(upload_id=upload_id, object_key=key, filename=filename, size=put.size,
                        sha256=put.sha256, content_type="application/zip")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MEMBERS = {
    "study/series1/IM0001.dcm": b"first" * 1000,
    "study/series1/IM0002.dcm": b"second" * 20000,
    "readme.txt": b"hello\n",
    "empty.bin": b"",
}


def _sample_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("study/", b"")  # a directory entry
        zf.writestr("study/series1/", b"")
        for name, data in MEMBERS.items():
            zf.writestr(name, data)
        zf.writestr("__MACOSX/study/._IM0001.dcm", b"\x00\x05\x16\x07 resource fork")
        zf.writestr("study/.DS_Store", b"junk")
        zf.writestr("stored.raw", b"not compressed", compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def test_unpack_zip_stages_each_member(store: LocalStore) -> None:
    obj = _stored(store, _sample_zip())
    result = unpack(store, obj, "zip", GENEROUS)

    expected = dict(MEMBERS, **{"stored.raw": b"not compressed"})
    assert [m.path for m in result.members] == list(expected)
    assert result.skipped == 4  # two directories, __MACOSX, .DS_Store
    junk = len(b"\x00\x05\x16\x07 resource fork") + len(b"junk")  # read through, counted
    assert result.bytes == sum(len(d) for d in expected.values()) + junk
    for m in result.members:
        data = expected[m.path]
        fid = file_id(obj.upload_id, obj.object_key, m.path)
        assert m.key == f"staging/{obj.upload_id}/members/{fid}-{Path(m.path).name}"
        assert m.size == len(data)
        assert m.sha256 == _sha(data)
        with store.open(m.key) as f:
            assert f.read() == data
    # nothing but the archive and its members was written
    keys = sorted(o.key for o in store.list("staging/"))
    assert keys == sorted([obj.object_key] + [m.key for m in result.members])


def test_unpack_zip_is_deterministic(store: LocalStore) -> None:
    obj = _stored(store, _sample_zip())
    first = unpack(store, obj, "zip", GENEROUS)
    second = unpack(store, obj, "zip", GENEROUS)
    assert first == second
    assert len(list(store.list(f"staging/{obj.upload_id}/members/"))) == len(first.members)


def test_unpack_zip_refuses_traversal(store: LocalStore) -> None:
    obj = _stored(store, _zip_bytes({"ok.txt": b"fine", "../../evil.txt": b"gotcha"}))
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", GENEROUS)
    assert err.value.code == "archive.unsafe_path"
    assert not (store.root.parent / "evil.txt").exists()


def test_unpack_zip_refuses_a_path_longer_than_the_services_keep(store: LocalStore) -> None:
    deep = "/".join(["d" * 200] * 15) + "/a.dcm"  # 3,020 characters, each part a legal name
    assert unpack(store, _stored(store, _zip_bytes({deep[:2990]: b"x"})), "zip", GENEROUS)
    with pytest.raises(ArchiveError) as err:
        unpack(store, _stored(store, _zip_bytes({"ok.txt": b"fine", deep: b"x"})), "zip",
               GENEROUS)
    assert err.value.code == "archive.path_too_long" and "3,020 characters" in str(err.value)


def test_unpack_truncated_zip_is_corrupt(store: LocalStore) -> None:
    data = _sample_zip()
    obj = _stored(store, data[: len(data) // 2])
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", GENEROUS)
    assert err.value.code == "archive.corrupt"
    assert isinstance(err.value.__cause__, Exception)


def test_unpack_damaged_zip_is_corrupt(store: LocalStore) -> None:
    data = bytearray(_zip_bytes({"a.bin": bytes(range(256)) * 400}))
    data[60:80] = b"\xff" * 20  # inside the deflate stream of the only member
    obj = _stored(store, bytes(data))
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", GENEROUS)
    assert err.value.code == "archive.corrupt"


def test_unpack_zip_bomb(store: LocalStore) -> None:
    bomb = _zip_bytes({"zeros.bin": b"\x00" * (50 * 1024**2)})
    assert len(bomb) < 100 * 1024
    obj = _stored(store, bomb)
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", Limits(max_members=1000, max_unpacked_bytes=10**12, max_ratio=100))
    assert err.value.code == "archive.bomb"
    # the member being written is not left behind, neither complete nor as a temp file
    leftovers = [p for p in (store.root / "staging").rglob("*")
                 if p.is_file() and "members" in p.parts]
    assert leftovers == []


def test_unpack_zip_total_size_limit(store: LocalStore) -> None:
    obj = _stored(store, _sample_zip())
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", Limits(max_members=1000, max_unpacked_bytes=10_000,
                                      max_ratio=10**6))
    assert err.value.code == "archive.too_large"


def test_unpack_zip_member_limit(store: LocalStore) -> None:
    obj = _stored(store, _zip_bytes({f"f{i}.txt": b"data %d" % i for i in range(5)}))
    assert len(unpack(store, obj, "zip", Limits(5, 10**9, 10**6)).members) == 5
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", Limits(4, 10**9, 10**6))
    assert err.value.code == "archive.too_many_members"


def test_unpack_zip_member_limit_counts_empty_members(store: LocalStore) -> None:
    obj = _stored(store, _zip_bytes({f"f{i}.txt": b"" for i in range(10)}))
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", Limits(max_members=3, max_unpacked_bytes=10**9, max_ratio=10**6))
    assert err.value.code == "archive.too_many_members"
