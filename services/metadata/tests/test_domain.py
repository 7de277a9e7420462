"""imgest_metadata: identify() on real DICOM/JPEG bytes, and read_headers() on a LocalStore."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import piexif
import pydicom
import pytest
from imgest_contracts import FileKind, Fileset, FilesetFile, FileStaged, Source
from imgest_metadata.app import read_headers
from imgest_metadata.domain import (
    DICOM_FIELDS,
    HEAD_BYTES,
    Claim,
    FileKeys,
    Identified,
    NeedMore,
    _text,
    dicom_texts,
    encapsulated_cut,
    fileset,
    first_claims,
    identify,
    label,
    sniff,
    tiff_cut,
)
from imgest_runtime.store import LocalStore
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
CT_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def _testfile(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _write(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    return buf.getvalue()


def _padded_ct(pad: int, second: int | None = None) -> bytes:
    """CT_small with a private OB element of `pad` bytes (and optionally a second of `second`)."""
    ds = _ct()
    block = ds.private_block(0x0009, "IMGEST TEST", create=True)
    block.add_new(0x01, "OB", b"\xab" * pad)
    if second is not None:
        block.add_new(0x02, "OB", b"\xcd" * second)
    return _write(ds)


# --- DICOM ---------------------------------------------------------------------------------------


def test_identify_ct_small() -> None:
    data = _testfile("CT_small.dcm")
    found = identify(data, len(data), "upload/CT_small.dcm")
    assert found.reason is None
    assert found.kind is FileKind.dicom
    h = found.hints
    assert (h.study_uid, h.series_uid, h.sop_instance_uid) == (CT_STUDY, CT_SERIES, CT_SOP)
    assert h.modality == "CT"
    assert h.scan == "1"
    assert h.subject == "CompressedSamples_CT1"  # PatientName, made a label
    assert h.session == "1CT1"  # PatientID
    assert h.project == "e_1" and h.auto_archive is None  # Study Description, made a label
    assert found.metadata["Modality"] == "CT"
    assert found.metadata["PatientID"] == "1CT1"
    assert found.metadata["StudyDate"] == "20040119"
    assert found.metadata["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert None not in found.metadata.values()


def test_identify_mr_small() -> None:
    data = _testfile("MR_small.dcm")
    found = identify(data, len(data), "MR_small.dcm")
    assert found.reason is None and found.kind is FileKind.dicom
    assert found.hints.modality == "MR"
    assert found.hints.study_uid and found.hints.series_uid and found.hints.sop_instance_uid
    assert found.hints.study_uid != CT_STUDY
    assert found.hints.session == "4MR1"


def test_identify_dicom_found_by_magic_not_name() -> None:
    data = _testfile("CT_small.dcm")
    assert identify(data, len(data), "no-extension").hints.sop_instance_uid == CT_SOP


def test_identify_needs_more_than_200_bytes() -> None:
    data = _testfile("CT_small.dcm")
    with pytest.raises(NeedMore):
        identify(data[:200], len(data), "CT_small.dcm")


def test_identify_headers_only_need_the_bytes_before_pixel_data() -> None:
    data = _testfile("CT_small.dcm")
    head = data[:10_000]  # the header ends at about 6.3 kB; the pixel data follows
    found = identify(head, len(data), "CT_small.dcm")
    assert found.reason is None and found.hints.sop_instance_uid == CT_SOP


def test_identify_xnat_fields_in_patient_comments() -> None:
    ds = _ct()
    ds.PatientComments = "Project: P1 Subject: S1 Session: E1"
    data = _write(ds)
    found = identify(data, len(data), "x.dcm")
    assert found.reason is None
    assert (found.hints.project, found.hints.subject, found.hints.session) == ("P1", "S1", "E1")
    assert found.hints.study_uid == CT_STUDY


def test_identify_xnat_fields_in_study_comments_with_auto_archive() -> None:
    ds = _ct()
    ds.StudyComments = "project:Proj_A; subject: Sub-7, session:Visit.1 AA:false"
    data = _write(ds)
    h = identify(data, len(data), "x.dcm").hints
    assert h.project == "Proj_A"
    assert h.subject == "Sub-7"
    assert h.session == "Visit_1"  # '.' is not allowed in an XNAT label
    assert h.auto_archive is False


def test_identify_dicom_missing_sop_instance_uid() -> None:
    ds = _ct()
    del ds.SOPInstanceUID
    data = _write(ds)
    found = identify(data, len(data), "x.dcm")
    assert found.kind is FileKind.dicom
    assert found.reason is not None
    assert found.reason.code == "dicom.missing_uid"
    assert "SOPInstanceUID" in found.reason.message
    assert "StudyInstanceUID" not in found.reason.message


def test_identify_dicom_blank_study_uid_counts_as_missing() -> None:
    ds = _ct()
    ds.StudyInstanceUID = ""
    data = _write(ds)
    found = identify(data, len(data), "x.dcm")
    assert found.reason is not None and found.reason.code == "dicom.missing_uid"
    assert "StudyInstanceUID" in found.reason.message


@pytest.mark.parametrize(("keyword", "uid"), [
    ("SOPInstanceUID", "1.2.3//4"), ("SOPInstanceUID", "1.2.3/../../x"),
    ("StudyInstanceUID", "1.2.840.99//x1"), ("SeriesInstanceUID", "1." + "2" * 130),
    ("SOPInstanceUID", "1.2.3."), ("StudyInstanceUID", "1.2.x")])
def test_identify_dicom_refuses_what_is_not_a_uid(keyword: str, uid: str) -> None:
    """A UID names the file and its folders in the archive: a slash, a letter or more than
    the catalogue holds are refused, not placed."""
    ds = _ct()
    setattr(ds, keyword, uid)
    data = _write(ds)
    found = identify(data, len(data), "x.dcm")
    assert found.reason is not None and found.reason.code == "dicom.bad_uid"
    assert keyword in found.reason.message and repr(uid) in found.reason.message


@pytest.mark.parametrize(
    ("cut", "code"),
    [
        (1000, "dicom.missing_uid"),  # the file ends before the series and study UIDs
        (20_000, "dicom.truncated"),  # the header is whole, the pixel data cut short
    ],
)
def test_identify_truncated_dicom_read_in_full(cut: int, code: str | None) -> None:
    data = _testfile("CT_small.dcm")[:cut]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = identify(data, len(data), "CT_small.dcm")
    assert isinstance(found, Identified) and found.kind is FileKind.dicom
    assert (found.reason.code if found.reason else None) == code


def test_identify_garbage_named_dcm_is_not_taken_for_dicom() -> None:
    data = random.Random(7).randbytes(4096)
    found = identify(data, len(data), "garbage.dcm")
    assert found.kind is FileKind.unknown
    assert found.reason is not None and found.reason.code == "file.unsupported_type"


# Cut points inside a 4-byte length field: (0002,0000) UL value at 140..143, the explicit-VR
# long length of an element at 152..155, and the length of the pixel data element at 6296..6299.
@pytest.mark.parametrize("cut", [141, 153, 6297])
def test_identify_truncated_dicom_never_raises(cut: int) -> None:
    data = _testfile("CT_small.dcm")[:cut]
    found = identify(data, len(data), "CT_small.dcm")
    assert found.kind is FileKind.dicom and found.reason is not None


def test_identify_partial_head_ending_in_a_length_field_needs_more() -> None:
    data = _testfile("CT_small.dcm")
    with pytest.raises(NeedMore):
        identify(data[:6297], len(data), "CT_small.dcm")


def _by_pydicom(data: bytes) -> dict[str, str | None]:
    """Each field as pydicom itself converts it (what dicom_texts must give)."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    return {k: _text(ds, k) for k in DICOM_FIELDS}


def _fields_of(data: bytes) -> dict[str, str | None]:
    return dicom_texts(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True))


@pytest.mark.parametrize("name", sorted(
    Path(f).name for f in get_testdata_files("*.dcm")
    if Path(f).name not in ("MR_truncated.dcm", "rtplan_truncated.dcm")))
def test_dicom_texts_read_from_the_bytes_are_what_pydicom_reads(name: str) -> None:
    """Every DICOM file pydicom ships: explicit and implicit VR, big endian, no preamble."""
    data = _testfile(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _fields_of(data) == _by_pydicom(data)


@pytest.mark.parametrize(("charset", "name", "read"), [
    (None, "Smith^John", "Smith^John"), ("", "Plain^Name", "Plain^Name"),
    ("ISO_IR 6", "Doe^Jane  ", "Doe^Jane"), ("ISO_IR 100", "Müller^Jörg", "Müller^Jörg"),
    ("ISO_IR 192", "Müller^Jörg=山田^太郎", "Müller^Jörg=山田^太郎"),
    ("ISO_IR 144", "Иванов^Иван", "Иванов^Иван"),
    ("ISO_IR 100", "Smith^John== ", "Smith^John"),  # empty groups at the end are dropped
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "Yamada^Tarou=山田^太郎"),
    (" ISO_IR 192", "Müller", None),  # a term with a leading space: as pydicom reads it
    ("NOT A CHARSET", "X^Y", "X^Y")])
@pytest.mark.parametrize("transfer", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                      ExplicitVRBigEndian])
def test_dicom_texts_in_character_sets_and_odd_values(charset: str | list[str] | None,
                                                       name: str, read: str | None,
                                                       transfer: str
                                                       ) -> None:
    ds = _ct()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = "  leading spaces"
    ds.PatientComments = "Project: P1\\Subject: S1 "  # LT: a backslash is text
    ds.Modality = "CT\\MR"  # two values: pydicom's own text of them
    ds.AccessionNumber = ""
    ds.StudyComments = "Session: X\x00"
    ds.InstanceNumber = " 7 "
    ds.SeriesNumber = "98765"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        del ds.PixelData  # (pydicom does not turn pixel data big endian)
        ds.file_meta.TransferSyntaxUID = transfer
        pydicom.dcmwrite(buf, ds, little_endian=transfer != ExplicitVRBigEndian,
                         implicit_vr=transfer == ImplicitVRLittleEndian, force_encoding=True)
        data = buf.getvalue().replace(b"98765 ", b"inf   ")  # an IS pydicom cannot take
        assert _fields_of(data) == _by_pydicom(data)
        assert read is None or _fields_of(data)["PatientName"] == read
        assert _fields_of(data)["SeriesNumber"] is None


# --- photos, other files -------------------------------------------------------------------------


def _jpeg_with_exif() -> bytes:
    exif = piexif.dump({
        "0th": {piexif.ImageIFD.Make: b"Canon", piexif.ImageIFD.Model: b"EOS 5D",
                piexif.ImageIFD.Software: b"imgest-tests"},
        "Exif": {piexif.ExifIFD.DateTimeOriginal: b"2024:01:02 03:04:05"},
    })
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_identify_jpeg_with_exif() -> None:
    data = _jpeg_with_exif()
    found = identify(data, len(data), "photo.jpg")
    assert found.kind is FileKind.photo
    assert found.reason is None
    assert found.metadata["Make"] == "Canon"
    assert found.metadata["Model"] == "EOS 5D"
    assert found.metadata["Software"] == "imgest-tests"
    assert found.metadata["DateTimeOriginal"] == "2024:01:02 03:04:05"
    assert (found.metadata["width"], found.metadata["height"]) == (32, 24)
    assert found.metadata["format"] == "jpeg"
    assert found.hints.study_uid is None


def test_identify_png_without_exif_is_a_photo() -> None:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = buf.getvalue()
    found = identify(data, len(data), "a.png")
    assert found.kind is FileKind.photo and found.reason is None
    assert found.metadata == {"format": "png", "width": 4, "height": 4}


def test_a_multi_file_slide_with_an_empty_part_is_refused() -> None:
    def part(path: str, size: int) -> FilesetFile:
        return FilesetFile(path=path, object_key=f"staging/u1/{path}", size=size,
                           sha256="0" * 64)

    whole = Fileset(format="mrxs", files=[part("s/Slidedat.ini", 40), part("s/Data0000.dat",
                                                                             900)])
    found = fileset("up.zip/s.mrxs", 5, whole)
    assert found.reason is None and found.kind is FileKind.slide
    assert found.metadata == {"format": "mrxs", "vendor": "mrxs", "files": 3, "bytes": 945}
    whole.files.append(part("s/Data0001.dat", 0))
    found = fileset("up.zip/s.mrxs", 5, whole)
    assert found.reason is not None and found.reason.code == "slide.empty_companion"
    assert found.reason.message == ("The MRXS slide 'up.zip/s.mrxs' has empty files among its "
                                    "parts: s/Data0001.dat.")


def test_identify_random_bytes_unsupported() -> None:
    data = b"\x01" + random.Random(1).randbytes(4095)
    found = identify(data, len(data), "blob.bin")
    assert found.kind is FileKind.unknown
    assert found.reason is not None and found.reason.code == "file.unsupported_type"


def test_identify_empty_file() -> None:
    found = identify(b"", 0, "empty.txt")
    assert found.kind is FileKind.unknown
    assert found.reason is not None and found.reason.code == "file.empty"


def test_identify_empty_dcm_is_empty() -> None:
    found = identify(b"", 0, "empty.dcm")
    assert found.reason is not None and found.reason.code == "file.empty"


@pytest.mark.parametrize(
    ("head", "path", "fmt"),
    [
        (b"\x00" * 128 + b"DICM", "x", "dicom"),
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", "no-name", "dicom"),  # no preamble
        (b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100", "x", "dicom"),  # implicit VR
        (b"\x08\x00\x05\x00\xff\xff\xff\x7f", "x.dcm", "unknown"),  # the name is no proof
        (b"\xff\xd8\xff\xe0", "x.png", "jpeg"),
        (b"\x89PNG\r\n\x1a\n", "x.jpg", "png"),
        (b"II*\x00", "x", "tiff"),
        (b"MM\x00*", "x", "tiff"),
        (b"II+\x00", "x.svs", "bigtiff"),
        (b"PK\x03\x04", "x.zip", "unknown"),
        (b"id,name\n1,a\n2,b\n", "cases", "csv"),
        (b"id;name\n1;a\n", "x.bin", "csv"),
        (b"just words\n", "notes.csv", "csv"),
        (b"just words\n", "notes.txt", "unknown"),
        (b"a,b\x00\n", "x.csv", "unknown"),
        (b"", "x", "unknown"),
    ],
)
def test_sniff(head: bytes, path: str, fmt: str) -> None:
    assert sniff(head, path) == fmt


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Doe^John", "Doe_John"), ("  a b  ", "a_b"), ("^^", None), (None, None), ("", None),
     ("x" * 100, "x" * 64), (42, "42"), ("ok_label-1", "ok_label-1")],
)
def test_label(value: object, expected: str | None) -> None:
    assert label(value) == expected


# --- read_headers on a real store ----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


def _staged(store: LocalStore, data: bytes, path: str = "big.dcm") -> FileStaged:
    key = f"staging/u1/objects/{path}"
    put = store.put(key, io.BytesIO(data))
    return FileStaged(upload_id="u1", file_id="f" * 32, object_key=key, path=path, size=put.size,
                      sha256=put.sha256, source=Source(object_key=key, files_total=1))


class _CountingStore(LocalStore):
    def __init__(self, root: Path):
        super().__init__(root, fsync=False)
        self.reads: list[tuple[int, int]] = []

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read_range(key, offset, length)


def test_read_headers_small_file_reads_once(tmp_path: Path) -> None:
    store = _CountingStore(tmp_path / "s")
    data = _testfile("CT_small.dcm")
    found = read_headers(store, _staged(store, data), limit=1024**2)
    assert found.reason is None and found.hints.sop_instance_uid == CT_SOP
    assert store.reads == [(0, len(data))]


def test_read_headers_large_pixel_data_reads_only_the_head(tmp_path: Path) -> None:
    store = _CountingStore(tmp_path / "s")
    ds = _ct()
    ds.Rows, ds.Columns = 512, 512
    ds.PixelData = bytes(512 * 512 * 2)  # 512 KiB of pixels after a ~6 kB header
    data = _write(ds)
    assert len(data) > 8 * HEAD_BYTES
    found = read_headers(store, _staged(store, data), limit=1024**2)
    assert found.reason is None and found.hints.sop_instance_uid == CT_SOP
    assert store.reads == [(0, HEAD_BYTES)]


def test_read_headers_compressed_pixel_data_reads_the_head_and_the_last_8_bytes(
        tmp_path: Path) -> None:
    store = _CountingStore(tmp_path / "s")
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_dcmtk_+eb+cy+np.dcm"))
    ds.PixelData = encapsulate([bytes(300_000)])
    data = _write(ds)
    found = read_headers(store, _staged(store, data), limit=1024**2)
    assert found.reason is None and found.kind is FileKind.dicom
    assert store.reads == [(0, HEAD_BYTES), (len(data) - 8, 8)]
    cut = read_headers(store, _staged(store, data[:200_000], "cut.dcm"), limit=1024**2)
    assert cut.reason is not None and cut.reason.code == "dicom.truncated"


def test_encapsulated_cut_walks_the_items_when_the_file_does_not_end_with_them() -> None:
    items = b"\xfe\xff\x00\xe0" + (0).to_bytes(4, "little")  # an empty offset table
    items += b"\xfe\xff\x00\xe0" + (4).to_bytes(4, "little") + b"abcd"
    end = b"\xfe\xff\xdd\xe0" + bytes(4)
    after = b"\xfc\xff\xfc\xffOB\x00\x00" + (2).to_bytes(4, "little") + bytes(2)
    reads: list[tuple[int, int]] = []

    def cut(data: bytes):
        reads.clear()
        return encapsulated_cut(lambda o, n: reads.append((o, n)) or data[o:o + n], 0,
                                len(data))

    assert cut(items + end) is None and reads == [(len(items), 8)]  # its end tells
    assert cut(items + end + after) is None and len(reads) == 4  # walked: 3 items' headers
    assert cut(items) is None  # every fragment whole, the delimiter left out by its writer
    for data, code in [(items[:-1], "dicom.truncated"), (items + end[:4], "dicom.truncated"),
                       (items[:8] + b"garbage!" + after, "dicom.malformed")]:
        reason = cut(data)
        assert reason is not None and reason.code == code, data


def test_read_headers_walks_many_fragments_in_a_few_reads(tmp_path: Path) -> None:
    """Elements after the pixel data make its items be walked: their 8-byte headers are read
    a window at a time, not one request each (on S3, each is a GET)."""
    store = _CountingStore(tmp_path / "s")
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_dcmtk_+eb+cy+np.dcm"))
    ds.PixelData = encapsulate([bytes(100)] * 2000)
    padding = b"\xfc\xff\xfc\xffOB\x00\x00" + (16).to_bytes(4, "little") + bytes(16)
    data = _write(ds) + padding
    found = read_headers(store, _staged(store, data), limit=1024**2)
    assert found.reason is None and found.kind is FileKind.dicom
    assert len(store.reads) <= 4, store.reads[:10]


def test_tiff_cut_compares_byte_counts_only_where_the_directory_has_them() -> None:
    for directory, code in [
        (((60, 0), (50, 0), True), None),  # whole, with a sparse tile
        (((100,), (50,), True), "tiff.truncated"),  # runs past the end
        (((100,), (5000,), False), None),  # its count estimated by tifffile, not read
        (((120,), (50,), False), "tiff.truncated"),  # begins past the end
        (((0,), (0,), False), None)]:
        reason = tiff_cut([((10,), (10,), True), directory], 120)
        assert (reason.code if reason else None) == code, directory
        assert reason is None or "directory 1 " in reason.message


def test_read_headers_past_64k(tmp_path: Path) -> None:
    store = _CountingStore(tmp_path / "s")
    data = _padded_ct(100_000)  # a 100 kB private element before Patient/Study/Series
    assert len(data) > 2 * HEAD_BYTES
    with pytest.raises(NeedMore):
        identify(data[:HEAD_BYTES], len(data), "big.dcm")
    found = read_headers(store, _staged(store, data), limit=1024**2)
    assert found.reason is None
    assert found.hints.study_uid == CT_STUDY and found.hints.sop_instance_uid == CT_SOP
    assert store.reads == [(0, HEAD_BYTES), (0, min(4 * HEAD_BYTES, len(data)))]


def test_read_headers_refuses_headers_past_the_limit(store: LocalStore) -> None:
    data = _padded_ct(100_000)
    found = read_headers(store, _staged(store, data), limit=HEAD_BYTES)
    assert found.kind is FileKind.dicom
    assert found.reason is not None and found.reason.code == "file.headers_too_large"


def test_read_headers_photo_and_empty(store: LocalStore) -> None:
    photo = read_headers(store, _staged(store, _jpeg_with_exif(), "p.jpg"), limit=1024**2)
    assert photo.kind is FileKind.photo and photo.metadata["Make"] == "Canon"
    empty = read_headers(store, _staged(store, b"", "e.txt"), limit=1024**2)
    assert empty.reason is not None and empty.reason.code == "file.empty"


def test_read_headers_boundary_inside_a_length_field(store: LocalStore) -> None:
    probe = _padded_ct(65_000, second=10)
    start = probe.find(b"\xcd" * 10) - 12  # the second private element's header
    # move that header so its 4-byte length field (header bytes 8..11) straddles 64 KiB
    data = _padded_ct(65_000 + (HEAD_BYTES - 10) - start, second=10)
    start = data.find(b"\xcd" * 10) - 12
    assert start + 8 < HEAD_BYTES < start + 12
    found = read_headers(store, _staged(store, data), limit=1024**2)
    assert found.reason is None and found.hints.sop_instance_uid == CT_SOP


def _keys(fid: str, sha: str, sop: str | None = None, upload: str = "u1") -> FileKeys:
    return FileKeys(upload, fid, f"{fid}.dcm", (f"sha256:{sha}",) + ((f"sop:{sop}",) if sop else ()))


def test_first_claims_the_first_of_a_content_or_an_instance_wins_in_order() -> None:
    files = [_keys("a", "x", "1"), _keys("b", "x", "2"), _keys("c", "y", "1"), _keys("d", "z", "3")]
    duplicates, new = first_claims(files, {})
    assert {f: c.file_id for f, c in duplicates.items()} == {"b": "a", "c": "a"}
    assert duplicates["b"].key == "sha256:x" and duplicates["c"].key == "sop:1"
    # c claimed its content before its instance was found taken: that claim is withdrawn.
    assert set(new) == {("u1", "sha256:x"), ("u1", "sop:1"), ("u1", "sha256:z"), ("u1", "sop:3")}


def test_first_claims_knows_earlier_batches_uploads_apart_and_redelivery() -> None:
    known = {("u1", "sha256:x"): Claim("a", "a.dcm", "sha256:x")}
    files = [_keys("a", "x"), _keys("b", "x"), _keys("e", "x", upload="u2")]
    duplicates, new = first_claims(files, known)
    assert list(duplicates) == ["b"]  # a holds its own key: delivered again, no duplicate
    assert set(new) == {("u2", "sha256:x")}  # another upload's same content is its own first


def test_read_headers_refuses_a_file_gone_from_staging(store: LocalStore) -> None:
    # Its upload was cancelled: retrying would only hold up the files behind it.
    staged = _staged(store, _padded_ct(10))
    store.delete(staged.object_key)
    found = read_headers(store, staged, limit=1024**2)
    assert found.reason is not None and found.reason.code == "store.object_missing"


def test_read_headers_refuses_a_tiff_gone_while_read(tmp_path: Path) -> None:
    class Vanishing(LocalStore):  # the object goes once its head has been read
        def read_range(self, key: str, offset: int, length: int) -> bytes:
            data = super().read_range(key, offset, length)
            self.delete(key)
            return data

    store = Vanishing(tmp_path / "s", fsync=False)
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="TIFF")
    found = read_headers(store, _staged(store, out.getvalue(), "p.tif"), limit=1024**2)
    assert found.reason is not None and found.reason.code == "store.object_missing"
