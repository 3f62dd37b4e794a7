"""Peak memory of a benchmark subprocess, measured so that the process that started it does not count.

``getrusage(RUSAGE_SELF).ru_maxrss`` keeps the high-water mark from before ``exec``: a process
forked by a bench holding gigabytes of samples reports the bench's size (a fresh Python started by
a 2 GB process reads 1.98 GB there, 11 MB in VmHWM). ``VmHWM`` belongs to the process's own memory
map, which ``exec`` replaces.
"""
from __future__ import annotations

import resource


def own_peak_kib() -> int:
    """This process's peak resident set since it began running its program (VmHWM), in KiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def children_peak_kib() -> int:
    """The largest peak of the children this process waited for (forked from it, so small before
    their exec), in KiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
