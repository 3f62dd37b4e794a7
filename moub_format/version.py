"""The version of the ``moub`` distribution, declared once (pyproject.toml) and read from the
installed package's metadata. Each package's ``__version__`` and the producer string written
into every file come from here; a checkout that is not installed reports ``0+unknown``."""

from __future__ import annotations

import functools

DISTRIBUTION = "moub"
UNKNOWN = "0+unknown"


@functools.lru_cache(maxsize=1)
def distribution_version() -> str:
    """``importlib.metadata`` costs a few milliseconds to import: callers ask for it lazily
    (a module ``__getattr__``), never at the import of the runtime."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN
