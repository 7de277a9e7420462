"""Identifying files, reading their headers and checking them against their project's rules,
from bytes and parsed values: no I/O here.

- Files are told apart by their content (magic bytes), never by their names.
- DICOM is read with pydicom up to the pixel data only; photos' EXIF with exifread; CSVs are fed
  chunk by chunk to a `CsvCheck`. Slides are read by the adapter (tiffslide needs random access);
  `slide_metadata` turns what it found into metadata.
- A file cut short is told from its end: a photo's last bytes (`photo_cut`), a TIFF's
  directories as the adapter read them (`tiff_cut`), compressed DICOM pixel data's item
  headers, read through the function the adapter passes (`encapsulated_cut`).
- Labels follow XNAT's conventions: `Project: P Subject: S Session: E` in Patient/Study Comments
  wins; otherwise the subject is the patient's name and the session the patient ID.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import math
import operator
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import exifread
import jsonschema
import pydicom
from imgest_contracts import FileKind, Fileset, ProjectRules, Reason, SessionHints
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue

HEAD_BYTES = 64 * 1024


class NeedMore(Exception):
    """The headers go on past the bytes read so far."""


@dataclass
class Identified:
    kind: FileKind
    metadata: dict[str, Any] = field(default_factory=dict)
    hints: SessionHints = field(default_factory=SessionHints)
    reason: Reason | None = None  # set when the file is refused
    # Where compressed DICOM pixel data's items begin: the adapter checks that they end
    # inside the file (`encapsulated_cut`), reading the file's end.
    pixel_items_at: int | None = None


def refused(kind: FileKind, code: str, message: str) -> Identified:
    return Identified(kind, reason=Reason(code=code, message=message))


# --- what a file is ------------------------------------------------------------------------------

# Formats, each of one kind. A TIFF is a photo or a slide: the adapter decides once it has read
# its directories (a pyramid, or a slide vendor's tags, makes it a slide).
KIND_OF = {"dicom": FileKind.dicom, "jpeg": FileKind.photo, "png": FileKind.photo,
           "tiff": FileKind.photo, "bigtiff": FileKind.slide, "csv": FileKind.csv,
           "unknown": FileKind.unknown}

# Explicit-VR element headers with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_VR = re.compile(rb"[A-Z]{2}")


def _dicom_without_preamble(head: bytes) -> bool:
    """A DICOM stream that starts with its first element (no 128-byte preamble, no "DICM"):
    group 0002 or 0008, a small element number, and an explicit VR or a plausible implicit
    length."""
    if len(head) < 8:
        return False
    for order in "<>":  # little endian, or the retired big endian
        group, element = struct.unpack_from(order + "HH", head)
        if group not in (0x0002, 0x0008) or element > 0x0020:
            continue
        if _VR.fullmatch(head[4:6]):
            return True
        (length,) = struct.unpack_from(order + "I", head, 4)
        return length < 1024
    return False


def _looks_like_text(head: bytes) -> bool:
    """Text a CSV could be: no NUL, and (bar a cut multi-byte character at the end) few
    control characters."""
    if not head or b"\x00" in head:
        return False
    controls = sum(1 for b in head[:4096] if b < 0x20 and b not in (0x09, 0x0A, 0x0D))
    return controls == 0


def sniff(head: bytes, path: str = "") -> str:
    """The file's format from its first bytes ("dicom", "jpeg", "png", "tiff", "bigtiff",
    "csv", "unknown"). The name only breaks a tie: text is a CSV if it reads as one, or if it
    is called one."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "bigtiff"
    if _dicom_without_preamble(head):
        return "dicom"
    if _looks_like_text(head) and (path.lower().endswith((".csv", ".tsv"))
                                   or _sniff_dialect(head) is not None):
        return "csv"
    return "unknown"


# --- DICOM ---------------------------------------------------------------------------------------


_LABEL_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_XNAT_FIELD = re.compile(r"(Project|Subject|Session|AA)\s*:\s*([^\s;,]+)", re.IGNORECASE)
DICOM_FIELDS = (
    "PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "SOPClassUID", "Modality", "StudyDate", "StudyTime", "StudyDescription",
    "SeriesDescription", "AccessionNumber", "StudyID", "SeriesNumber", "InstanceNumber",
    "Manufacturer", "PatientComments", "StudyComments", "AdditionalPatientHistory")


def label(value: Any) -> str | None:
    """An XNAT-safe label: letters, digits, '_' and '-'."""
    text = _LABEL_BAD.sub("_", str(value or "").strip()).strip("_")
    return text[:64] or None


MODALITY_MAX = 16  # DICOM's Modality is one code string (CS) of at most 16 characters


def modality(ds: pydicom.Dataset, text: str | None) -> str | None:
    """The Modality as the catalogue keeps it. A malformed header's is not refused (its images
    are still images): of several values (`CT\\PT`, which pydicom's text shows as a list) the
    first; junk cut to DICOM's 16 characters."""
    with contextlib.suppress(Exception):  # (a value that does not decode: the text as it is)
        if text and text.startswith("[") and isinstance(values := ds.get("Modality"),
                                                        MultiValue) and values:
            text = str(values[0]).strip() or None
    return text[:MODALITY_MAX] if text else None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value that does not decode is as good as absent
        return None
    return str(value).strip() or None if value is not None else None


# A header's fields are taken from the file's bytes where that gives what pydicom would:
# pydicom converts each value on its own, looking the character set up again every time
# (over half of the time a CT header took). Anything unusual still goes through pydicom.
# (Not IS or DS: pydicom refuses a number that overflows, such as "inf".)
_PLAIN_VRS = frozenset({"UI", "CS", "DA", "TM", "DT", "AS"})  # default repertoire
_TEXT_VRS = frozenset({"SH", "LO", "PN", "LT", "ST", "UT", "UC"})  # in the character set
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# DICOM allows 64 characters; some systems write longer ones, which the catalogue still holds.
# (Leading zeros are let be too: scanners write them.)
_UID = re.compile(r"(?=.{1,128}\Z)[0-9]+(\.[0-9]+)*")
_ONE_VALUE_VRS = frozenset({"LT", "ST", "UT"})  # a backslash is text there, not a separator
_FIELD_TAGS = {k: (tag_for_keyword(k), dictionary_VR(k)) for k in DICOM_FIELDS}


def _codec(ds: pydicom.Dataset) -> str | None:
    """The codec of the dataset's text if one reads all of it (no code extensions)."""
    elem = ds.get_item(0x00080005)  # Specific Character Set
    if elem is None:
        return default_encoding
    if isinstance(elem, RawDataElement) or not isinstance(elem.value, str):
        return None  # not read yet, or several terms: code extensions
    found = convert_encodings(elem.value)  # pydicom's own reading of the term, warnings too
    return found[0] if len(found) == 1 else None


def dicom_texts(ds: pydicom.Dataset) -> dict[str, str | None]:
    """Each of DICOM_FIELDS as text, None if absent or empty."""
    codec = _codec(ds)
    texts: dict[str, str | None] = {}
    for keyword, (tag, known_vr) in _FIELD_TAGS.items():
        elem = ds.get_item(tag)
        if elem is None:
            texts[keyword] = None
            continue
        raw = elem.value if isinstance(elem, RawDataElement) else None
        vr = elem.VR or known_vr
        text = None
        if isinstance(raw, bytes) and (vr in _ONE_VALUE_VRS or b"\\" not in raw):
            if vr in _PLAIN_VRS:
                text = raw.decode("latin-1")
            elif vr in _TEXT_VRS and codec and b"\x1b" not in raw:  # (ESC: code extensions)
                with contextlib.suppress(UnicodeDecodeError):
                    text = raw.decode(codec)
        if text is not None:
            text = text.rstrip(" \0")
            if vr == "PN":  # (empty groups at the end of a name are dropped)
                text = text.rstrip("=")
        texts[keyword] = _text(ds, keyword) if text is None else text.strip() or None
    return texts


UNDEFINED = 0xFFFFFFFF  # the length of encapsulated (compressed) pixel data: items follow


def _pixel_data(head: bytes, at: int, ds: pydicom.Dataset) -> tuple[int, int] | None:
    """(where its value starts, its declared length) of the element starting at `at` (the
    pixel data, where reading stopped); None if that cannot be told from `head`."""
    if at + 12 > len(head):
        return None  # not read that far: the caller reads more, or the file ends here
    transfer = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if transfer == "1.2.840.10008.1.2.1.99":
        return None  # deflated: positions in the stream are not positions in the file
    order = ">" if transfer == "1.2.840.10008.1.2.2" else "<"
    vr = head[at + 4:at + 6]
    if transfer == "1.2.840.10008.1.2" or not _VR.fullmatch(vr):
        # implicit VR (as declared, or as written despite the declaration): a 4-byte length
        (length,) = struct.unpack_from(order + "I", head, at + 4)
        return at + 8, length
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from(order + "I", head, at + 8)
        return at + 12, length
    (length,) = struct.unpack_from(order + "H", head, at + 6)
    return at + 8, length


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian: encapsulated data always is
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0


def encapsulated_cut(read: Callable[[int, int], bytes], at: int, size: int) -> Reason | None:
    """Why compressed pixel data, whose items start at `at` in a file of `size` bytes, is cut
    short or broken; None if its items end with a sequence delimiter inside the file, or end
    the file without one (some writers leave it out). `read(offset, n)` gives the file's
    bytes. Pixel data nearly always ends the file: one 8-byte read of its end tells; otherwise
    the items are walked, reading their headers only."""
    if size - 8 >= at and read(size - 8, 8) == _SEQUENCE_END:
        return None
    while at + 8 <= size:
        header = read(at, 8)
        if header == _SEQUENCE_END:
            return None  # (elements after the pixel data: padding, a signature)
        (length,) = struct.unpack_from("<I", header, 4)
        if header[:4] != _ITEM or length == UNDEFINED:
            return Reason(code="dicom.malformed", message=f"The compressed pixel data is "
                          f"damaged: byte {at} holds no fragment (item) of it.")
        if at + 8 + length > size:
            return Reason(code="dicom.truncated", message=f"The file is cut short: a fragment "
                          f"of its compressed pixel data at byte {at} needs {length} bytes, "
                          f"past the end of the {size} bytes received.")
        at += 8 + length
    if at == size:
        return None  # every fragment whole: only the delimiter is missing
    return Reason(code="dicom.truncated", message="The file is cut short: its compressed pixel "
                  f"data ends inside an item's header, at byte {at} of the {size} bytes "
                  "received.")


# A DICOMDIR's file meta names it by its SOP class (PS3.10 7.2; the meta group is always
# explicit VR little endian).
_DICOMDIR_CLASS = b"1.2.840.10008.1.3.10"


def _is_dicomdir(head: bytes) -> bool:
    at = head.find(b"\x02\x00\x02\x00UI", 132, 1024)  # Media Storage SOP Class UID
    if at < 0 or at + 8 > len(head):
        return False
    (length,) = struct.unpack_from("<H", head, at + 6)
    return head[at + 8:at + 8 + length].rstrip(b"\0 ") == _DICOMDIR_CLASS


def dicom(head: bytes, size: int) -> Identified:
    """Parses the header from `head` (the first bytes of a file of `size` bytes)."""
    if head[128:132] == b"DICM" and _is_dicomdir(head):
        return refused(FileKind.dicom, "dicom.dicomdir", "A DICOMDIR is the index of a DICOM "
                       "disc or folder, not an image; the images it lists are imported from "
                       "their own files.")
    fp = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=head[128:132] != b"DICM")
    except Exception as e:  # pydicom raises many kinds (struct.error, …) on cut data
        if len(head) < size:
            raise NeedMore() from e
        return refused(FileKind.dicom, "dicom.malformed",
                       f"The DICOM header cannot be read: {e}")
    stopped = fp.tell()
    if stopped >= len(head) and len(head) < size:
        raise NeedMore()  # stopped at the end of what was read, not at the pixel data
    if "PixelData" not in ds and stopped < len(head) and len(head) - stopped < 12 \
            and len(head) < size:
        raise NeedMore()  # the pixel data's element header is cut: read on to check its length
    texts = dicom_texts(ds)
    missing = [k for k in _UIDS if not texts[k]]
    if missing:
        return refused(FileKind.dicom, "dicom.missing_uid", f"The DICOM file lacks "
                       f"{', '.join(missing)}; it cannot be placed in a study.")
    # A UID names the file and its folders in the archive: only what DICOM's form allows
    # (PS3.5 9.1) gets there, never a slash or a name the catalogue cannot hold.
    bad = [f"{k} {texts[k]!r}" for k in _UIDS if not _UID.fullmatch(texts[k] or "")]
    if bad:
        return refused(FileKind.dicom, "dicom.bad_uid", f"The DICOM file's {', '.join(bad)} "
                       "is not a UID (digits and dots, at most 128 characters); it cannot be "
                       "placed in a study.")
    pixels = None
    with contextlib.suppress(struct.error):  # a header shorter than its form: the file ends
        pixels = _pixel_data(head, stopped, ds)  # there, the headers whole
    if pixels and pixels[1] != UNDEFINED and sum(pixels) > size:
        return refused(FileKind.dicom, "dicom.truncated", f"The file is cut short: its "
                       f"pixel data needs more than the {size} bytes received.")
    fields: dict[str, str] = {}
    for keyword in ("PatientComments", "StudyComments", "AdditionalPatientHistory"):
        for key, value in _XNAT_FIELD.findall(texts[keyword] or ""):
            fields.setdefault(key.lower(), value)
    meta: dict[str, Any] = dict(texts)
    transfer = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta["TransferSyntaxUID"] = str(transfer) if transfer else None
    meta["TransferSyntax"] = getattr(transfer, "name", None) if transfer else None
    meta["Preamble"] = head[128:132] == b"DICM"
    series_number = texts["SeriesNumber"]
    hints = SessionHints(
        # XNAT's order for the project: the comments' Project field, then Study Description,
        # then Accession Number (the importer sends a project nobody created to Unassigned).
        project=label(fields.get("project")) or label(texts["StudyDescription"])
        or label(texts["AccessionNumber"]),
        subject=label(fields.get("subject")) or label(texts["PatientName"])
        or label(texts["PatientID"]),
        session=label(fields.get("session")) or label(texts["PatientID"]),
        auto_archive={"true": True, "false": False}.get((fields.get("aa") or "").lower()),
        study_uid=texts["StudyInstanceUID"],
        series_uid=texts["SeriesInstanceUID"],
        sop_instance_uid=texts["SOPInstanceUID"],
        modality=modality(ds, texts["Modality"]),
        scan=label(series_number) or label(texts["SeriesInstanceUID"]),
    )
    return Identified(FileKind.dicom, {k: v for k, v in meta.items() if v is not None}, hints,
                      pixel_items_at=pixels[0] if pixels and pixels[1] == UNDEFINED else None)


# --- photos --------------------------------------------------------------------------------------

# Start-of-frame markers carry the image's size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


_MARKER = re.compile(rb"\xff[^\x00]")  # (FF 00 is an FF byte of image data, stuffed)


def _segments(head: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, position, length) of each JPEG segment in `head`, up to the first scan's
    header or the end of the image. Raises ValueError on a broken segment chain before the
    frame header; after it, stray bytes are skipped up to the next marker, as libjpeg does
    (with a warning), so a file it decodes is not refused for them."""
    pos = 2
    framed = False
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            if not framed:
                raise ValueError(f"no JPEG marker at byte {pos}")
            found = _MARKER.search(head, pos)
            if found is None:
                return
            pos = found.start()
            continue
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            yield marker, pos, 0
            return
        (length,) = struct.unpack_from(">H", head, pos + 2)
        if length < 2:
            raise ValueError(f"a JPEG segment of length {length}")
        yield marker, pos, length
        if marker == 0xDA:
            return
        framed = framed or marker in _SOF
        pos += 2 + length


def jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment in `head`; None if it is not
    there yet. Raises ValueError on a broken segment chain."""
    for marker, pos, _ in _segments(head):
        if marker in (0xD9, 0xDA):
            raise ValueError("the image data begins before any frame header")
        if marker in _SOF:
            if pos + 9 > len(head):
                return None
            height, width = struct.unpack_from(">HH", head, pos + 5)
            return width, height
    return None


def jpeg_scan_start(head: bytes) -> int | None:
    """Where the first scan's image data begins; None if its header is not in `head`."""
    for marker, pos, length in _segments(head):
        if marker == 0xDA:
            return pos + 2 + length
    return None


def check_exif_block(head: bytes) -> None:
    """Raises ValueError if a JPEG's EXIF block (APP1 "Exif") is there but its first
    directory is not inside it: exifread then reads nothing and says nothing."""
    pos = 2
    while pos + 4 <= len(head) and head[pos] == 0xFF and head[pos + 1] not in (0xDA, 0xD9):
        (length,) = struct.unpack_from(">H", head, pos + 2)
        if head[pos + 1] == 0xE1 and head[pos + 4:pos + 10] == b"Exif\x00\x00":
            block = head[pos + 10:pos + 2 + length]
            order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(block[:4])
            if order is None:
                raise ValueError("the EXIF block has no TIFF header")
            (ifd0,) = struct.unpack_from(order + "I", block, 4)
            if ifd0 < 8 or ifd0 + 2 > len(block):
                raise ValueError(f"the EXIF directory is at byte {ifd0}, outside the "
                                 f"{len(block)}-byte EXIF block")
            (entries,) = struct.unpack_from(order + "H", block, ifd0)
            if ifd0 + 2 + 12 * entries > len(block):
                raise ValueError(f"the EXIF directory's {entries} entries run past its block")
            return
        pos += 2 + length


def _ratio(value: Any) -> float:
    return float(value.num) / float(value.den) if value.den else 0.0


def _degrees(tag: Any, ref: Any) -> float | None:
    if tag is None or len(tag.values) != 3:
        return None
    d, m, s = (_ratio(v) for v in tag.values)
    sign = -1 if str(ref or "").strip().upper() in ("S", "W") else 1
    return round(sign * (d + m / 60 + s / 3600), 7)


def exif_metadata(tags: dict[str, Any]) -> dict[str, Any]:
    """The EXIF fields people ask for, under plain names."""
    meta: dict[str, Any] = {}
    for name, key in (("DateTimeOriginal", "EXIF DateTimeOriginal"),
                      ("DateTime", "Image DateTime"), ("Make", "Image Make"),
                      ("Model", "Image Model"), ("Software", "Image Software")):
        if key in tags and str(tags[key]).strip():
            meta[name] = str(tags[key]).strip()
    if "Image Orientation" in tags and tags["Image Orientation"].values:
        meta["Orientation"] = int(tags["Image Orientation"].values[0])
    latitude = _degrees(tags.get("GPS GPSLatitude"), tags.get("GPS GPSLatitudeRef"))
    longitude = _degrees(tags.get("GPS GPSLongitude"), tags.get("GPS GPSLongitudeRef"))
    if latitude is not None and longitude is not None:
        meta["GPSLatitude"], meta["GPSLongitude"] = latitude, longitude
    for name, key in (("ExifImageWidth", "EXIF ExifImageWidth"),
                      ("ExifImageHeight", "EXIF ExifImageLength")):
        if key in tags and tags[key].values:
            meta[name] = int(tags[key].values[0])
    return meta


def read_exif(data: Any) -> dict[str, Any]:
    """EXIF of a JPEG, PNG or TIFF (a binary file object); raises on damaged metadata."""
    return exif_metadata(exifread.process_file(data, details=False, strict=True))


def photo(head: bytes, size: int, fmt: str) -> Identified:
    """A JPEG or PNG from its first bytes: size from the frame header (or IHDR), then EXIF."""
    try:
        if fmt == "png":
            if len(head) < 24 or head[12:16] != b"IHDR":
                raise ValueError("no IHDR chunk")
            width, height = struct.unpack_from(">II", head, 16)
        else:
            found = jpeg_size(head)
            if found is None:
                if len(head) < size:
                    raise NeedMore()
                raise ValueError("no frame header")
            width, height = found
            if jpeg_scan_start(head) is None and len(head) < size:
                raise NeedMore()  # (the image's end is checked from where its data begins)
            check_exif_block(head)
        tags = read_exif(io.BytesIO(head))
    except NeedMore:
        raise
    except Exception as e:  # noqa: BLE001 - exifread raises many kinds on damaged files
        return refused(FileKind.photo, "photo.malformed",
                       f"The {fmt.upper()} image's headers cannot be read: {e}")
    return Identified(FileKind.photo, {"format": fmt, "width": width, "height": height, **tags})


TAIL_BYTES = 64 * 1024  # a photo's last bytes, where its end is looked for
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # PNG's last chunk, always the same 12 bytes
_MOTION_PHOTO = re.compile(rb"MotionPhoto|MicroVideo")  # (in its XMP)
# In image (entropy-coded) data an FF byte is followed only by 00 (a stuffed FF), a restart
# marker (D0-D7) or another FF (fill): anything else after it is a marker, or no image data.
_NOT_IMAGE_DATA = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _ends_in_image_data(data: bytes) -> bool:
    """Whether `data` (a JPEG's bytes from some point after its first scan's header to the
    end of the file) ends inside image data: nothing but image data after its last marker,
    if that is a scan's header (a progressive JPEG's next scan), or in all of it."""
    last = None
    for last in _NOT_IMAGE_DATA.finditer(data):
        pass
    if last is None:
        return True
    at = last.start()
    if data[at + 1] != 0xDA:
        return False  # another marker, or a trailer's bytes: the image ended before them
    if at + 5 > len(data):
        return True  # cut inside the scan's header
    # A scan's header: its length is 6 + 2 bytes for each of its 1 to 4 components.
    (length,) = struct.unpack_from(">H", data, at + 2)
    return 1 <= data[at + 4] <= 4 and length == 6 + 2 * data[at + 4]


def photo_cut(fmt: str, head: bytes, tail: bytes, size: int) -> Reason | None:
    """Why a JPEG or PNG of `size` bytes (`head`: its first bytes, `tail`: its last
    TAIL_BYTES) is cut short: its end (JPEG's end-of-image marker, PNG's IEND chunk) is not
    among its last bytes. What follows that end is let be, as decoders do: padding, a
    camera maker's trailer, further images (MPF). A JPEG's end may lie further back than its
    last bytes (a long trailer): it is cut short only if those bytes are image data."""
    if fmt == "png":
        if _IEND in tail:
            return None
        return Reason(code="photo.truncated", message="The PNG image is cut short: it does "
                      f"not end with an IEND chunk ({size} bytes received).")
    scan = jpeg_scan_start(head)
    if scan is not None:
        # Image data holds no FF D9, so one after where it begins is the end-of-image marker.
        data = tail[max(0, scan - (size - len(tail))):]
        if b"\xff\xd9" in data or not _ends_in_image_data(data):
            return None
    if _MOTION_PHOTO.search(head):
        return None  # a motion photo ends with its video, not the image's end marker
    return Reason(code="photo.truncated", message="The JPEG image is cut short: it has no "
                  f"end-of-image marker (FF D9) near its end ({size} bytes received).")


def tiff_cut(directories: Iterable[tuple[Sequence[int], Sequence[int], bool]], size: int
             ) -> Reason | None:
    """Why a TIFF of `size` bytes is cut short: a directory (each given as its strips' or
    tiles' offsets and byte counts, and whether it has a byte-count tag) whose image data runs
    past the end. Without the tag, tifffile estimates the counts (for a compressed strip, as
    long as uncompressed): then only where the data begins is known."""
    for number, (offsets, counts, counted) in enumerate(directories):
        if counted:
            end = max(map(operator.add, offsets, counts), default=0)  # (missing tiles: 0, 0)
            cut = end > size
        else:
            end = max(offsets, default=0)
            cut = end >= size
        if cut:
            return Reason(code="tiff.truncated", message=f"The TIFF is cut short: its "
                          f"directory {number} has image data {'up to' if counted else 'at'} "
                          f"byte {end}, past the {size} bytes received.")
    return None


# --- slides --------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 6) if math.isfinite(number) and number > 0 else None


def _levels(properties: dict[str, Any]) -> int:
    return sum(1 for k in properties if k.startswith("tiffslide.level[") and
               k.endswith("].width"))


def _vendor(properties: dict[str, Any]) -> str:
    vendor = properties.get("tiffslide.vendor")
    return "generic" if vendor in (None, "", "generic-tiff") else str(vendor)


def is_slide(properties: dict[str, Any], tiled: bool) -> bool:
    """A TIFF is a slide if a vendor's format was recognised (SVS, NDPI…), or it is a tiled
    pyramid; anything else is a photo."""
    return _vendor(properties) != "generic" or (tiled and _levels(properties) > 1)


def slide_metadata(properties: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The facts of a slide from tiffslide's (OpenSlide-named) properties."""
    vendor = _vendor(properties)
    levels = _levels(properties)
    meta: dict[str, Any] = {
        "format": {"aperio": "svs", "hamamatsu": "ndpi"}.get(vendor, fmt), "vendor": vendor,
        "width": int(properties.get("tiffslide.level[0].width") or 0),
        "height": int(properties.get("tiffslide.level[0].height") or 0), "levels": levels,
        "level_downsamples": [
            _number(properties.get(f"tiffslide.level[{i}].downsample")) for i in range(levels)],
    }
    for name, key in (("mpp_x", "tiffslide.mpp-x"), ("mpp_y", "tiffslide.mpp-y"),
                      ("objective_power", "tiffslide.objective-power")):
        if (value := _number(properties.get(key))) is not None:
            meta[name] = value
    return meta


def fileset(path: str, size: int, parts: Fileset) -> Identified:
    """A multi-file slide: its index (`path`, `size` bytes) and its parts. The unpacker has
    found each part the index names; here none may be empty (a part of no bytes is image data
    that never arrived)."""
    empty = [f.path for f in parts.files if f.size == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10
                                         else "")
        return refused(FileKind.slide, "slide.empty_companion", f"The {parts.format.upper()} "
                       f"slide {path!r} has empty files among its parts: {shown}.")
    return Identified(FileKind.slide, {
        "format": parts.format, "vendor": parts.format, "files": len(parts.files) + 1,
        "bytes": size + sum(f.size for f in parts.files)})


# --- CSV -----------------------------------------------------------------------------------------

DELIMITERS = ",;\t|"
MAX_FIELD_LINES = 1000  # the most lines a quoted field may span


def _sniff_dialect(head: bytes) -> str | None:
    """The delimiter of text that reads as a table (two or more columns, the same count in
    its first lines); None if it does not."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = [line for line in text.splitlines()[:20] if line.strip()]
    if len(head) >= HEAD_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    if not lines:
        return None
    try:
        dialect = csv.Sniffer().sniff("\n".join(lines), delimiters=DELIMITERS)
    except csv.Error:
        return None
    counts = {len(row) for row in csv.reader(lines, delimiter=dialect.delimiter)}
    return dialect.delimiter if len(counts) == 1 and counts.pop() > 1 else None


class CsvCheck:
    """Reads a CSV chunk by chunk (UTF-8, with or without a byte-order mark): its delimiter,
    header and row count, or the first thing wrong with it (a line that is not UTF-8, a row
    with too many or too few fields, broken quoting)."""

    def __init__(self, head: bytes, max_fields: int = 10_000):
        self.bom = head.startswith(codecs.BOM_UTF8)
        self.delimiter = _sniff_dialect(head) or ","
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.pending = ""
        self.line = 0  # lines fully read
        self.header: list[str] | None = None
        self.rows = 0
        self.max_fields = max_fields
        self.reason: Reason | None = None
        self._first = True
        self._record: list[str] = []  # the lines of a record still inside quotes

    def _fail(self, code: str, message: str) -> None:
        self.reason = self.reason or Reason(code=code, message=message)

    def feed(self, chunk: bytes, final: bool = False) -> None:
        if self.reason:
            return
        try:
            text = self.decoder.decode(chunk, final)
        except UnicodeDecodeError as e:
            bad = (self.pending + e.object[:e.start].decode("utf-8", "replace")).count("\n")
            some = "some lines are UTF-8 and some are not: the file mixes encodings" \
                if self.line or "\n" in self.pending or any(b > 0x7F for b in e.object[:e.start]) \
                else "it is not UTF-8"
            self._fail("csv.encoding", f"Line {self.line + bad + 1} has a byte (0x"
                       f"{e.object[e.start]:02x}) that is not UTF-8; {some}. Save it as UTF-8.")
            return
        if self._first:
            text = text.lstrip("\ufeff")
            self._first = False
        self.pending += text
        lines = self.pending.split("\n")
        self.pending = "" if final else lines.pop()
        for line in lines:
            self._line(line.rstrip("\r"))
            if self.reason:
                return

    def _line(self, line: str) -> None:
        self.line += 1
        self._record.append(line)
        record = "\n".join(self._record)
        if record.count('"') % 2:  # a quoted field goes on over the next line
            if len(self._record) >= MAX_FIELD_LINES:
                # (it may close further on, but a record is not held longer than this)
                self._fail("csv.quoting", f"A quoted field opened on line "
                           f"{self.line - len(self._record) + 1} goes on for more than "
                           f"{MAX_FIELD_LINES:,} lines: a closing quote is probably missing "
                           "(a field of more lines than that is not read).")
            return
        self._record = []
        if not record.strip():
            return
        try:
            fields = next(csv.reader([record], delimiter=self.delimiter, strict=True))
        except csv.Error as e:
            self._fail("csv.quoting", f"Line {self.line} cannot be read: {e}.")
            return
        if len(fields) > self.max_fields:
            self._fail("csv.too_many_columns", f"Line {self.line} has {len(fields)} fields; "
                       f"at most {self.max_fields} are read.")
        elif self.header is None:
            self.header = [f.strip() for f in fields]
            if len(set(self.header)) != len(self.header) or not all(self.header):
                self._fail("csv.bad_header", "The first line must name each column once "
                           f"(found {self.header[:20]}).")
        elif len(fields) != len(self.header):
            self._fail("csv.ragged_row", f"Line {self.line} has {len(fields)} fields; the "
                       f"header has {len(self.header)} (delimiter {self.delimiter!r}).")
        else:
            self.rows += 1

    def result(self) -> Identified:
        self.feed(b"", final=True)
        if not self.reason and self._record:
            self._fail("csv.quoting", f"A quoted field opened on line "
                       f"{self.line - len(self._record) + 1} is never closed.")
        if not self.reason and self.header is None:
            self._fail("csv.empty", "The CSV has no header line.")
        if self.reason:
            return Identified(FileKind.csv, reason=self.reason)
        assert self.header is not None
        return Identified(FileKind.csv, {
            "encoding": "utf-8-sig" if self.bom else "utf-8", "bom": self.bom,
            "delimiter": self.delimiter, "header": self.header, "columns": len(self.header),
            "rows": self.rows})


# --- head-only identification (DICOM, JPEG, PNG) ------------------------------------------------


def identify(head: bytes, size: int, path: str) -> Identified:
    """What the first bytes of a file tell, for the formats read from their head alone.
    Raises NeedMore when the headers run past `head`. TIFFs and CSVs are read by the adapter
    (they need more than a head); here they only get their kind."""
    fmt = sniff(head, path)
    kind = KIND_OF[fmt]
    if size == 0:
        return refused(kind, "file.empty", "The file is empty.")
    if fmt == "dicom":
        return dicom(head, size)
    if fmt in ("jpeg", "png"):
        return photo(head, size, fmt)
    if fmt == "unknown":
        return refused(kind, "file.unsupported_type", "Not a file imgest imports: DICOM, "
                       "JPEG/PNG/TIFF photos, TIFF-based slides (SVS, NDPI, pyramidal "
                       "TIFF), CSV, or archives of these.")
    return Identified(kind, {"format": fmt})


# --- project rules -------------------------------------------------------------------------------


def newest(*rules: ProjectRules | None) -> ProjectRules | None:
    known = [r for r in rules if r is not None]
    return max(known, key=lambda r: r.updated_at) if known else None


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return f"'{path}'" if path else "the metadata"


def _explain(error: jsonschema.ValidationError) -> str:
    """One schema failure as a person reads it: which field, what was wrong, what was
    expected."""
    v, expected = error.validator, error.validator_value
    if v == "required":
        missing = re.match(r"'(.*)' is a required property", error.message)
        name = missing.group(1) if missing else error.message
        return f"'{name}' is missing (required)"
    where, found = _where(error), error.instance
    if v == "enum":
        return f"{where} is {found!r}; expected one of {', '.join(map(repr, expected))}"
    if v == "const":
        return f"{where} is {found!r}; expected {expected!r}"
    if v == "type":
        return f"{where} is {found!r}; expected a {expected}"
    if v == "pattern":
        return f"{where} is {found!r}; expected text matching {expected!r}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        words = {"minimum": "at least", "exclusiveMinimum": "more than",
                 "maximum": "at most", "exclusiveMaximum": "less than"}
        return f"{where} is {found!r}; expected {words[str(v)]} {expected}"
    return f"{where}: {error.message}"


def check_rules(kind: FileKind, metadata: dict[str, Any], rules: ProjectRules | None
                ) -> Reason | None:
    """The project's verdict on a file: its kind accepted, its metadata matching the kind's
    schema. None if it passes (or the project sets no rules)."""
    if rules is None:
        return None
    if kind not in rules.accepted_kinds:
        takes = ", ".join(k.value for k in rules.accepted_kinds) or "no files"
        return Reason(code="project.kind_not_accepted", message=(
            f"Project {rules.project} takes {takes}; this file is {kind.value}."))
    schema = rules.metadata_rules.get(kind)
    if not schema:
        return None
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(metadata), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    shown = "; ".join(_explain(e) for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return Reason(code="project.rules", message=(
        f"The {kind.value}'s metadata breaks project {rules.project}'s rules: {shown}{more}."))


# --- duplicates within an upload -----------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """The first file of an upload with a key: its content (`sha256:…`) or its DICOM instance
    (`sop:…`)."""

    file_id: str
    path: str
    key: str


@dataclass(frozen=True)
class FileKeys:
    upload_id: str
    file_id: str
    path: str
    keys: tuple[str, ...]  # the content's first, then the instance's


def first_claims(files: list[FileKeys], known: dict[tuple[str, str], Claim]
                 ) -> tuple[dict[str, Claim], dict[tuple[str, str], Claim]]:
    """Walks the files in their order. One whose key a file before it holds (already `known`,
    or earlier in `files`) is a duplicate of that file and claims nothing; any other claims its
    keys. A file that holds a key itself (its event delivered again) is no duplicate.
    Returns {file_id: the claim it duplicates} and the new claims by (upload_id, key)."""
    owners = dict(known)
    duplicates: dict[str, Claim] = {}
    new: dict[tuple[str, str], Claim] = {}
    for f in files:
        claimed = []
        for key in f.keys:
            owner = owners.get((f.upload_id, key))
            if owner is None:
                owners[f.upload_id, key] = new[f.upload_id, key] = Claim(f.file_id, f.path, key)
                claimed.append((f.upload_id, key))
            elif owner.file_id != f.file_id:
                duplicates[f.file_id] = owner
                for k in claimed:  # a duplicate is nobody's first
                    del owners[k], new[k]
                break
    return duplicates, new
