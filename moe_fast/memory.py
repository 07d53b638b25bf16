"""Reading the process's peak resident memory, the CPU side of every peak-memory report."""

from __future__ import annotations

import os
import resource


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (reset by exec and by writing "5" to
    /proc/self/clear_refs, unlike ru_maxrss, which a child process inherits from the parent that
    forked it), else ru_maxrss."""
    hwm = vm_hwm_bytes()
    return hwm if hwm is not None else process_max_rss_bytes()


def _proc_kib(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a /proc file, in bytes; None where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vm_hwm_bytes() -> int | None:
    """Linux's RSS high-water mark (VmHWM in /proc/self/status), or None where there is none."""
    return _proc_kib("/proc/self/status", "VmHWM")


def available_ram_bytes() -> int:
    """Memory the machine can give a new allocation now: Linux's MemAvailable, else free pages."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def process_max_rss_bytes() -> int:
    """``getrusage``'s lifetime peak of this process (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Starts a new VmHWM period (Linux: "5" to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
