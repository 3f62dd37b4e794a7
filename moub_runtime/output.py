"""Whether an output path can be written, asked before any work starts (the converter and
``moub decode`` both write atomically, so a bad path would otherwise fail only at the end)."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """One line naming ``path`` and why it cannot be written (folder missing or read-only,
    a directory, a read-only file), or None when it can."""
    p = Path(path)
    if p.is_dir():
        return f"{p}: is a directory"
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        return f"{p}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{p}: folder {folder} is not writable"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{p}: exists and is not writable"
    return None
