"""imgest_metadata: every kind of file read from a real store (DICOM from pydicom's own test
files, photos made with Pillow/piexif, slides made with tifffile, CSVs), project rules, and a
fuzz test: nothing raises past `read_headers`."""

from __future__ import annotations

import io
import struct
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import piexif
import pydicom
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgest_contracts import FileKind, FileStaged, ProjectRules, Source
from imgest_metadata.app import read_headers
from imgest_metadata.domain import HEAD_BYTES, CsvCheck, check_rules, identify
from imgest_runtime.store import LocalStore
from PIL import Image
from pydicom.data import get_testdata_file

DICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# pydicom's own files that are broken on purpose, or lack what a study needs: refused, each
# with its reason. Every other bundled file is a good instance (many modalities and syntaxes).
REFUSED = {"MR_truncated.dcm": "dicom.truncated", "no_meta.dcm": "file.unsupported_type"}
NO_UIDS = {"JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
           "SC_rgb_jls_lossy_sample.dcm", "UN_sequence.dcm", "empty_charset_LEI.dcm",
           "meta_missing_tsyntax.dcm", "nested_priv_SQ.dcm", "no_meta_group_length.dcm",
           "priv_SQ.dcm"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    return LocalStore(tmp_path_factory.mktemp("store"), fsync=False)


def staged(store: LocalStore, data: bytes, path: str) -> FileStaged:
    key = f"staging/u1/{abs(hash((path, data))):x}/{Path(path).name}"
    put = store.put(key, io.BytesIO(data))
    return FileStaged(upload_id="u1", file_id="f" * 32, object_key=key, path=path, size=put.size,
                      sha256=put.sha256, source=Source(object_key=key, files_total=1))


def read(store: LocalStore, data: bytes, path: str = "file"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_headers(store, staged(store, data, path), limit=4 * 1024**2)


# --- DICOM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in DICOM_FILES.glob("*.dcm")))
def test_every_pydicom_test_file(store: LocalStore, name: str) -> None:
    found = read(store, (DICOM_FILES / name).read_bytes(), name)
    code = found.reason.code if found.reason else None
    if name in REFUSED:
        assert code == REFUSED[name]
    elif name in NO_UIDS:
        assert (found.kind, code) == (FileKind.dicom, "dicom.missing_uid")
    else:
        assert (found.kind, code) == (FileKind.dicom, None), found.reason
        assert found.hints.study_uid and found.hints.series_uid and found.hints.sop_instance_uid
        assert found.metadata["SOPInstanceUID"] == found.hints.sop_instance_uid


def test_dicom_fields_and_routing_hints(store: LocalStore) -> None:
    ds = pydicom.dcmread(DICOM_FILES / "CT_small.dcm")
    ds.AccessionNumber, ds.StudyDescription, ds.SeriesDescription = "ACC1", "Head", "Axial"
    ds.InstanceNumber = 7
    ds.AdditionalPatientHistory = "Project: PX Subject: SX Session: EX AA: true"
    buf = io.BytesIO()
    ds.save_as(buf)
    found = read(store, buf.getvalue(), "ct.dcm")
    m = found.metadata
    assert found.reason is None
    assert (m["AccessionNumber"], m["StudyDescription"], m["SeriesDescription"]) == (
        "ACC1", "Head", "Axial")
    assert (m["Modality"], m["InstanceNumber"], m["SeriesNumber"]) == ("CT", "7", "1")
    assert m["PatientID"] == "1CT1" and m["PatientName"] == "CompressedSamples^CT1"
    assert m["StudyDate"] == "20040119" and m["StudyTime"] == "072730"
    assert m["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert m["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert m["TransferSyntax"] == "Explicit VR Little Endian" and m["Preamble"] is True
    h = found.hints
    assert (h.project, h.subject, h.session, h.auto_archive) == ("PX", "SX", "EX", True)


@pytest.mark.parametrize(("value", "kept"), [
    ("CT\\PT\\MR\\US\\NM", "CT"), ("NOT_A_MODALITY_AT_ALL_" * 3, "NOT_A_MODALITY_A"),
    ("[CT]", "[CT]")])
def test_an_over_long_modality_is_cut_to_dicoms_16_characters(store: LocalStore, value: str,
                                                              kept: str) -> None:
    # The catalogue's column holds 16: longer, the upload could never be finished. Of several
    # values, the first is the modality.
    ds = pydicom.dcmread(DICOM_FILES / "CT_small.dcm")
    ds.Modality = value
    buf = io.BytesIO()
    with warnings.catch_warnings():  # (pydicom says the value is invalid: it is)
        warnings.simplefilter("ignore")
        ds.save_as(buf)
    found = read(store, buf.getvalue(), "ct.dcm")
    assert found.reason is None and found.hints.modality == kept


def test_dicom_without_preamble_is_found_by_content(store: LocalStore) -> None:
    ds = pydicom.dcmread(DICOM_FILES / "CT_small.dcm")
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    found = read(store, data, "no-extension")
    assert (found.kind, found.reason) == (FileKind.dicom, None)
    assert found.metadata["Preamble"] is False and found.hints.modality == "CT"


def test_dicom_cut_in_its_pixel_data_is_truncated(store: LocalStore) -> None:
    data = (DICOM_FILES / "CT_small.dcm").read_bytes()[:30_000]  # pixels at 6,300..39,068
    found = read(store, data, "ct.dcm")
    assert found.reason is not None and found.reason.code == "dicom.truncated"
    assert "30000 bytes" in found.reason.message


def _encapsulated() -> bytes:
    """A JPEG-compressed DICOM: its pixel data in fragments, ending the file with a sequence
    delimiter."""
    data = (DICOM_FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm").read_bytes()
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return data


@pytest.mark.parametrize(("cut", "says"), [
    (100, "a fragment of its compressed pixel data"),  # inside the last fragment
    (3, "its compressed pixel data ends inside an item's header"),  # inside the delimiter
])
def test_dicom_with_compressed_pixel_data_cut_short_is_truncated(store: LocalStore, cut: int,
                                                                 says: str) -> None:
    data = _encapsulated()
    found = read(store, data[:-cut], "sc.dcm")
    assert found.reason is not None and found.reason.code == "dicom.truncated"
    assert says in found.reason.message
    assert read(store, data, "whole.dcm").reason is None


def test_compressed_dicom_without_its_sequence_delimiter_is_whole(store: LocalStore) -> None:
    """Some writers leave the delimiter out: every fragment is whole, and ends the file."""
    found = read(store, _encapsulated()[:-8], "no-delimiter.dcm")
    assert found.reason is None and found.kind is FileKind.dicom


def test_compressed_dicom_with_elements_after_its_pixel_data_is_whole(store: LocalStore) -> None:
    # Data Set Trailing Padding (FFFC,FFFC) after the pixel data: the items are walked
    padding = b"\xfc\xff\xfc\xffOB\x00\x00" + (16).to_bytes(4, "little") + bytes(16)
    found = read(store, _encapsulated() + padding, "padded.dcm")
    assert found.reason is None and found.kind is FileKind.dicom


def test_dicomdir_is_refused_as_an_index(store: LocalStore) -> None:
    found = read(store, Path(get_testdata_file("DICOMDIR")).read_bytes(), "DICOMDIR")
    assert found.kind is FileKind.dicom
    assert found.reason is not None and found.reason.code == "dicom.dicomdir"
    assert "index" in found.reason.message and "not an image" in found.reason.message


# --- photos --------------------------------------------------------------------------------------


def jpeg(exif: dict | None = None, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", size, "blue")
    if exif is None:
        image.save(buf, "JPEG")
    else:
        image.save(buf, "JPEG", exif=piexif.dump(exif))
    return buf.getvalue()


FULL_EXIF = {
    "0th": {piexif.ImageIFD.Make: b"Nikon", piexif.ImageIFD.Model: b"D850",
            piexif.ImageIFD.Orientation: 6},
    "Exif": {piexif.ExifIFD.DateTimeOriginal: b"2025:05:06 07:08:09",
             piexif.ExifIFD.PixelXDimension: 40, piexif.ExifIFD.PixelYDimension: 30},
    "GPS": {piexif.GPSIFD.GPSLatitudeRef: b"S", piexif.GPSIFD.GPSLatitude: ((33, 1), (52, 1),
                                                                            (0, 1)),
            piexif.GPSIFD.GPSLongitudeRef: b"E", piexif.GPSIFD.GPSLongitude: ((151, 1), (12, 1),
                                                                             (36, 1))},
}


def test_jpeg_with_full_exif(store: LocalStore) -> None:
    found = read(store, jpeg(FULL_EXIF), "photo")
    assert found.kind is FileKind.photo and found.reason is None
    assert found.metadata == {
        "format": "jpeg", "width": 40, "height": 30, "DateTimeOriginal": "2025:05:06 07:08:09",
        "Make": "Nikon", "Model": "D850", "Orientation": 6, "GPSLatitude": -33.8666667,
        "GPSLongitude": 151.21, "ExifImageWidth": 40, "ExifImageHeight": 30}


def test_jpeg_without_exif(store: LocalStore) -> None:
    found = read(store, jpeg(None, (7, 5)), "x.jpg")
    assert found.reason is None
    assert found.metadata == {"format": "jpeg", "width": 7, "height": 5}


def test_jpeg_with_corrupt_exif_is_refused(store: LocalStore) -> None:
    data = bytearray(jpeg(FULL_EXIF))
    tiff = data.find(b"Exif\x00\x00") + 6
    # point IFD0 far past the end of the EXIF block: its directory is not there
    data[tiff + 4:tiff + 8] = struct.pack("<I" if data[tiff] == 0x49 else ">I", 0x7FFFFFF0)
    found = read(store, bytes(data), "bad.jpg")
    assert found.kind is FileKind.photo
    assert found.reason is not None and found.reason.code == "photo.malformed"


def test_png_size(store: LocalStore) -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (9, 3)).save(buf, "PNG")
    found = read(store, buf.getvalue(), "a.png")
    assert found.metadata == {"format": "png", "width": 9, "height": 3}


def noisy_jpeg(side: int) -> bytes:
    """A JPEG whose image data is larger than the head and the tail read (noise compresses
    badly)."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", exif=piexif.dump(FULL_EXIF))
    return buf.getvalue()


@pytest.mark.parametrize("data", [jpeg(FULL_EXIF, (400, 300)), noisy_jpeg(600)],
                         ids=["small", "larger-than-head-and-tail"])
def test_jpeg_cut_short_is_truncated(store: LocalStore, data: bytes) -> None:
    found = read(store, data[:-100], "cut.jpg")
    assert found.kind is FileKind.photo
    assert found.reason is not None and found.reason.code == "photo.truncated"
    assert "end-of-image marker" in found.reason.message
    assert read(store, data, "whole.jpg").reason is None


def test_jpeg_cut_before_its_image_data_is_truncated(store: LocalStore) -> None:
    """Its embedded EXIF thumbnail ends with FF D9 too: only an end after the image data
    counts."""
    thumb = jpeg(None, (16, 16))
    data = jpeg({**FULL_EXIF, "1st": {}, "thumbnail": thumb}, (64, 64))
    scan = data.rfind(b"\xff\xda")
    found = read(store, data[:scan + 20], "cut.jpg")
    assert found.reason is not None and found.reason.code == "photo.truncated"


def test_jpeg_with_bytes_after_its_end_is_whole(store: LocalStore) -> None:
    data = noisy_jpeg(600)
    assert len(data) > 2 * HEAD_BYTES
    assert read(store, data + bytes(4096), "padded.jpg").reason is None  # padding
    assert read(store, data + b"SEFH" * 100, "trailer.jpg").reason is None  # a maker's trailer


def test_motion_photo_ends_with_its_video(store: LocalStore) -> None:
    data = bytearray(noisy_jpeg(600))
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta Camera:MotionPhoto=\"1\"/>"
    data[2:2] = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp  # an APP1 after SOI
    found = read(store, bytes(data) + bytes(range(256)) * 1024, "PXL_motion.jpg")  # + "video"
    assert found.reason is None and found.kind is FileKind.photo


def test_progressive_jpeg_cut_in_its_last_scan_is_truncated(store: LocalStore) -> None:
    """A progressive JPEG has markers between its scans: a cut after the last one's header is
    still a cut inside image data."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(noisy_jpeg(600))).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    found = read(store, data[:-100], "cut.jpg")
    assert found.reason is not None and found.reason.code == "photo.truncated"
    assert read(store, data, "whole.jpg").reason is None


def test_jpeg_with_a_trailer_longer_than_the_tail_read_is_whole(store: LocalStore) -> None:
    """The end-of-image marker lies further back than the last bytes read; what is there is no
    image data (an FF in it is followed by other than 00, a restart marker or FF), so the
    image ended before it."""
    data = noisy_jpeg(600)
    trailer = np.random.default_rng(1).bytes(200 * 1024)  # a depth map, a dual shot's image…
    trailer = trailer.replace(b"\xff\xd9", b"\xff\xd8")  # (one there would pass it by chance)
    assert read(store, data + trailer, "trailer.jpg").reason is None


def test_samsung_motion_photo_without_xmp_is_whole(store: LocalStore) -> None:
    """Older Samsung motion photos: the video follows a MotionPhoto_Data marker, and the XMP
    says nothing of it."""
    video = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
    video += np.random.default_rng(2).bytes(100 * 1024).replace(b"\xff\xd9", b"\xff\xd8")
    found = read(store, noisy_jpeg(600) + b"MotionPhoto_Data" + video, "20190101_motion.jpg")
    assert found.reason is None and found.kind is FileKind.photo


def test_jpeg_with_stray_bytes_between_its_segments_is_read(store: LocalStore) -> None:
    """libjpeg skips bytes that are no marker (with a warning): so does the reader."""
    data = bytearray(jpeg(None, (7, 5)))
    frame = data.find(b"\xff\xc0")
    after = frame + 2 + struct.unpack_from(">H", data, frame + 2)[0]
    data[after:after] = b"\x00\x12junk"  # between the frame header and the next segment
    found = read(store, bytes(data), "stray.jpg")
    assert found.reason is None
    assert found.metadata == {"format": "jpeg", "width": 7, "height": 5}


def test_png_cut_short_is_truncated(store: LocalStore) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    data = buf.getvalue()
    found = read(store, data[:-6], "cut.png")
    assert found.reason is not None and found.reason.code == "photo.truncated"
    assert "IEND" in found.reason.message
    assert read(store, data + b"junk", "trailing.png").reason is None


def test_plain_tiff_is_a_photo(store: LocalStore) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "green").save(buf, "TIFF", exif=piexif.dump(FULL_EXIF))
    found = read(store, buf.getvalue(), "scan.tif")
    assert (found.kind, found.reason) == (FileKind.photo, None)
    assert (found.metadata["format"], found.metadata["width"], found.metadata["height"]) == (
        "tiff", 64, 48)
    assert found.metadata["Make"] == "Nikon"


# --- slides --------------------------------------------------------------------------------------


def pyramid(bigtiff: bool = False, n: int = 1024) -> bytes:
    buf = io.BytesIO()
    data = np.zeros((n, n, 3), np.uint8)
    with tifffile.TiffWriter(buf, bigtiff=bigtiff) as tif:
        tif.write(data, tile=(256, 256), subifds=2, photometric="rgb",
                  resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        for k in (2, 4):
            tif.write(data[::k, ::k], tile=(256, 256), subfiletype=1, photometric="rgb")
    return buf.getvalue()


def svs(n: int = 1024) -> bytes:
    buf = io.BytesIO()
    data = np.zeros((n, n, 3), np.uint8)
    head = "Aperio Image Library v12.0.15\r\n"
    with tifffile.TiffWriter(buf) as tif:
        tif.write(data, tile=(256, 256), photometric="rgb", description=(
            f"{head}{n}x{n} [0,0 {n}x{n}] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990"))
        tif.write(data[::8, ::8], photometric="rgb", description=f"{head}thumbnail")
    return buf.getvalue()


def ndpi(n: int = 512) -> bytes:
    buf = io.BytesIO()
    data = np.zeros((n, n, 3), np.uint8)
    with tifffile.TiffWriter(buf) as tif:
        tif.write(data, photometric="rgb", resolution=(1e4 / 0.46, 1e4 / 0.46),
                  resolutionunit="CENTIMETER", extratags=[
                      (271, "s", 0, "Hamamatsu", True), (65420, "I", 1, 1, True),
                      (65421, "f", 1, 40.0, True)])
    return buf.getvalue()


def test_generic_pyramidal_tiff(store: LocalStore) -> None:
    found = read(store, pyramid(), "slide.tif")
    assert (found.kind, found.reason) == (FileKind.slide, None)
    m = found.metadata
    assert (m["format"], m["vendor"], m["width"], m["height"], m["levels"]) == (
        "tiff", "generic", 1024, 1024, 3)
    assert m["level_downsamples"] == [1.0, 2.0, 4.0]
    assert (m["mpp_x"], m["mpp_y"]) == (0.25, 0.25)


def test_bigtiff_pyramid(store: LocalStore) -> None:
    found = read(store, pyramid(bigtiff=True), "slide.btf")
    assert (found.kind, found.reason) == (FileKind.slide, None)
    assert found.metadata["format"] == "bigtiff" and found.metadata["levels"] == 3


def test_svs(store: LocalStore) -> None:
    found = read(store, svs(), "case.svs")
    m = found.metadata
    assert (found.kind, found.reason) == (FileKind.slide, None)
    assert (m["format"], m["vendor"], m["objective_power"], m["mpp_x"]) == (
        "svs", "aperio", 20.0, 0.499)


def test_ndpi(store: LocalStore) -> None:
    found = read(store, ndpi(), "case.ndpi")
    m = found.metadata
    assert (found.kind, found.reason) == (FileKind.slide, None)
    assert (m["format"], m["vendor"], m["objective_power"], m["mpp_x"]) == (
        "ndpi", "hamamatsu", 40.0, 0.46)


def test_slide_reads_only_its_directories(tmp_path: Path) -> None:
    class Counting(LocalStore):
        read_bytes = 0

        def read_range(self, key: str, offset: int, length: int) -> bytes:
            data = super().read_range(key, offset, length)
            Counting.read_bytes += len(data)
            return data

    counting = Counting(tmp_path / "s", fsync=False)
    data = pyramid(n=2048)
    found = read(counting, data, "big.tif")  # type: ignore[arg-type]
    assert found.kind is FileKind.slide
    assert Counting.read_bytes < len(data) / 10


@pytest.mark.parametrize("make", [pyramid, svs, lambda: pyramid(bigtiff=True)],
                         ids=["pyramid", "svs", "bigtiff"])
def test_slide_cut_short_is_truncated(store: LocalStore, make) -> None:
    data = make()
    found = read(store, data[:-1000], "cut.svs")
    assert found.reason is not None and found.reason.code == "tiff.truncated"
    assert f"past the {len(data) - 1000} bytes received" in found.reason.message


def test_tiff_whose_subifd_level_is_cut_is_truncated(store: LocalStore) -> None:
    """A generic pyramid keeps its levels in SubIFDs: their tiles are checked too."""
    data = bytearray(pyramid())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        level = tifffile.TiffPages(tif.pages.first)[0]
        at = level.tags["TileByteCounts"].valueoffset
        count = len(level.databytecounts)
        fmt = tif.byteorder + "I" * count
    data[at:at + 4 * count] = struct.pack(fmt, *[len(data)] * count)  # each tile past the end
    found = read(store, bytes(data), "slide.tif")
    assert found.reason is not None and found.reason.code == "tiff.truncated"
    assert "directory 1 " in found.reason.message


def _without_strip_byte_counts(data: bytes) -> bytes:
    """The TIFF with its first directory's StripByteCounts tag renamed to a private one: as
    if its writer had left it out."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        at = tif.pages.first.tags["StripByteCounts"].offset  # the tag's entry
        order = tif.byteorder
    patched = bytearray(data)
    patched[at:at + 2] = struct.pack(order + "H", 65000)
    return bytes(patched)


def test_tiff_without_strip_byte_counts_is_whole(store: LocalStore) -> None:
    """tifffile takes a compressed strip without byte counts to be as long as uncompressed:
    only where its data begins is checked then."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((64, 64, 3), np.uint8), compression="zlib",
                     rowsperstrip=64, photometric="rgb")
    data = _without_strip_byte_counts(buf.getvalue())
    found = read(store, data, "no-counts.tif")
    assert found.reason is None and found.kind is FileKind.photo


def test_tiff_with_a_broken_directory_chain(store: LocalStore) -> None:
    data = bytearray(pyramid())
    (first,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, first)
    next_at = first + 2 + 12 * entries
    data[next_at:next_at + 4] = struct.pack("<I", len(data) + 4096)  # points past the end
    data[first:first + 2] = struct.pack("<H", 0xFFFF)  # and IFD0 claims 65535 entries
    found = read(store, bytes(data), "broken.tif")
    assert found.reason is not None and found.reason.code == "tiff.malformed"


# --- CSV -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    (b"case_id,site,age\n1,A,40\n2,B,51\n", {"encoding": "utf-8", "bom": False,
                                             "delimiter": ",", "rows": 2, "columns": 3}),
    (b"\xef\xbb\xbfcase_id;site\r\n1;Z\xc3\xbcrich\r\n", {"encoding": "utf-8-sig", "bom": True,
                                                          "delimiter": ";", "rows": 1}),
    (b'id\tnote\n1\t"two\nlines"\n2\tplain\n', {"delimiter": "\t", "rows": 2}),
    (b"id,name\n", {"rows": 0, "header": ["id", "name"]}),
])
def test_good_csv(store: LocalStore, data: bytes, expected: dict) -> None:
    found = read(store, data, "cases.csv")
    assert (found.kind, found.reason) == (FileKind.csv, None)
    assert expected.items() <= found.metadata.items()


@pytest.mark.parametrize(("data", "code", "words"), [
    (b"id,name\n1,Z\xc3\xbcrich\n2,M\xfcnchen\n", "csv.encoding", "Line 3"),  # mixed
    (b"id,name\n1,M\xfcnchen\n", "csv.encoding", "not UTF-8"),  # Latin-1 throughout
    (b"id,name\n1,a\n2,b,c\n", "csv.ragged_row", "Line 3 has 3 fields"),
    (b'id,name\n1,"never closed\n2,b\n', "csv.quoting", "never closed"),
    (b"id,id\n1,2\n", "csv.bad_header", "once"),
    (b"\n\n", "csv.empty", "no header"),
])
def test_bad_csv(store: LocalStore, data: bytes, code: str, words: str) -> None:
    found = read(store, data, "cases.csv")
    assert found.kind is FileKind.csv
    assert found.reason is not None and found.reason.code == code
    assert words in found.reason.message


@pytest.mark.parametrize(("lines", "reason"), [(1000, None), (1001, "csv.quoting")])
def test_a_quoted_field_of_more_than_1000_lines_is_refused_saying_so(
        store: LocalStore, lines: int, reason: str | None) -> None:
    data = ('id,note\n1,"' + "a line\n" * (lines - 1) + 'the end"\n2,b\n').encode()
    found = read(store, data, "notes.csv")
    assert (found.reason.code if found.reason else None) == reason
    if found.reason:
        assert found.reason.message == (
            "A quoted field opened on line 2 goes on for more than 1,000 lines: a closing "
            "quote is probably missing (a field of more lines than that is not read).")


def test_csv_is_checked_across_chunks() -> None:
    """A multi-byte character split between two chunks is no encoding error."""
    data = ("id,city\n" + "".join(f"{i},Zürich\n" for i in range(1000))).encode()
    check = CsvCheck(data[:64])
    for i in range(0, len(data), 7):
        check.feed(data[i:i + 7])
    found = check.result()
    assert found.reason is None and found.metadata["rows"] == 1000


# --- project rules -------------------------------------------------------------------------------


def rules(**kw) -> ProjectRules:
    return ProjectRules(project="P", accepted_kinds=kw.pop("kinds", list(FileKind)),
                        updated_at=datetime(2026, 1, 1, tzinfo=UTC), **kw)


def test_rules_accepted_kinds() -> None:
    reason = check_rules(FileKind.csv, {}, rules(kinds=[FileKind.dicom, FileKind.photo]))
    assert reason is not None and reason.code == "project.kind_not_accepted"
    assert reason.message == "Project P takes dicom, photo; this file is csv."


def test_rules_messages_name_field_problem_and_expectation() -> None:
    r = rules(metadata_rules={
        FileKind.photo: {"required": ["DateTimeOriginal", "Make"]},
        FileKind.dicom: {"properties": {"Modality": {"enum": ["CT", "MR"]}}},
        FileKind.slide: {"required": ["mpp_x"], "properties": {
            "objective_power": {"minimum": 20}}}})
    photo = check_rules(FileKind.photo, {"Make": "Nikon"}, r)
    assert photo is not None and photo.code == "project.rules"
    assert "'DateTimeOriginal' is missing (required)" in photo.message
    assert "'Make'" not in photo.message
    dicom = check_rules(FileKind.dicom, {"Modality": "US"}, r)
    assert dicom is not None
    assert "'Modality' is 'US'; expected one of 'CT', 'MR'" in dicom.message
    slide = check_rules(FileKind.slide, {"objective_power": 10}, r)
    assert slide is not None and "'mpp_x' is missing" in slide.message
    assert "'objective_power' is 10; expected at least 20" in slide.message
    assert check_rules(FileKind.dicom, {"Modality": "CT"}, r) is None
    assert check_rules(FileKind.csv, {}, r) is None  # no schema for the kind
    assert check_rules(FileKind.photo, {}, None) is None  # no project rules at all


# --- fuzz: nothing raises past the adapter boundary ---------------------------------------------

SEEDS = {
    "dicom": (DICOM_FILES / "CT_small.dcm").read_bytes()[:8000],
    "jpeg": jpeg(FULL_EXIF),
    "tiff": pyramid(n=256),
    "csv": b"id,name\n1,a\n2,b\n",
}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return name, bytes(data[:cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.tuples(st.just("random"), st.binary(min_size=1, max_size=600))))
def test_fuzz_every_extractor(store: LocalStore, case: tuple[str, bytes]) -> None:
    name, data = case
    found = read(store, data, f"fuzz.{name}")
    assert found.kind in FileKind
    assert found.reason is not None or found.kind is not FileKind.unknown
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identify(data, len(data), "x")  # the pure part, on the whole bytes, never raises either


def test_project_hint_falls_back_to_study_description_then_accession_number(
        store: LocalStore) -> None:
    ds = pydicom.dcmread(DICOM_FILES / "CT_small.dcm")
    ds.StudyDescription, ds.AccessionNumber = "Lung Screen", "ACC-7"
    buf = io.BytesIO()
    ds.save_as(buf)
    assert read(store, buf.getvalue(), "a.dcm").hints.project == "Lung_Screen"
    del ds.StudyDescription
    buf = io.BytesIO()
    ds.save_as(buf)
    assert read(store, buf.getvalue(), "b.dcm").hints.project == "ACC-7"
    ds.PatientComments = "Project: FROM_COMMENTS"
    buf = io.BytesIO()
    ds.save_as(buf)
    assert read(store, buf.getvalue(), "c.dcm").hints.project == "FROM_COMMENTS"

