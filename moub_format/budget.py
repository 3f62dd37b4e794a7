"""The memory budget of reading one file: what the reader will materialise, counted before
it is materialised.

A file of a few hundred KB can declare gigabytes: a 2 GiB graph in an xz bomb, lookup tables of
2^20 entries per tiny tensor, grid codebooks of 2^24 values in 12 index bytes. Each such size is
checked against a cap of its own, but caps sized for a desktop let a small file exhaust a 1 GB
board, and per-item caps do not add up. So a reader charges everything it will create for a
file -- index objects, code tables, the decoded model, the graph, its working memory -- to one
:class:`MemoryBudget` before creating it, and refuses the file (``LimitError``) as soon as the
sum passes the budget. The plan is the same whatever the caller then does with the file
(``verify``, ``load``, ``decode``, a session), so all of them accept exactly the same files.

The default budget comes from the machine (:func:`default_memory_budget`): half of the memory
this process can use, so a file never claims more than that unless the caller says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import LimitError

MEMORY_BUDGET_CAP = 1 << 36      # a default never above 64 GiB, however big the machine
MEMORY_BUDGET_SHARE = 2          # the default is 1/2 of what the process can use


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, then v1), None when unlimited or unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 reports "unlimited" as a huge number
            return int(text)
    return None


def _address_space_left() -> int | None:
    """Address space this process may still map under RLIMIT_AS, None when it has no limit."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm") as handle:
            mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        mapped = 0
    return max(0, soft - mapped)


def default_memory_budget() -> int:
    """Half of the memory this process can use: the least of physical RAM, the cgroup's
    memory limit and the address space left under RLIMIT_AS, halved, and at most
    MEMORY_BUDGET_CAP. A 1 GB board gets 512 MB; a process under a 2 GiB address-space
    limit gets half of what its imports left free."""
    bounds = [value for value in (_physical_memory(), _cgroup_limit(), _address_space_left()) if value is not None]
    usable = min(bounds) if bounds else 2 * MEMORY_BUDGET_CAP
    return min(MEMORY_BUDGET_CAP, usable // MEMORY_BUDGET_SHARE)


@dataclass
class MemoryBudget:
    """Bytes a reader may materialise for one file, and what it has charged so far.

    Charges only add up (a plan, not a live count): everything the reader creates for the
    file at some point is charged once, before it is created."""

    limit: int
    filename: str
    used: int = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` for ``what``; LimitError when the total passes the budget."""
        self.used += nbytes
        if self.used > self.limit:
            before = self.used - nbytes
            raise LimitError(
                f"{self.filename}: {what} would take {nbytes} bytes; with the {before} bytes counted before, that exceeds "
                f"the memory budget of {self.limit} bytes (set ReaderLimits.memory_budget, or moub --memory-budget)"
            )

    @classmethod
    def of(cls, limits, filename: str) -> MemoryBudget:
        """The budget ``limits`` set (``limits.memory_budget``; None: :func:`default_memory_budget`)."""
        limit = limits.memory_budget if limits.memory_budget is not None else default_memory_budget()
        return cls(int(limit), filename)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``512K``, ``300M``, ``2G`` or ``1T`` (powers of 1024), for options."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 300M, 2G, 1073741824)") from None
    if value <= 0 or value != value:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value * units[unit])
