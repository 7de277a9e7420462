"""What is an archive, which members count, and when an archive is a bomb: no I/O here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # local file header; empty archive
JUNK_DIRS = {"__MACOSX"}
JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_unpacked_bytes: int
    max_ratio: int


class ArchiveError(Exception):
    """The archive as a whole is refused; `code` is the stable reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def archive_format(head: bytes) -> str | None:
    return "zip" if head[:4] in ZIP_MAGIC else None


def member_path(raw: bytes) -> str | None:
    """The member's safe relative path, or None for directories and junk.

    Raises ArchiveError for a path that would escape (absolute, `..`, drive letters).
    """
    name = raw.decode("utf-8", errors="replace").replace("\\", "/")
    if name.endswith("/"):
        return None
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
        raise ArchiveError("archive.unsafe_path",
                           f"The archive member {name!r} points outside the archive.")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean or JUNK_DIRS & set(clean) or clean[-1] in JUNK_NAMES or clean[-1].startswith("._"):
        return None
    return "/".join(clean)


def check_growth(unpacked: int, packed: int, members: int, limits: Limits) -> None:
    if members > limits.max_members:
        raise ArchiveError("archive.too_many_members",
                           f"The archive holds more than {limits.max_members} files.")
    if unpacked > limits.max_unpacked_bytes:
        raise ArchiveError("archive.too_large",
                           f"The archive unpacks to more than {limits.max_unpacked_bytes} bytes.")
    if packed and unpacked > 1024**2 and unpacked / packed > limits.max_ratio:
        raise ArchiveError("archive.bomb", "The archive expands more than "
                           f"{limits.max_ratio}× its size; refusing it as a likely zip bomb.")


def file_id(upload_id: str, object_key: str, member: str | None) -> str:
    """Deterministic, so unpacking the same object again yields the same ids."""
    return hashlib.sha256(f"{upload_id}\0{object_key}\0{member or ''}".encode()).hexdigest()[:32]
