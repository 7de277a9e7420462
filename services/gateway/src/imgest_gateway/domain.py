"""Upload status rules, free of I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from imgest_contracts import UploadCounts
from imgest_runtime.store import MAX_NAME, fit_name

# A file's state only moves forward; events from different topics may arrive in any order.
FILE_STATE_RANK = {"staged": 1, "validated": 2, "failed": 3, "rejected": 3, "cancelled": 3,
                   "duplicate": 3, "prearchived": 4, "archived": 4}

MAX_FILENAME = MAX_NAME
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadFilename(ValueError):
    pass


def safe_filename(name: str | None) -> str:
    """The last path component of what the client called the file, made safe to be the last
    component of an object key: control characters become `_`, a name that is no name (`.`,
    `..`, blanks) becomes `file`, and a name longer than 255 UTF-8 bytes is shortened, keeping
    its extension. Only a missing name is refused: a browser or scanner sends whatever name the
    file has, and the upload should not fail for it."""
    if not name:
        raise BadFilename("A file name is required: the 'filename' query parameter, the URL, "
                          "or a form part's filename (an empty file input sends none).")
    base = PurePosixPath(_CONTROL.sub("_", name).replace("\\", "/")).name.strip()
    if base in ("", ".", ".."):
        base = "file"
    return fit_name(base, MAX_FILENAME)


# A file in these states is not placed yet: a stuck upload sends its last event again.
UNPLACED = {"staged", "validated", "rejected"}


def upload_state(counts: UploadCounts) -> str:
    """The word a user reads once an upload completed (files in CONFLICT wait in the
    prearchive too)."""
    done = counts.archived + counts.prearchived + counts.conflicted
    if counts.files and counts.archived == counts.files:
        return "archived"
    if counts.files and done == counts.files:
        return "prearchived"
    if done:
        return "partial"
    return "failed"


# --- files arriving in an open upload ------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """A file just stored in an open upload, not yet recorded."""

    object_key: str
    filename: str
    size: int
    sha256: str
    content_type: str | None = None


@dataclass(frozen=True)
class Verdict:
    arrival: Arrival
    state: str  # added | duplicate (recorded, skipped) | refused (not recorded)
    reason: dict | None = None
    status: int = 201  # for a refused file: the HTTP status it would have on its own


def sort_arrivals(arrivals: list[Arrival], *, upload_id: str, project: str | None,
                  in_upload: Mapping[str, str], archived: Mapping[str, tuple[str, str]],
                  room: int, cap: int) -> list[Verdict]:
    """What becomes of each arriving file, in order: a duplicate of a file already in the
    upload (`in_upload`: sha256 → its name), of an earlier one in the same batch, or of one
    archived in the project (`archived`: sha256 → (path, upload)) is skipped and said why; past
    the project's cap (`room` files left of `cap`) it is refused; otherwise added."""
    seen = dict(in_upload)
    verdicts = []
    for a in arrivals:
        if a.sha256 in archived:
            path, earlier = archived[a.sha256]
            verdicts.append(Verdict(a, "duplicate", {"code": "upload.already_archived", "message": (
                f"The same content as {path!r} (upload {earlier}), already in project "
                f"{project}; skipped.")}))
        elif a.sha256 in seen:
            verdicts.append(Verdict(a, "duplicate", {"code": "upload.duplicate", "message": (
                f"The same content as {seen[a.sha256]!r}, already in this upload; skipped.")}))
        elif room <= 0:
            verdicts.append(Verdict(a, "refused", {"code": "upload.too_many_files", "message": (
                f"Upload {upload_id} holds {cap} files, the most project {project} allows in "
                "one upload (max_files_per_upload); submit it and start another.")}, 409))
        else:
            seen[a.sha256] = a.filename
            room -= 1
            verdicts.append(Verdict(a, "added"))
    return verdicts
