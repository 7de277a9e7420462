"""Identifying files and reading their headers from bytes: no I/O here.

DICOM is read with pydicom up to the pixel data only; photos' EXIF with exifread. Labels follow
XNAT's conventions: `Project: P Subject: S Session: E` in Patient/Study Comments wins; otherwise
the subject is the patient's name and the session the patient ID.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import exifread
import pydicom
from imgest_contracts import FileKind, Reason, SessionHints

HEAD_BYTES = 64 * 1024


class NeedMore(Exception):
    """The headers go on past the bytes read so far."""


@dataclass
class Identified:
    kind: FileKind
    metadata: dict[str, Any] = field(default_factory=dict)
    hints: SessionHints = field(default_factory=SessionHints)
    reason: Reason | None = None  # set when the file is refused


def sniff(head: bytes, path: str) -> FileKind:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return FileKind.dicom
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return FileKind.photo
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return FileKind.photo
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return FileKind.slide
    if path.lower().endswith(".dcm"):
        return FileKind.dicom  # DICOM without a preamble; the parser decides
    return FileKind.unknown


_LABEL_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_XNAT_FIELD = re.compile(r"(Project|Subject|Session|AA)\s*:\s*([^\s;,]+)", re.IGNORECASE)


def label(value: Any) -> str | None:
    """An XNAT-safe label: letters, digits, '_' and '-'."""
    text = _LABEL_BAD.sub("_", str(value or "").strip()).strip("_")
    return text[:64] or None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def dicom(head: bytes, size: int) -> Identified:
    """Parses the header from `head` (the first bytes of a file of `size` bytes)."""
    fp = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=head[128:132] != b"DICM")
    except Exception as e:  # pydicom raises many kinds (struct.error, …) on cut data
        if len(head) < size:
            raise NeedMore() from e
        return Identified(FileKind.dicom, reason=Reason(
            code="dicom.malformed", message=f"The DICOM header cannot be read: {e}"))
    if fp.tell() >= len(head) and len(head) < size:
        raise NeedMore()  # stopped at the end of what was read, not at the pixel data
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
               if not _text(ds, k)]
    if missing:
        return Identified(FileKind.dicom, reason=Reason(
            code="dicom.missing_uid",
            message=f"The DICOM file lacks {', '.join(missing)}; it cannot be placed in a study."))
    fields: dict[str, str] = {}
    for keyword in ("PatientComments", "StudyComments", "AdditionalPatientHistory"):
        for key, value in _XNAT_FIELD.findall(_text(ds, keyword) or ""):
            fields.setdefault(key.lower(), value)
    series_number = _text(ds, "SeriesNumber")
    meta = {k: _text(ds, k) for k in (
        "Modality", "StudyDate", "StudyTime", "StudyDescription", "SeriesDescription",
        "SeriesNumber", "InstanceNumber", "PatientID", "PatientName", "Manufacturer",
        "SOPClassUID", "AccessionNumber", "StudyID")}
    transfer = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta["TransferSyntaxUID"] = str(transfer) if transfer else None
    hints = SessionHints(
        project=label(fields.get("project")),
        subject=label(fields.get("subject")) or label(_text(ds, "PatientName"))
        or label(_text(ds, "PatientID")),
        session=label(fields.get("session")) or label(_text(ds, "PatientID")),
        auto_archive={"true": True, "false": False}.get((fields.get("aa") or "").lower()),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality"),
        scan=label(series_number) or label(_text(ds, "SeriesInstanceUID")),
    )
    return Identified(FileKind.dicom, {k: v for k, v in meta.items() if v}, hints)


_EXIF_KEEP = ("Image Make", "Image Model", "EXIF DateTimeOriginal", "Image DateTime",
              "EXIF ExifImageWidth", "EXIF ExifImageLength", "Image Orientation",
              "GPS GPSLatitude", "GPS GPSLongitude", "Image Software")


def photo(head: bytes) -> Identified:
    try:
        tags = exifread.process_file(io.BytesIO(head), details=False)
    except Exception as e:  # noqa: BLE001 - exifread raises many kinds on damaged files
        return Identified(FileKind.photo, reason=Reason(
            code="photo.malformed", message=f"The image's metadata cannot be read: {e}"))
    meta = {k.replace(" ", "."): str(tags[k]) for k in _EXIF_KEEP if k in tags}
    return Identified(FileKind.photo, meta)


def identify(head: bytes, size: int, path: str) -> Identified:
    """Raises NeedMore when the headers run past `head`."""
    kind = sniff(head, path)
    if size == 0:
        return Identified(kind, reason=Reason(code="file.empty", message="The file is empty."))
    if kind is FileKind.dicom:
        return dicom(head, size)
    if kind is FileKind.photo:
        return photo(head)
    return Identified(kind, reason=Reason(
        code="file.unsupported_type",
        message="Not a file imgest imports (DICOM, JPEG/PNG/TIFF photos, zip archives)."))
