"""Every archive format, nested archives and the refusals, unpacked for real into both store
adapters (a directory, and S3 over HTTP through moto's server)."""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgest_contracts import ObjectStored
from imgest_runtime.store import LocalStore, ObjectNotFound, ObjectStore, S3Store, check_key
from imgest_unpacker.app import format_of, unpack
from imgest_unpacker.archives import sniff
from imgest_unpacker.domain import ArchiveError, Limits

CHUNK_SIZE = 1024 * 1024  # the store's chunk, the unit zlib's output is asked for in
GENEROUS = Limits(max_members=10_000, max_unpacked_bytes=1024**3, max_ratio=1000)
FILES = {"study/IM1.dcm": b"one" * 5000, "study/IM2.dcm": b"two" * 7000, "notes.txt": b"hi\n"}


@pytest.fixture(scope="module")
def s3_store() -> Iterator[S3Store]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store = S3Store(endpoint=f"127.0.0.1:{port}", access_key="test", secret_key="test",
                    bucket="unpacker-test", secure=False, region="us-east-1")
    store.ensure_bucket()
    try:
        yield store
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store", fsync=False)
    return request.getfixturevalue("s3_store")


def stored(store: ObjectStore, data: bytes, filename: str = "upload.bin") -> ObjectStored:
    upload = uuid.uuid4().hex[:12]  # each test its own upload (the S3 bucket is shared)
    key = f"staging/{upload}/o/{filename}"
    put = store.put(key, io.BytesIO(data), len(data))
    return ObjectStored(upload_id=upload, object_key=key, filename=filename, size=put.size,
                        sha256=put.sha256)


def tar_bytes(files: dict[str, bytes], mode: str = "w", extra=None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if extra:
            extra(tf)
    return out.getvalue()


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def unpacked(store: ObjectStore, obj: ObjectStored, fmt: str, limits: Limits = GENEROUS
             ) -> dict[str, bytes]:
    result = unpack(store, obj, fmt, limits)
    files = {}
    for m in result.members:
        with store.open(m.key) as f:
            files[m.path] = f.read()
        assert m.key.startswith(f"staging/{obj.upload_id}/members/")
    return files


def refused(store: ObjectStore, obj: ObjectStored, fmt: str, limits: Limits = GENEROUS
            ) -> ArchiveError:
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, fmt, limits)
    # All or nothing: no member is left behind; the original stays for inspection.
    assert [o.key for o in store.list(f"staging/{obj.upload_id}/")] == [obj.object_key]
    if isinstance(store, LocalStore):  # (nor a temporary file, which listing does not show)
        upload = store.root / "staging" / obj.upload_id
        assert [p for p in upload.rglob("*") if p.is_file()] == [store.root / obj.object_key]
    return err.value


# --- formats, by content ----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "fmt"), [("w", "tar"), ("w:gz", "tar.gz"),
                                           ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")])
def test_every_tar_flavour_is_recognised_by_content_and_unpacked(store, mode, fmt):
    obj = stored(store, tar_bytes(FILES, mode), "no-extension")  # the name says nothing
    assert sniff(store, obj.object_key) == fmt
    assert unpacked(store, obj, fmt) == FILES


@pytest.mark.parametrize("kw", [{}, {"compression": zipfile.ZIP_STORED},
                                {"compression": zipfile.ZIP_BZIP2}])
def test_zip_stored_deflated_bzip2(store, kw):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", kw.get("compression", zipfile.ZIP_DEFLATED)) as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
    obj = stored(store, out.getvalue())
    assert sniff(store, obj.object_key) == "zip"
    assert unpacked(store, obj, "zip") == FILES


def test_zip64(store):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, data in FILES.items():
            with zf.open(name, "w", force_zip64=True) as member:
                member.write(data)
    assert b"PK\x06\x06" in out.getvalue() or b"\x01\x00" in out.getvalue()
    obj = stored(store, out.getvalue())
    assert unpacked(store, obj, "zip") == FILES


def test_deflate64(store):
    """Windows' "compressed folders" write Deflate64 (method 9) for large files. A deflate
    stream without length code 285 is also a valid Deflate64 one: with random data (no long
    matches), relabelling the method makes a true Deflate64 zip."""
    data = os.urandom(200_000)
    raw = bytearray(zip_bytes({"big.dcm": data}))
    raw[8:10] = (9).to_bytes(2, "little")  # the local header's method
    central = raw.index(b"PK\x01\x02")
    raw[central + 10:central + 12] = (9).to_bytes(2, "little")  # the central directory's
    obj = stored(store, bytes(raw))
    assert unpacked(store, obj, "zip") == {"big.dcm": data}


def test_a_compressed_file_that_is_no_tar_passes_through(store):
    import gzip

    obj = stored(store, gzip.compress(b"\x00" * 128 + b"DICM" + b"x" * 1000), "scan.dcm.gz")
    assert sniff(store, obj.object_key) is None


def test_junk_is_skipped_and_counted(store):
    files = {**FILES, "__MACOSX/study/._IM1.dcm": b"fork", "study/.DS_Store": b"junk",
             "Thumbs.db": b"junk"}
    obj = stored(store, tar_bytes(files, "w:gz"))
    result = unpack(store, obj, "tar.gz", GENEROUS)
    assert sorted(m.path for m in result.members) == sorted(FILES)
    assert result.skipped == 3


# --- archives inside archives -------------------------------------------------------------------


def test_archives_inside_an_archive_are_unpacked_one_level_deep(store):
    inner_zip = zip_bytes({"a.dcm": b"A" * 100})
    inner_tgz = tar_bytes({"b/b.dcm": b"B" * 100}, "w:gz")
    deeper = zip_bytes({"deep.dcm": b"D"})
    third = zip_bytes({"in.zip": deeper})  # a zip in a zip in the archive: stays a file
    obj = stored(store, tar_bytes({"x/inner.zip": inner_zip, "inner.tgz": inner_tgz,
                                   "top.dcm": b"T", "third.zip": third}))
    files = unpacked(store, obj, "tar")
    assert files == {"x/inner.zip/a.dcm": b"A" * 100, "inner.tgz/b/b.dcm": b"B" * 100,
                     "top.dcm": b"T", "third.zip/in.zip": deeper}
    # The inner archives themselves are not left behind as files.
    assert len(list(store.list(f"staging/{obj.upload_id}/members/"))) == 4


def test_a_nested_zip_bomb_is_refused(store):
    """42.zip's idea: small zips of zeros inside a zip; each level looks harmless."""
    layer = zip_bytes({f"zeros{i}.bin": bytes(8 * 1024**2) for i in range(4)})
    outer = zip_bytes({f"layer{i}.zip": layer for i in range(4)})
    assert len(outer) < 200 * 1024
    obj = stored(store, outer)
    error = refused(store, obj, "zip", Limits(10_000, 1024**4, max_ratio=100))
    assert error.code == "archive.bomb"


def test_a_bad_archive_inside_refuses_the_whole(store):
    inner = zip_bytes({"../escape.dcm": b"x"})
    obj = stored(store, tar_bytes({"good.dcm": b"fine", "bad.zip": inner}))
    assert refused(store, obj, "tar").code == "archive.unsafe_path"


def test_an_archive_gone_from_staging_is_refused_not_retried(store):
    # Its upload was cancelled: a file goes on (the metadata service refuses it), an archive
    # being unpacked is refused at once.
    obj = stored(store, zip_bytes({"a.dcm": b"a" * 100}))
    assert format_of(store, obj.object_key) == "zip"
    store.delete(obj.object_key)
    assert format_of(store, obj.object_key) is None
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", GENEROUS)
    assert err.value.code == "store.object_missing"


def test_an_archive_gone_while_unpacked_leaves_no_member(tmp_path):
    class Cancelling(LocalStore):  # staging emptied once the first member is written
        def put(self, key, data, length=None, *, durable=True):
            written = super().put(key, data, length, durable=durable)
            self.delete(obj.object_key)
            return written

    store = Cancelling(tmp_path / "store", fsync=False)
    obj = stored(LocalStore(store.root, fsync=False), zip_bytes(
        {f"{i}.dcm": os.urandom(64 * 1024) for i in range(20)}, zipfile.ZIP_STORED))
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", GENEROUS)
    assert err.value.code == "store.object_missing"
    assert not [p for p in (store.root / "staging").rglob("*") if p.is_file()]


# --- refusals, one by one -----------------------------------------------------------------------


def _tar_with(kind: bytes, name: str = "link", linkname: str = "/etc/passwd"):
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        tf.addfile(info)
    return add


@pytest.mark.parametrize(("kind", "code"), [
    (tarfile.SYMTYPE, "archive.link"), (tarfile.LNKTYPE, "archive.link"),
    (tarfile.CHRTYPE, "archive.special_file"), (tarfile.BLKTYPE, "archive.special_file"),
    (tarfile.FIFOTYPE, "archive.special_file")])
def test_tar_links_and_devices_are_refused(store, kind, code):
    obj = stored(store, tar_bytes(FILES, "w:gz", _tar_with(kind)))
    error = refused(store, obj, "tar.gz")
    assert error.code == code and "'link'" in error.message


def test_zip_symlink_is_refused(store):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("ok.dcm", b"fine")
        link = zipfile.ZipInfo("link")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert refused(store, stored(store, out.getvalue()), "zip").code == "archive.link"


def test_encrypted_zip_is_refused(store):
    """A real AES-256 zip (WinZip's scheme, as 7-Zip and Windows tools write it)."""
    import pyzipper

    out = io.BytesIO()
    with pyzipper.AESZipFile(out, "w", compression=pyzipper.ZIP_DEFLATED,
                             encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(b"s3cret")
        zf.writestr("plain.txt", b"x" * 100)
        zf.writestr("secret.dcm", b"x" * 100)
    error = refused(store, stored(store, out.getvalue()), "zip")
    assert error.code == "archive.encrypted" and "without a password" in error.message


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_duplicate_member_names_are_refused(store, fmt):
    if fmt == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("a.dcm", b"one")
            with pytest.warns(UserWarning, match="Duplicate name"):
                zf.writestr("a.dcm", b"two")
        data = out.getvalue()
    else:
        data = tar_bytes({"a.dcm": b"one"}, "w", lambda tf: tf.addfile(
            tarfile.TarInfo("./a.dcm"), io.BytesIO()))
    assert refused(store, stored(store, data), fmt).code == "archive.duplicate_member"


@pytest.mark.parametrize(("name", "fmt"), [("../../etc/cron.d/x", "tar"),
                                           ("/etc/passwd", "tar"), ("../x.dcm", "zip")])
def test_traversal_is_refused(store, name, fmt):
    data = tar_bytes({name: b"x"}) if fmt == "tar" else zip_bytes({name: b"x"})
    assert refused(store, stored(store, data), fmt).code == "archive.unsafe_path"


@pytest.mark.parametrize(("mode", "fmt"), [("w", "tar"), ("w:gz", "tar.gz"),
                                           ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")])
@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_archives_are_refused(store, mode, fmt, cut):
    data = tar_bytes({f"f{i}.bin": bytes(range(256)) * 200 for i in range(4)}, mode)
    obj = stored(store, data[: int(len(data) * cut)])
    assert refused(store, obj, fmt).code == "archive.corrupt"


def test_truncated_zip_is_refused(store):
    data = zip_bytes(FILES)
    assert refused(store, stored(store, data[: len(data) - 30]), "zip").code == "archive.corrupt"


@pytest.mark.parametrize(("files", "says"), [
    ({}, "The archive holds no files."),
    ({"folder/": b"", "__MACOSX/._a.dcm": b"x"},
     "The archive holds no files, only folders or system files (2 skipped)."),
])
def test_an_archive_of_no_files_is_refused(store, files, says):
    error = refused(store, stored(store, zip_bytes(files)), "zip")
    assert (error.code, error.message) == ("archive.empty", says)


def test_an_empty_archive_inside_one_with_files_is_no_refusal(store):
    data = zip_bytes({"a.dcm": b"a" * 100, "inner.zip": zip_bytes({})})
    assert unpacked(store, stored(store, data), "zip") == {"a.dcm": b"a" * 100}


def test_a_zip_compressed_in_a_way_not_unpacked_is_refused_naming_it(store):
    data = zip_bytes({"a.dcm": b"a" * 5000, "b.dcm": b"b" * 5000}, zipfile.ZIP_LZMA)
    error = refused(store, stored(store, data), "zip")
    assert error.code == "archive.unsupported_compression"
    assert error.message == (
        "The zip archive's member 'a.dcm' is compressed with LZMA (method 14), which imgest "
        "does not unpack; zip it again with the usual compression (deflate).")


def test_too_many_members_and_too_many_bytes(store):
    obj = stored(store, tar_bytes(FILES, "w:gz"))
    assert refused(store, obj, "tar.gz", Limits(2, 10**9, 10**6)).code == (
        "archive.too_many_members")
    assert refused(store, obj, "tar.gz", Limits(100, 10_000, 10**6)).code == "archive.too_large"


# --- no member path leaves the upload's prefix --------------------------------------------------


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                    max_size=60)
       | st.lists(st.sampled_from(["..", ".", "", "a", "/", "\\", "C:", "b.dcm", "~"]),
                  min_size=1, max_size=6).map("/".join))
def test_member_paths_never_escape_the_upload(tmp_path: Path, name: str):
    root = tmp_path / uuid.uuid4().hex  # (the fixture is shared by all examples)
    local = LocalStore(root, fsync=False)
    obj = stored(local, tar_bytes({name: b"x"}))
    try:
        result = unpack(local, obj, "tar", GENEROUS)
    except ArchiveError as e:
        assert e.code in ("archive.unsafe_path", "archive.corrupt",
                          "archive.empty")  # (a name that is a folder's or junk)
        return
    for m in result.members:
        check_key(m.key)
        assert m.key.startswith(f"staging/{obj.upload_id}/members/")
        assert ".." not in m.key.split("/")
    # Every file written by any example is inside its own store root's staging/{upload}/.
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert p.relative_to(tmp_path).parts[1] == "staging", p


# --- multi-file slides ----------------------------------------------------------------------------

SLIDEDAT = b"[GENERAL]\nSLIDE_VERSION=1.0\n[DATAFILE]\nFILE_COUNT=2\nFILE_0=Data0000.dat\n" \
           b"FILE_1=Data0001.dat\n"
AFI = (b'<?xml version="1.0"?><ImageList><Image><Path>s_DAPI.svs</Path></Image>'
       b"<Image><Path>s_FITC.svs</Path></Image></ImageList>")
NDPIS = b"[NanoZoomer Digital Pathology Image Set]\nNoImages=2\nImage0=s-DAPI.ndpi\n" \
        b"Image1=s-FITC.ndpi\n"
FILESETS = {
    "mrxs": ({"s.mrxs": b"index", "s/Slidedat.ini": SLIDEDAT, "s/Data0000.dat": b"d0",
              "s/Data0001.dat": b"d1", "s/Index.dat": b"ix"}, "s.mrxs"),
    "vsi": ({"s.vsi": b"II*\x00vsi", "_s_/stack1/frame_t.ets": b"ets",
             "_s_/stack10001/frame_t.ets": b"ets2"}, "s.vsi"),
    "afi": ({"s.afi": AFI, "s_DAPI.svs": b"II*\x00a", "s_FITC.svs": b"II*\x00b"}, "s.afi"),
    "ndpis": ({"s.ndpis": NDPIS, "s-DAPI.ndpi": b"II*\x00a", "s-FITC.ndpi": b"II*\x00b"},
              "s.ndpis"),
}


@pytest.mark.parametrize("fmt", sorted(FILESETS))
def test_multi_file_slides_are_kept_together(store, fmt):
    files, index = FILESETS[fmt]
    obj = stored(store, zip_bytes({**files, "other.dcm": b"loose"}))
    result = unpack(store, obj, "zip", GENEROUS)
    assert [m.path for m in result.members] == ["other.dcm"]  # the rest is one image
    [fileset] = result.filesets
    assert fileset.format == fmt and fileset.index.path == index
    assert sorted(p for p, _ in fileset.files) == sorted(set(files) - {index})
    for path, member in fileset.files:
        with store.open(member.key) as f:
            assert f.read() == files[path]


def test_a_slide_in_an_archive_inside_is_found_at_that_archive_root(store):
    files, _ = FILESETS["ndpis"]
    obj = stored(store, tar_bytes({"case7.zip": zip_bytes(files)}, "w:gz"))
    [fileset] = unpack(store, obj, "tar.gz", GENEROUS).filesets
    assert fileset.index.path == "case7.zip/s.ndpis" and len(fileset.files) == 2


@pytest.mark.parametrize(("fmt", "drop", "says"), [
    ("mrxs", "s/Data0001.dat", "Data0001.dat"), ("mrxs", "s/Slidedat.ini", "Slidedat.ini"),
    ("vsi", "_s_/stack1/frame_t.ets", None), ("afi", "s_FITC.svs", "s_FITC.svs"),
    ("ndpis", "s-DAPI.ndpi", "s-DAPI.ndpi")])
def test_a_slide_with_a_missing_companion_is_refused(store, fmt, drop, says):
    files, index = FILESETS[fmt]
    files = dict(files)
    if fmt == "vsi":
        files = {k: v for k, v in files.items() if not k.startswith("_s_/")}
    else:
        del files[drop]
    error = refused(store, stored(store, zip_bytes(files)), "zip")
    assert error.code == "slide.missing_companion" and index in error.message
    assert says is None or says in error.message


def test_a_slide_index_not_at_the_root_is_refused(store):
    files, _ = FILESETS["mrxs"]
    obj = stored(store, zip_bytes({f"case/{k}": v for k, v in files.items()}))
    error = refused(store, obj, "zip")
    assert error.code == "slide.index_not_at_root" and "case/s.mrxs" in error.message


def test_progress_is_told_member_by_member_with_the_zip_directory_total(store):
    obj = stored(store, zip_bytes({f"f{i}.dcm": b"x" * i for i in range(5)}))
    told: list[tuple] = []
    unpack(store, obj, "zip", GENEROUS, lambda *p: told.append(p))
    assert [t[:2] for t in told] == [(i, 5) for i in range(1, 6)]
    assert told[-1][2] == sum(range(5))
    told.clear()
    unpack(store, stored(store, tar_bytes(FILES, "w:gz")), "tar.gz", GENEROUS,
           lambda *p: told.append(p))
    assert [t[:2] for t in told] == [(1, None), (2, None), (3, None)]  # a tar does not say


def test_small_members_written_aside_keep_the_archive_order_beside_large_ones(store):
    """Members up to WHOLE_UP_TO are written by another thread while the next are read;
    larger ones stream. The result lists them in the archive's order, each with its bytes and
    hash, and an archive inside (small, so sniffed from memory) still gives way to its members."""
    import hashlib

    from imgest_unpacker.app import WHOLE_UP_TO

    files = {f"s{i:02}.dcm": os.urandom(1000 + i) for i in range(12)}
    files["big1.dcm"] = os.urandom(WHOLE_UP_TO + 1)
    files.update({f"t{i:02}.dcm": os.urandom(i + 1) for i in range(12)})
    files["inner.zip"] = zip_bytes({"a.dcm": b"A" * 10, "b.dcm": b"B" * 20})
    files["edge.dcm"] = os.urandom(WHOLE_UP_TO)
    files["big2.dcm"] = os.urandom(3 * WHOLE_UP_TO)
    obj = stored(store, zip_bytes(files, zipfile.ZIP_STORED))
    result = unpack(store, obj, "zip", GENEROUS)
    # (members are listed archive by archive: the upload's own, then each one inside)
    expected = [p for p in files if p != "inner.zip"] + ["inner.zip/a.dcm", "inner.zip/b.dcm"]
    assert [m.path for m in result.members] == expected
    contents = {**files, "inner.zip/a.dcm": b"A" * 10, "inner.zip/b.dcm": b"B" * 20}
    for m in result.members:
        with store.open(m.key) as f:
            assert f.read() == contents[m.path]
        assert (m.size, m.sha256) == (len(contents[m.path]),
                                      hashlib.sha256(contents[m.path]).hexdigest())
    assert len(list(store.list(f"staging/{obj.upload_id}/members/"))) == len(expected)


def test_a_member_that_cannot_be_written_fails_the_unpacking_after_every_write_ended(tmp_path):
    """A disk error on a member written aside is raised (the event is tried again), and no
    write is still going when unpack returns."""

    class FailingStore(LocalStore):
        def put(self, key, data, length=None, *, durable=True):
            if key.endswith("-s05.dcm"):
                raise OSError(28, "No space left on device")
            return super().put(key, data, length, durable=durable)

    store = FailingStore(tmp_path / "store", fsync=False)
    obj = stored(store, zip_bytes({f"s{i:02}.dcm": b"x" * 100 for i in range(20)}))
    with pytest.raises(OSError, match="No space left"):
        unpack(store, obj, "zip", GENEROUS)
    before = sorted(o.key for o in store.list(f"staging/{obj.upload_id}/members/"))
    assert before and all("-s05.dcm" not in k for k in before)
    import time
    time.sleep(0.2)  # nothing lands afterwards: every write had ended
    assert sorted(o.key for o in store.list(f"staging/{obj.upload_id}/members/")) == before


# --- found in review: bombs that hide from the counters, and names -------------------------------


def test_a_bzip2_bomb_is_sniffed_and_unpacked_in_bounded_memory(store):
    import bz2
    import tracemalloc

    squeezer = bz2.BZ2Compressor(9)
    zeros = bytes(16 * 1024**2)
    bomb = b"".join(squeezer.compress(zeros) for _ in range(32)) + squeezer.flush()  # 512 MiB
    assert len(bomb) < 4096
    obj = stored(store, bomb, "x.bz2")
    inside = stored(store, tar_bytes({"z.bin": bytes(64 * 1024**2)}, "w:bz2"))
    tracemalloc.start()
    try:
        assert sniff(store, obj.object_key) is None  # zeros are no tar: passes through
        assert refused(store, inside, "tar.bz2",
                       Limits(100, 10**12, max_ratio=1000)).code == "archive.bomb"
        if isinstance(store, LocalStore):  # (moto, in this process, holds S3 in memory)
            assert tracemalloc.get_traced_memory()[1] < 48 * 1024**2  # never all 64 MiB
    finally:
        tracemalloc.stop()


def test_a_huge_tar_long_name_header_is_refused(store):
    def long_name(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("a/" * (600 * 1024) + "x.dcm")  # 1.2 MB of name
        tf.addfile(info)

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.GNU_FORMAT) as tf:
        long_name(tf)
    error = refused(store, stored(store, out.getvalue()), "tar.gz")
    assert error.code == "archive.corrupt" and "header" in error.message


def test_the_same_name_in_different_inner_archives_is_no_duplicate(store):
    obj = stored(store, tar_bytes({"a.dcm": b"outer", "x.zip": zip_bytes({"a.dcm": b"x"}),
                                   "y.zip": zip_bytes({"a.dcm": b"y"})}))
    assert unpacked(store, obj, "tar") == {"a.dcm": b"outer", "x.zip/a.dcm": b"x",
                                           "y.zip/a.dcm": b"y"}


def test_corrupt_deflate64_is_refused_as_corrupt(store):
    raw = bytearray(zip_bytes({"big.dcm": os.urandom(200_000)}))
    raw[8:10] = (9).to_bytes(2, "little")
    central = raw.index(b"PK\x01\x02")
    raw[central + 10:central + 12] = (9).to_bytes(2, "little")
    raw[200:260] = b"\xff" * 60
    assert refused(store, stored(store, bytes(raw)), "zip").code == "archive.corrupt"


def test_control_characters_in_names_become_underscores(store):
    obj = stored(store, tar_bytes({"a\x01b\x07.dcm": b"x", "c\n.dcm": b"y"}))
    assert sorted(unpacked(store, obj, "tar")) == ["a_b_.dcm", "c_.dcm"]
    # A zip whose local header names a file otherwise than its central directory (here: a NUL
    # in the local name only) is refused whole, saying so: tools disagree on which name to
    # believe, and nothing of it is silently dropped. Stored (read in place) or compressed
    # otherwise (streamed), the same.
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_BZIP2):
        data = bytearray(zip_bytes({"nulX.dcm": b"z", "ok.dcm": b"k"},
                                   compression=compression))
        data[data.index(b"nulX.dcm")+3] = 0  # the first occurrence: the local header's
        reason = refused(store, stored(store, bytes(data)), "zip")
        assert reason.code == "archive.corrupt" and "'nul\\x00.dcm'" in reason.message, reason


def test_slide_names_are_matched_whatever_their_case(store):
    afi = AFI.replace(b"s_DAPI.svs", b"S_DAPI.SVS")
    files = {"SLIDE.AFI": afi, "S_DAPI.SVS": b"II*\x00a", "s_FITC.svs": b"II*\x00b",
             "CASE.MRXS": b"i", "case/SLIDEDAT.INI": SLIDEDAT, "case/Data0000.dat": b"0",
             "case/DATA0001.DAT": b"1"}
    result = unpack(store, stored(store, zip_bytes(files)), "zip", GENEROUS)
    assert sorted((f.index.path, len(f.files)) for f in result.filesets) == [
        ("CASE.MRXS", 3), ("SLIDE.AFI", 2)]
    assert result.members == []


def test_a_companion_of_two_slides_or_of_the_wrong_kind_is_refused(store):
    other = AFI.replace(b"s_FITC.svs", b"s_DAPI.svs")
    files = {"s.afi": AFI, "t.afi": other, "s_DAPI.svs": b"a", "s_FITC.svs": b"b"}
    error = refused(store, stored(store, zip_bytes(files)), "zip")
    assert error.code == "slide.shared_companion" and "s_DAPI.svs" in error.message
    wrong = NDPIS.replace(b"s-FITC.ndpi", b"patient.dcm")
    files = {"s.ndpis": wrong, "s-DAPI.ndpi": b"a", "patient.dcm": b"b"}
    error = refused(store, stored(store, zip_bytes(files)), "zip")
    assert error.code == "slide.bad_companion" and "patient.dcm" in error.message
    # A file in a set's folder that is not of the set stays a file of its own.
    vsi = {"v.vsi": b"II*\x00", "_v_/stack1/frame_t.ets": b"e", "_v_/notes.txt": b"n"}
    result = unpack(store, stored(store, zip_bytes(vsi)), "zip", GENEROUS)
    assert [m.path for m in result.members] == ["_v_/notes.txt"]


# --- a zip unpacked member by member from where each lies, where the store maps its objects ----


def stored_zip(files: dict[str, bytes]) -> bytearray:
    return bytearray(zip_bytes(files, zipfile.ZIP_STORED))


def test_a_zip_on_the_local_store_is_unpacked_from_where_each_member_lies(tmp_path,
                                                                         monkeypatch):
    """Every member, stored or deflated, is unpacked from its span of the archive (nothing is
    streamed), in the archive's order, with its own bytes and hash; an archive inside (a zip, a
    tar.gz, itself sniffed from its unpacked head) still gives way to its members."""
    import hashlib

    import stream_unzip

    def streamed(*args, **kwargs):
        raise AssertionError("streamed, not read where the members lie")

    monkeypatch.setattr(stream_unzip, "stream_unzip", streamed)
    monkeypatch.setattr("imgest_unpacker.archives.READ", 64 * 1024)  # several reads a member
    store = LocalStore(tmp_path / "store", fsync=False)
    files = {f"s{i:02}.dcm": os.urandom(5000 + i) for i in range(30)}
    files["inner.zip"] = zip_bytes({"a.dcm": b"A" * 10}, zipfile.ZIP_STORED)
    files["inner.tgz"] = tar_bytes({"t.dcm": b"T" * 70_000}, "w:gz")
    files["big.dcm"] = os.urandom(3 * 1024 * 1024 + 17)
    files["zeros.dcm"] = bytes(5 * 1024 * 1024)  # deflated a chunk at a time
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i, (name, content) in enumerate(files.items()):
            zf.writestr(name, content, zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
    obj = stored(store, out.getvalue())
    result = unpack(store, obj, "zip", GENEROUS)
    inside = {"inner.zip/a.dcm": b"A" * 10, "inner.tgz/t.dcm": b"T" * 70_000}
    assert [m.path for m in result.members] == [
        p for p in files if not p.startswith("inner.")] + ["inner.tgz/t.dcm", "inner.zip/a.dcm"]
    contents = {**files, **inside}
    for m in result.members:
        with store.open(m.key) as f:
            assert f.read() == contents[m.path]
        assert m.sha256 == hashlib.sha256(contents[m.path]).hexdigest()


def set_field(data: bytearray, name: bytes, local: int, central: int, value: int) -> None:
    """A 4-byte field of a member's local header (at `local`) and directory entry (`central`)."""
    for signature, named, field in ((b"PK\x03\x04", 30, local), (b"PK\x01\x02", 46, central)):
        at = data.index(signature)
        while data[at + named:at + named + len(name)] != name:
            at = data.index(signature, at + 1)
        data[at + field:at + field + 4] = value.to_bytes(4, "little")


@pytest.mark.parametrize("window", [None, 4096])
@pytest.mark.parametrize("which", [0, 7, 19])
@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_member_whose_crc_does_not_match_refuses_the_archive(store, method, which, window,
                                                               monkeypatch):
    """Checked as the bytes are unpacked (a few KiB of the archive at a time, if made so here):
    the member written before its check failed is not left behind, nor the others."""
    if window:
        monkeypatch.setattr("imgest_unpacker.archives.READ", window)
    files = {f"f{i:02}.dcm": os.urandom(9_000) * 3 for i in range(20)}
    data = bytearray(zip_bytes(files, method))
    name = f"f{which:02}.dcm"
    set_field(data, name.encode(), 14, 16, zlib.crc32(files[name]) ^ 1)
    error = refused(store, stored(store, bytes(data)), "zip")
    assert error.code == "archive.corrupt" and "CRC" in error.message
    assert unpacked(store, stored(store, zip_bytes(files, method)), "zip") == files  # intact


def test_a_member_that_unpacks_past_its_declared_size_is_refused(store):
    """A member that declares a smaller size than it has: refused as its bytes pass that size
    (a bomb's way to slip past the limits)."""
    data = bytearray(zip_bytes({"a.dcm": b"a", "big.bin": os.urandom(2 * 1024**2)}))
    set_field(data, b"big.bin", 22, 24, 1000)
    error = refused(store, stored(store, bytes(data)), "zip")
    assert error.code == "archive.corrupt"
    if isinstance(store, LocalStore):  # (streamed from S3, stream-unzip says it its own way)
        assert "more than the 1000 bytes" in error.message


def test_a_deflated_member_cut_short_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    content = os.urandom(50_000) * 2
    data = bytearray(zip_bytes({"a.dcm": content, "b.dcm": b"b"}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        packed = zf.getinfo("a.dcm").compress_size
    set_field(data, b"a.dcm", 18, 20, packed // 2)  # its deflate stream ends past its span
    error = refused(store, stored(store, bytes(data)), "zip")
    assert error.code == "archive.corrupt" and f"not the {len(content)}" in error.message


@pytest.mark.parametrize("size", [CHUNK_SIZE + 5, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 100,
                                  3 * CHUNK_SIZE - 1])
def test_deflated_members_just_past_a_chunk_are_whole(store, size):
    """zlib may hold back output when the input is all in (a chunk's worth came out): it is
    drained, not lost."""
    files = {"zeros.dcm": bytes(size), "ab.dcm": (b"ab" * size)[:size],
             "tail.dcm": os.urandom(size // 2) + bytes(size - size // 2)}
    assert unpacked(store, stored(store, zip_bytes(files)), "zip") == files


def test_a_local_header_outside_the_archive_or_encrypted_there_refuses_it(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    data = bytearray(zip_bytes({"a.dcm": b"a" * 100, "b.dcm": b"b" * 100}))
    end = data.index(b"PK\x05\x06")
    shifted = bytearray(data)  # the directory's offset said 100 bytes later: headers before 0
    shifted[end + 16:end + 20] = (int.from_bytes(data[end + 16:end + 20], "little") + 100
                                  ).to_bytes(4, "little")
    error = refused(store, stored(store, bytes(shifted)), "zip")
    assert error.code == "archive.corrupt" and "lies outside" in error.message
    second = data.index(b"PK\x03\x04", 4)
    data[second + 6] |= 0x1  # encrypted, says the local header (not the directory)
    assert refused(store, stored(store, bytes(data)), "zip").code == "archive.corrupt"


def test_stored_members_that_overlap_or_run_past_the_directory_are_refused(tmp_path):
    """Where members are copied in place, each span must follow the last, before the central
    directory: two entries sharing bytes are how some zip bombs multiply themselves. (Streamed,
    from the front, the second would never be reached.)"""
    store = LocalStore(tmp_path / "store", fsync=False)
    inner = zip_bytes({"b.dcm": b"B" * 500}, zipfile.ZIP_STORED)
    data = stored_zip({"a.dcm": inner})
    # The central directory gains an entry for the member whose header lies inside a.dcm.
    with zipfile.ZipFile(io.BytesIO(inner)) as zf:
        inside = zf.infolist()[0]
    start_in_outer = data.index(inner)
    central = data.index(b"PK\x01\x02", start_in_outer + len(inner))
    entry = bytearray(inner[inner.index(b"PK\x01\x02"):inner.index(b"PK\x05\x06")])
    entry[42:46] = (start_in_outer + inside.header_offset).to_bytes(4, "little")
    end = data.index(b"PK\x05\x06", central)
    eocd = bytearray(data[end:])
    eocd[8:10] = eocd[10:12] = (2).to_bytes(2, "little")
    eocd[12:16] = (end - central + len(entry)).to_bytes(4, "little")
    overlapping = bytes(data[:end]) + bytes(entry) + bytes(eocd)
    error = refused(store, stored(store, overlapping), "zip")
    assert error.code == "archive.corrupt" and "overlaps" in error.message
    # A size in the directory that reaches past the member's bytes.
    data = stored_zip({"a.dcm": b"a" * 100, "b.dcm": b"b" * 100})
    second = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)
    for field in (20, 24):  # compressed and uncompressed sizes
        data[second + field:second + field + 4] = (10_000).to_bytes(4, "little")
    error = refused(store, stored(store, bytes(data)), "zip")
    assert error.code == "archive.corrupt" and "past the central directory" in error.message


def test_a_local_header_that_does_not_store_its_member_refuses_the_archive(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    data = stored_zip({"a.dcm": b"a" * 100, "b.dcm": b"b" * 100})
    second = data.index(b"PK\x03\x04", 4)
    data[second + 8:second + 10] = (8).to_bytes(2, "little")  # deflated, says the header
    error = refused(store, stored(store, bytes(data)), "zip")
    assert error.code == "archive.corrupt" and "'b.dcm'" in error.message
    data[second:second + 4] = b"PK\x07\x08"  # no local header where the directory points
    assert refused(store, stored(store, bytes(data)), "zip").code == "archive.corrupt"


def _told_groups(store: ObjectStore, groups: list[list[tuple[str, bytes | None]]]):
    """A `tell` that notes each group as it comes: each member's path, and its bytes as the
    store has them at that moment (None if they are not there)."""
    def tell(members) -> None:
        groups.append([(m.path, _stored_bytes(store, m.key)) for m in members])
    return tell


def _stored_bytes(store: ObjectStore, key: str) -> bytes | None:
    try:
        with store.open(key) as f:
            return f.read()
    except ObjectNotFound:
        return None


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_members_are_told_of_in_groups_as_they_unpack_unless_a_slide_may_claim_them(
        store, fmt):
    """While the archive unpacks, members go in groups (of at most EARLY_MEMBERS), each
    member already in the store; what a multi-file slide might claim (an .svs, a .tif: only
    the whole listing says) waits for the end, with the members unpacked since the last
    group. Together: every member once, in the archive's order."""
    from imgest_unpacker.app import EARLY_MEMBERS

    files = {f"study/IM{i:04}.dcm": f"slice {i}".encode() for i in range(2 * EARLY_MEMBERS + 30)}
    files["slides/a.svs"] = b"II*\x00svs"
    files["slides/b.TIF"] = b"II*\x00tif"
    files.update({f"late/IM{i}.dcm": b"late" for i in range(5)})
    body = zip_bytes(files) if fmt == "zip" else tar_bytes(files, "w:gz")
    groups: list[list[tuple[str, bytes | None]]] = []
    result = unpack(store, stored(store, body), fmt, GENEROUS, tell=_told_groups(store, groups))
    told = [item for group in groups for item in group]
    assert len(groups) >= 2 and all(0 < len(g) <= EARLY_MEMBERS for g in groups)
    assert all(files[path] == data for path, data in told)  # in the store when told
    assert result.told == len(told)
    at_end = [m.path for m in result.members]
    assert "slides/a.svs" in at_end and "slides/b.TIF" in at_end
    assert not {"slides/a.svs", "slides/b.TIF"} & {path for path, _ in told}
    assert sorted([path for path, _ in told] + at_end) == sorted(files)
    assert [path for path, _ in told] == [p for p in files if p in dict(told)]  # in order


def test_an_archive_refused_after_members_were_told_of_leaves_none_of_them(store):
    """A damaged member near the end (its CRC-32 fails) refuses the whole archive even after
    the members before it were told of: every member staged, told or not, is deleted again."""
    from imgest_unpacker.app import EARLY_MEMBERS

    files = {f"IM{i:04}.dcm": os.urandom(200) for i in range(EARLY_MEMBERS + 20)}
    body = bytearray(zip_bytes(files, zipfile.ZIP_STORED))
    last = body.rfind(files[max(files)])
    body[last] ^= 0xFF  # its bytes, not its size: only the CRC-32 can tell
    obj = stored(store, bytes(body))
    groups: list[list[tuple[str, bytes | None]]] = []
    with pytest.raises(ArchiveError) as err:
        unpack(store, obj, "zip", GENEROUS, tell=_told_groups(store, groups))
    assert err.value.code == "archive.corrupt"
    assert groups and all(data is not None for g in groups for _, data in g)
    assert not list(store.list(f"staging/{obj.upload_id}/members/"))
