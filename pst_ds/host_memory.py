"""This process's peak resident memory, as the kernel counts it for this program alone."""

from __future__ import annotations

import resource
import sys


def peak_resident_bytes() -> int:
    """The high-water mark of this process's resident memory since it started its program.

    Linux's VmHWM belongs to the address space exec made, so it is this program's own. getrusage's
    ru_maxrss is not: Linux carries the parent's resident size at fork through exec into it, so a
    script started by a 1 GiB test worker reported 1 GiB before it allocated anything.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, others KiB
