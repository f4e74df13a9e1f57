"""Memory the process gives back: allocator settings made once, before Arrow is imported.

drsync holds large, short-lived Arrow buffers and NumPy arrays (a manifest row group, a scan
batch). Arrow's own pool (mimalloc) and glibc's heap keep freed memory for reuse, which at a
million files adds 50 to 170 MiB of resident memory that nothing uses (measured with
``bench --only scale``). So drsync uses the system allocator for Arrow and asks glibc:

* to map allocations of :data:`MMAP_THRESHOLD` and more on their own, returning them to the kernel
  when freed. The threshold sits above the largest buffer drsync makes by the thousand: a stored
  chunk (up to 1 MiB + 4 KiB + 64), and an upload message of chunks (at most about 1 MiB,
  ``agent.primary.UPLOAD_MESSAGE_BYTES``). A mapped buffer is mapped, faulted in page by page, zeroed
  and unmapped each time: at glibc's 128 KiB, a 1 GiB agent-to-agent sync took 20 s instead of 14 s.
  It stays low enough that Arrow's and NumPy's larger buffers are mapped: at 9 MiB, ``repo gc`` at
  1,000,000 files peaked at 319 MiB instead of 281 (its freed buffers stayed inside the heap);
* to keep up to :data:`TRIM_THRESHOLD` of free memory at the top of a heap. Setting the mapping
  threshold leaves glibc's trim threshold at 128 KiB, so freeing one chunk-sized buffer at the top of
  the heap gave its pages back and the next buffer faulted them in again: serializing 1 GiB of
  upload messages took 2.5 to 3.1 s instead of 0.2 to 0.4 s, and a 1 GiB sync's transfer to the
  standby took 4.6 to 5.2 s instead of 2.4 to 3.5 s (measured on 2 cores, ``bench`` trees);
* for at most :data:`ARENA_MAX` heaps. Each thread that allocates otherwise gets a heap of its own
  (up to 8 per core), and each keeps what its thread freed: with chunk buffers in the heaps, a
  100,000-file first snapshot peaked 6 MiB higher with the default, and the same as at 128 KiB with
  two (the interpreter lock lets one thread allocate at a time anyway).

Chunk-sized blocks in the heaps come at a price at scale: what one phase frees (a window of a
scan, a plan's lists) stays resident inside a heap while the next phase peaks. :func:`give_back`
returns it between phases; with it, a 100,000-file restore peaked at 145 MiB instead of 154 (at
128 KiB: 142).

NumPy's linear-algebra library (OpenBLAS in NumPy's wheels) starts a thread per core when NumPy is
imported, each with a buffer of its own, and they spin a while: drsync does no linear algebra, so it
asks for one thread (``OPENBLAS_NUM_THREADS=1``). Every drsync process imports NumPy with Arrow; on 2
cores this took a command's start from 0.25 to 0.14 s of CPU time (``import pyarrow.compute``, the
same 0.14 s of wall time; ``make test`` starts about 4,300 Python processes). On a host of 64 cores
it would be 64 threads.

An operator's own choice is left as it is: ``OPENBLAS_NUM_THREADS``, ``ARROW_DEFAULT_MEMORY_POOL``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``, or ``glibc.malloc.mmap_threshold`` /
``glibc.malloc.trim_threshold`` / ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES``, when its value
is a number (decimal, or hexadecimal with ``0x``). An empty or unreadable value is no choice: glibc
takes it for 0 (map every buffer, keep nothing free), Arrow an empty pool name for its default.

The variables drsync sets are its own process's: a command it runs for the operator (a hook, a
fencing or switchover command, DistCp) gets the environment drsync was started with
(:func:`environ_for_children`).
"""

from __future__ import annotations

import ctypes
import os
import re

MMAP_THRESHOLD = 1152 * 1024  # bytes: above fmt.STORED_MAX (1 MiB + 4 KiB + 64) and an upload message
TRIM_THRESHOLD = 16 * 1024 * 1024  # bytes of free memory a heap keeps at its top
ARENA_MAX = 2
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


_NUMBER = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")


def _chosen(variable: str, tunable: str, tunables: dict[str, str]) -> bool:
    """Whether the operator set this glibc setting to a number, by its variable or in GLIBC_TUNABLES."""
    return any(_NUMBER.fullmatch(v.strip()) for v in (os.environ.get(variable, ""), tunables.get(tunable, "")))


# What drsync put in os.environ for itself: each variable and the value the operator's environment had
# (None: unset).
_SET_BY_DRSYNC: dict[str, str | None] = {}
# What the interpreter itself may write into os.environ as it starts: PEP 538's locale coercion sets
# LC_CTYPE (to C.UTF-8) when the operator's locale is C or none at all.
_SET_BY_PYTHON = ("LC_CTYPE",)


def set_for_this_process(variable: str, value: str, *, blank_is_unset: bool = True) -> None:
    """Set an environment variable that a library reads as it loads, unless the operator set it (to a
    non-blank value; with ``blank_is_unset=False``, to anything). Commands drsync runs do not get it
    (:func:`environ_for_children`)."""
    current = os.environ.get(variable)
    if current is None or (blank_is_unset and not current.strip()):
        _SET_BY_DRSYNC.setdefault(variable, current)
        os.environ[variable] = value


def _startup_environ() -> dict[str, str] | None:
    """The environment this process was started with (Linux keeps it in /proc/self/environ, whatever the
    process set since); None where it cannot be read."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {os.fsdecode(k): os.fsdecode(v) for k, _, v in pairs}


def environ_for_children(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a command drsync runs (a hook, fencing, DistCp): drsync's own, with what
    drsync and the interpreter set for this process put back as the operator's environment had it, and
    ``extra`` on top."""
    env = dict(os.environ)
    originals: dict[str, str | None] = dict(_SET_BY_DRSYNC)
    startup = _startup_environ() if any(v in env for v in _SET_BY_PYTHON) else None
    if startup is not None:
        originals.update({v: startup.get(v) for v in _SET_BY_PYTHON})
    for variable, original in originals.items():
        if original is None:
            env.pop(variable, None)
        else:
            env[variable] = original
    return {**env, **(extra or {})}


def tune() -> None:
    """Set the allocators (and NumPy's BLAS threads) up; call before pyarrow or numpy is imported. Does
    nothing where they cannot be set."""
    set_for_this_process("ARROW_DEFAULT_MEMORY_POOL", "system")
    set_for_this_process("OPENBLAS_NUM_THREADS", "1")  # read when NumPy loads OpenBLAS
    try:  # the C library the interpreter links (ctypes.util.find_library runs ldconfig: 15 ms a start)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    # e.g. glibc.malloc.arena_max=8:glibc.malloc.mmap_threshold=...
    tunables = dict(t.partition("=")[::2] for t in os.environ.get("GLIBC_TUNABLES", "").split(":"))
    if not _chosen("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", tunables):
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if not _chosen("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold", tunables):
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not _chosen("MALLOC_ARENA_MAX", "glibc.malloc.arena_max", tunables):
        mallopt(_M_ARENA_MAX, ARENA_MAX)


def _malloc_trim() -> object:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def give_back() -> None:
    """Return the free pages of glibc's heaps to the kernel (``malloc_trim(0)``: a few milliseconds).

    Called between the phases of work at scale (planning, a window of staged files): what one phase
    freed inside a heap is not resident while the next one peaks. Does nothing where glibc is not."""
    if _TRIM is not None:
        _TRIM(0)  # type: ignore[operator]
