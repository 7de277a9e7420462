"""Upload status rules, free of I/O."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from imgest_contracts import UploadCounts

# A file's state only moves forward; events from different topics may arrive in any order.
FILE_STATE_RANK = {"staged": 1, "validated": 2, "failed": 3, "rejected": 3, "prearchived": 4,
                   "archived": 4}

MAX_FILENAME = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadFilename(ValueError):
    pass


def safe_filename(name: str | None) -> str:
    """The last path component of what the client called the file; refuses what cannot be one."""
    if not name:
        raise BadFilename("A file name is required (the 'filename' query parameter or the URL).")
    if _CONTROL.search(name):
        raise BadFilename("The file name contains control characters.")
    base = PurePosixPath(name.replace("\\", "/")).name.strip()
    if base in ("", ".", ".."):
        raise BadFilename(f"{name!r} is not a file name.")
    if len(base.encode()) > MAX_FILENAME:
        raise BadFilename(f"The file name is longer than {MAX_FILENAME} bytes.")
    return base


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
