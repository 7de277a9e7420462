"""What is an archive, which members count, and when an archive is a bomb: no I/O here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
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


COMPRESSED = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}  # magic → tar.{suffix}
HEAD = 512  # bytes enough to know any format here (a tar header block)


def compression(head: bytes) -> str | None:
    """gz, bz2 or xz if the bytes start a compressed stream (its content is another matter)."""
    return next((name for magic, name in COMPRESSED.items() if head.startswith(magic)), None)


def is_tar_header(block: bytes) -> bool:
    """A tar header block: POSIX/GNU magic, or (old V7 tars) a checksum that adds up."""
    if len(block) < HEAD or not block[0]:
        return False
    if block[257:262] == b"ustar":
        return True
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"x", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:HEAD])


def archive_format(head: bytes, unpacked_head: bytes | None = None) -> str | None:
    """zip, tar, tar.gz, tar.bz2 or tar.xz by content (never by name); None for anything else,
    also a compressed file that is not a tar (it passes through as it is). `unpacked_head`:
    the first bytes of a compressed stream, decompressed."""
    if head[:4] in ZIP_MAGIC:
        return "zip"
    if is_tar_header(head[:HEAD]):
        return "tar"
    suffix = compression(head)
    if suffix and unpacked_head is not None and is_tar_header(unpacked_head[:HEAD]):
        return f"tar.{suffix}"
    return None


# What a member may be: a file is unpacked; anything else is refused or skipped.
LINK, SPECIAL, DIRECTORY, FILE = "link", "special", "directory", "file"


@dataclass
class Tally:
    """What one upload's archive has yielded so far, nested archives included: the limits hold
    for the whole, and the ratio is against the outermost archive's size."""

    limits: Limits
    packed: int
    members: int = 0
    skipped: int = 0
    unpacked: int = 0
    paths: set[str] = field(default_factory=set)

    def member(self, raw: bytes | str, kind: str, encrypted: bool = False) -> str | None:
        """The member's path if it is to be unpacked; None for directories and junk. Raises
        for what makes the whole archive unacceptable."""
        name = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        path = member_path(raw if isinstance(raw, bytes) else raw.encode(
            "utf-8", "surrogateescape"))  # (tarfile's names keep undecodable bytes so)
        if path is None or kind == DIRECTORY:
            self.skipped += 1
            return None
        if kind == LINK:
            raise ArchiveError("archive.link", f"The archive member {name!r} is a link; links "
                               "are refused (they can point anywhere). Send the file itself.")
        if kind == SPECIAL:
            raise ArchiveError("archive.special_file", f"The archive member {name!r} is a "
                               "device, FIFO or socket, not a file.")
        if encrypted:
            raise ArchiveError("archive.encrypted", f"The archive member {name!r} is "
                               "encrypted; send the archive without a password.")
        if path in self.paths:
            raise ArchiveError("archive.duplicate_member", f"The archive holds {path!r} more "
                               "than once; which one is meant cannot be known.")
        self.paths.add(path)
        self.members += 1
        check_growth(self.unpacked, self.packed, self.members + self.skipped, self.limits)
        return path

    def grew(self, n: int) -> None:
        self.unpacked += n
        check_growth(self.unpacked, self.packed, self.members + self.skipped, self.limits)


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
