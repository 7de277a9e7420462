"""Upload status rules, free of I/O."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from imgest_contracts import UploadCounts
from imgest_runtime.store import MAX_NAME, fit_name

# A file's state only moves forward; events from different topics may arrive in any order.
FILE_STATE_RANK = {"staged": 1, "validated": 2, "failed": 3, "rejected": 3, "prearchived": 4,
                   "archived": 4}

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
        raise BadFilename("A file name is required (the 'filename' query parameter or the URL).")
    base = PurePosixPath(_CONTROL.sub("_", name).replace("\\", "/")).name.strip()
    if base in ("", ".", ".."):
        base = "file"
    return fit_name(base, MAX_FILENAME)


# A file in these states is not placed yet: a stuck upload sends its last event again.
UNPLACED = {"staged", "validated", "rejected"}


def advances(current: str | None, new: str) -> bool:
    return current is None or FILE_STATE_RANK.get(new, 0) >= FILE_STATE_RANK.get(current, 0)


def upload_state(counts: UploadCounts) -> str:
    """The word a user reads once an upload completed."""
    done = counts.archived + counts.prearchived
    if counts.files and counts.archived == counts.files:
        return "archived"
    if counts.files and done == counts.files:
        return "prearchived"
    if done:
        return "partial"
    return "failed"
