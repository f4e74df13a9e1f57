"""Memory the process gives back: allocator settings made once, before Arrow is imported.

drsync holds large, short-lived Arrow buffers and NumPy arrays (a manifest row group, a scan
batch). Arrow's own pool (mimalloc) and glibc's heap keep freed memory for reuse, which at a
million files adds 50 to 170 MiB of resident memory that nothing uses (measured with
``bench --only scale``). So drsync uses the system allocator for Arrow and asks glibc to map
allocations of 128 KiB and more on their own, returning them to the kernel when freed. An
operator's own ``ARROW_DEFAULT_MEMORY_POOL`` or ``MALLOC_MMAP_THRESHOLD_`` is left as it is.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 128 * 1024  # bytes
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def tune() -> None:
    """Set the allocators up; call before pyarrow is imported. Does nothing where they cannot be set."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:  # the C library the interpreter links (ctypes.util.find_library runs ldconfig: 15 ms a start)
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        return
