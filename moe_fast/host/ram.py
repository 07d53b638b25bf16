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


def release_freed_memory() -> bool:
    """Hands the C heap's free pages back to the system (glibc ``malloc_trim``); False elsewhere.

    Why: streaming frees one decoder layer's weights before the next is read. Tensors under
    glibc's mmap threshold (which grows up to 32 MiB as large blocks are freed) come from the heap,
    and the freed layers' pages stay resident there, so the peak would grow with depth."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None
