"""What is an archive, which members count, and when an archive is a bomb: no I/O here."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from xml.etree import ElementTree

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
    expected: int | None = None  # files in all, once an archive's directory said

    def member(self, raw: bytes | str, kind: str, encrypted: bool = False, prefix: str = ""
               ) -> str | None:
        """The member's path if it is to be unpacked; None for directories and junk. Raises
        for what makes the whole archive unacceptable. `prefix`: the path of the archive it
        is in, inside the upload's archive (names are unique per archive)."""
        name = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        path = member_path(name.encode("utf-8", "surrogateescape"))  # (tarfile keeps bad bytes so)
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
        if len(prefix + path) > MAX_MEMBER_PATH:
            raise ArchiveError("archive.path_too_long", f"The archive member {name[:80]!r}… "
                               f"has a path of {len(prefix + path):,} characters; imgest keeps "
                               f"paths of up to {MAX_MEMBER_PATH:,} inside an archive.")
        if prefix + path in self.paths:
            raise ArchiveError("archive.duplicate_member", f"The archive holds {path!r} more "
                               "than once; which one is meant cannot be known.")
        self.paths.add(prefix + path)
        self.members += 1
        check_growth(self.unpacked, self.packed, self.members + self.skipped, self.limits)
        return path

    def grew(self, n: int) -> None:
        self.unpacked += n
        check_growth(self.unpacked, self.packed, self.members + self.skipped, self.limits)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A member's path inside the upload's archive; with the archive's own name (at most 1,024)
# it fits the 4,096 characters the services keep of a file's path.
MAX_MEMBER_PATH = 3000


def member_path(raw: bytes | str) -> str | None:
    """The member's safe relative path, or None for directories and junk; control characters
    become `_` (no store takes them in a key).

    Raises ArchiveError for a path that would escape (absolute, `..`, drive letters).
    """
    name = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    name = _CONTROL.sub("_", name).replace("\\", "/")
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


# --- multi-file slides -----------------------------------------------------------------------------
#
# A whole-slide image in several files travels as one *fileset*: its index file at the root of
# the archive, the related files where the vendor's software expects them.
#   MRXS (3DHISTECH)   slide.mrxs + slide/Slidedat.ini + the Data*.dat files Slidedat.ini lists
#   VSI (Olympus)      slide.vsi + _slide_/stack*/frame_t*.ets
#   AFI (Leica/Aperio) slide.afi (XML) + the .svs files its <Path> elements name
#   NDPIS (Hamamatsu)  slide.ndpis (INI) + the .ndpi files its ImageN= lines name

INDEX_FORMATS = {".mrxs": "mrxs", ".vsi": "vsi", ".afi": "afi", ".ndpis": "ndpis"}


@dataclass(frozen=True)
class FilesetPlan:
    format: str
    index: str  # the index file's path
    files: tuple[str, ...]  # the companions' paths, in order


def listing_files(paths: list[str]) -> list[str]:
    """The members whose text a fileset check needs: AFI and NDPIS indexes, MRXS Slidedat.ini."""
    wanted = []
    for path in paths:
        stem, suffix = _split(path)
        fmt = INDEX_FORMATS.get(suffix)
        if fmt in ("afi", "ndpis"):
            wanted.append(path)
        elif fmt == "mrxs":
            wanted += [p for p in _inside(paths, f"{stem}/") if p.lower().endswith(
                "/slidedat.ini")]
    return wanted


# What a set's folder may hold; anything else there is a file of its own.
_FOLDER_FILES = {"mrxs": (".dat", ".ini"), "vsi": (".ets",)}
_LISTED_FILES = {"afi": (".svs", ".tif", ".tiff"), "ndpis": (".ndpi",)}
_MAY_JOIN = {*INDEX_FORMATS, *(s for group in (_FOLDER_FILES, _LISTED_FILES)
                               for suffixes in group.values() for s in suffixes)}


def may_join_fileset(path: str) -> bool:
    """Whether the member could be part of a multi-file slide (an index, or what one names),
    which only the archive's whole listing tells; any other member is a file of its own as
    soon as it is unpacked."""
    return path.lower().endswith(tuple(_MAY_JOIN))  # (as slides match their files)


def plan_filesets(paths: list[str], texts: dict[str, str]) -> tuple[list[FilesetPlan], list[str]]:
    """Splits an archive's members (paths relative to its root) into multi-file slides and the
    loose files that remain. `texts`: the content of the members `listing_files` named. Raises
    ArchiveError for a set that is incomplete or misplaced, saying what is wrong."""
    filesets: list[FilesetPlan] = []
    indexes = [p for p in sorted(paths) if _split(p)[1] in INDEX_FORMATS]
    taken = set(indexes)
    for index in indexes:
        fmt = INDEX_FORMATS[_split(index)[1]]
        if "/" in index:
            raise ArchiveError("slide.index_not_at_root", (
                f"The {fmt.upper()} slide {index!r} is not at the archive's root: put "
                f"{PurePosixPath(index).name} at the top of the archive, with its related "
                "files where they belong beside it."))
        files = _companions(fmt, index, paths, texts)
        shared = [f for f in files if f in taken]
        if shared:
            raise ArchiveError("slide.shared_companion", (
                f"The slide {index!r} names {', '.join(shared)}, which belongs to another "
                "slide (or is one); each file can be part of one slide only."))
        taken |= set(files)
        filesets.append(FilesetPlan(fmt, index, tuple(files)))
    return filesets, [p for p in paths if p not in taken]


def _inside(paths: list[str], folder: str) -> list[str]:
    """The paths under `folder`, its name matched whatever its case."""
    return sorted(p for p in paths if p.lower().startswith(folder.lower()))


def _companions(fmt: str, index: str, paths: list[str], texts: dict[str, str]) -> list[str]:
    stem = _split(index)[0]
    by_lower = {p.lower(): p for p in paths}
    if fmt in _FOLDER_FILES:
        folder = f"{stem}/" if fmt == "mrxs" else f"_{stem}_/"
        inside = [p for p in _inside(paths, folder) if p.lower().endswith(_FOLDER_FILES[fmt])]
        if fmt == "vsi":
            if not inside:
                raise ArchiveError("slide.missing_companion", (
                    f"The VSI slide {index!r} comes without its image data: the folder "
                    f"{folder} with stack*/frame_t*.ets files is missing."))
            return inside
        ini = by_lower.get(f"{folder}slidedat.ini".lower())
        if ini is None:
            raise ArchiveError("slide.missing_companion", (
                f"The MRXS slide {index!r} comes without {folder}Slidedat.ini (its folder "
                f"{folder} must hold Slidedat.ini and the Data*.dat files)."))
        listed = _mrxs_data_files(texts.get(ini, ""))
        missing = [n for n in listed if f"{folder}{n}".lower() not in by_lower]
        if not listed or missing:
            raise ArchiveError("slide.missing_companion", (
                f"The MRXS slide {index!r} lacks data files its Slidedat.ini names: "
                f"{', '.join(missing) or 'none are listed'} (expected in {folder})."))
        return inside
    listed = (_afi_files(texts.get(index, "")) if fmt == "afi"
              else _ndpis_files(texts.get(index, "")))
    wrong = [n for n in listed if not n.lower().endswith(_LISTED_FILES[fmt])]
    if wrong:
        raise ArchiveError("slide.bad_companion", (
            f"The {fmt.upper()} slide {index!r} names files that are no slide images: "
            f"{', '.join(wrong)} (expected {' or '.join(_LISTED_FILES[fmt])})."))
    missing = [n for n in listed if n.lower() not in by_lower]
    if not listed or missing:
        raise ArchiveError("slide.missing_companion", (
            f"The {fmt.upper()} slide {index!r} names image files that are not in the "
            f"archive beside it: {', '.join(missing) or 'it names none'}."))
    return [by_lower[n.lower()] for n in listed]


def _split(path: str) -> tuple[str, str]:
    pure = PurePosixPath(path)
    return str(pure.with_suffix("")) if pure.suffix else path, pure.suffix.lower()


def _mrxs_data_files(ini: str) -> list[str]:
    """Slidedat.ini's [DATAFILE] FILE_n = Data000n.dat entries."""
    section, files = "", []
    for line in ini.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().upper()
        elif section == "DATAFILE" and "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            if key.upper().startswith("FILE_") and key[5:].isdigit() and value:
                files.append(value)
    return files


def _afi_files(xml: str) -> list[str]:
    # expat refuses entity-expansion bombs (Python ≥ 3.7.1); the caller bounds the text.
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return []
    return [p.text.strip() for p in root.iter("Path") if p.text and p.text.strip()]


def _ndpis_files(ini: str) -> list[str]:
    files = []
    for line in ini.splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower().startswith("image") and key.strip()[5:].isdigit() and value:
            files.append(value.strip())
    return files
