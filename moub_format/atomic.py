"""Output files that appear complete or not at all.

A file is written under a temporary name in its target's folder, flushed to disk and renamed
over the target, so a reader (possibly one that has the old file mapped) sees the old file or
the new one, never a part, and an existing file is never truncated.

* Temporary names are unique per write, ``.NAME.PID.RANDOM.tmp``: concurrent writers of one
  target never share one, and each names the process that writes it.
* A kill leaves its temporary file behind (nothing runs to remove it); the next write of the
  same target removes every temporary file of that target whose process no longer runs, so
  they do not accumulate. (Linux's ``O_TMPFILE`` would leave nothing even on a kill, but it is
  Linux-only, not on every filesystem, and cannot replace an existing file by itself.)
* The finished file gets the mode a plain ``open(path, "w")`` gives: an existing target's mode
  is kept, a new file is created with 0o666 minus the umask (and the folder's default ACL).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def folder_of(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def temp_path(target: Path) -> Path:
    """A fresh temporary name for a write of ``target``, in its folder."""
    return folder_of(target) / f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # a process of another user, or no way to tell: leave its file alone
    return True


def stale_temp_files(target: Path) -> list[Path]:
    """Temporary files of earlier writes of ``target`` whose writing process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]{{16}}{re.escape(TEMP_SUFFIX)}")
    try:
        names = os.listdir(folder_of(target))
    except OSError:
        return []
    stale = []
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _running(int(match.group(1))):
            stale.append(folder_of(target) / name)
    return stale


def remove_stale_temp_files(target: Path) -> None:
    for path in stale_temp_files(target):
        with contextlib.suppress(OSError):
            path.unlink()


def _existing_mode(target: Path) -> int | None:
    try:
        info = target.stat()
    except OSError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut (best effort: not every
    system can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """A write of ``target``: bytes go to a temporary file; :meth:`commit` makes it the target,
    :meth:`discard` (or leaving the ``with`` block without a commit) removes it. A failed write
    (no space left, ...) raises OSError naming the target."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        remove_stale_temp_files(self.target)
        self.tmp = temp_path(self.target)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            mode = _existing_mode(self.target)
            if mode is not None:
                os.fchmod(fd, mode)
            self.handle = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        self.committed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.handle.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.target)) from None

    def seek(self, position: int) -> None:
        self.handle.seek(position)

    def commit(self, target: Path | None = None) -> None:
        """Flush to disk and rename over the target (or over ``target``, a name in the same
        folder decided only now, such as a data file named by its content)."""
        final = target if target is not None else self.target
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, final)
        except OSError as exc:
            self.discard()
            raise OSError(exc.errno, exc.strerror, str(final)) from None
        self.committed = True
        sync_folder(folder_of(final))

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.discard()


def write_atomic(path: str | os.PathLike, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or pieces written one after the other) to ``path`` atomically
    (see the module docstring); on any failure no file is left behind."""
    pieces = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with AtomicFile(path) as out:
        for piece in pieces:
            out.write(piece)
        out.commit()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (flock on the folder itself, no lock file),
    so that writers replacing a pair of files in it take turns; without flock, no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
