"""drsync sets its allocators up before Arrow is imported (drsync.allocators), and leaves an
operator's own choice alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = "import drsync, pyarrow as pa; print(pa.default_memory_pool().backend_name)"


def _backend(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_arrow_uses_the_system_allocator_unless_the_operator_chose_one() -> None:
    base = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _backend(base) == "system"
    assert _backend({**base, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"


# A probe's start: drsync imported (its allocator settings made), and glibc's mallinfo2 (``hblkhd``: bytes mapped
# on their own).
MALLINFO = """
import ctypes, drsync

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
"""

MAPPED = MALLINFO + """
from drsync.repository import format as fmt

def mapped_with(size):
    before = libc.mallinfo2().hblkhd
    buf = bytearray(size)
    during = libc.mallinfo2().hblkhd
    del buf
    after = libc.mallinfo2().hblkhd
    return during - before, during - after

print(*mapped_with(fmt.STORED_MAX), *mapped_with(2 << 20), *mapped_with(64 << 20))
"""


def test_chunk_buffers_come_from_the_heap_and_larger_buffers_go_back_to_the_kernel() -> None:
    """A chunk-sized buffer (and an upload message, tests/test_upload_messages.py) is not mapped on its
    own (mapping, faulting in and unmapping each of the thousands a second costs 30 % of a full sync);
    a larger one is, and is unmapped when freed: Arrow's and NumPy's buffers of 2 MiB and more kept in
    the heap took ``repo gc`` at 1,000,000 files from 281 to 319 MiB."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", MAPPED], env=env, capture_output=True, text=True, check=True)
    chunk_mapped, chunk_unmapped, two_mapped, two_unmapped, large_mapped, large_unmapped = map(int, out.stdout.split())
    assert (chunk_mapped, chunk_unmapped) == (0, 0)
    assert two_mapped >= 2 << 20 and two_unmapped >= 2 << 20
    assert large_mapped >= 64 << 20 and large_unmapped >= 64 << 20


REFAULTS = """
import resource, sys, drsync

def page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

size = int(sys.argv[1])
buf = b"\\1" * size  # the heap grows once
del buf
before = page_faults()
for _ in range(50):
    buf = b"\\1" * size  # freed at the top of the heap each time, as chunk and message buffers are
    del buf
print(page_faults() - before)
"""


def _refaults(size: int, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", REFAULTS, str(size)], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_a_freed_chunk_or_message_buffer_is_reused_not_faulted_in_again() -> None:
    """The heap keeps the pages of a buffer freed at its top for the next one: glibc's 128 KiB trim threshold
    gave them back at every free, and each of the thousands of buffers a second was faulted in again page
    by page (1 GiB of upload messages took 2.5 s to serialize instead of 0.3 s). 50 buffers of 256 KiB and
    of 1 MiB fault in well under one buffer's pages each; an operator's own threshold is left as it is."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    for size in (256 << 10, 1 << 20):
        pages = size // 4096
        assert _refaults(size, base) < 50 * pages // 10, size
        assert _refaults(size, {**base, "MALLOC_TRIM_THRESHOLD_": "131072"}) >= 50 * pages // 2, size


ARENAS = """
import ctypes, threading, drsync

all_allocated = threading.Barrier(8)

def work():
    for _ in range(200):
        bytearray(300_000)
    # Alive until all have allocated: a thread that ends gives its heap to the next thread that starts.
    all_allocated.wait()

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" section per heap, on stderr
"""


def test_threads_share_at_most_two_heaps_unless_the_operator_chose() -> None:
    """Every heap keeps what its threads freed: a thread each (glibc's default, up to 8 a core) is
    resident memory nothing uses."""
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")}

    def arenas(env: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS], env=env, capture_output=True, text=True, check=True)
        return sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert 1 <= arenas(base) <= 2
    assert arenas({**base, "MALLOC_ARENA_MAX": "8"}) > 2


GIVE_BACK = """
import drsync
from drsync import allocators

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

blocks = [bytearray(512 * 1024) for _ in range(200)]  # 100 MiB of heap blocks (under the mapping threshold)
keep = bytearray(512 * 1024)  # allocated last: the freed blocks are a hole inside the heap, not its top
del blocks
before = resident()
allocators.give_back()
print(before - resident())
"""


def test_what_a_phase_freed_inside_the_heap_goes_back_to_the_kernel() -> None:
    """Chunk-sized buffers come from the heap; a phase that freed 100 MiB of them below a block still in use
    keeps them resident until :func:`drsync.allocators.give_back` (called between the phases of work at
    scale) returns them."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 90 << 20, out.stdout


THREADS = "import os, drsync, numpy; print(len(os.listdir('/proc/self/task')))"


def _threads_after_numpy(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_numpy_starts_no_blas_threads_unless_the_operator_asks_for_them() -> None:
    """OpenBLAS (NumPy's wheels) starts a spinning thread per core as NumPy loads; drsync does no linear
    algebra and asks for none: the process has only its main thread. An operator's own setting stands
    (on one core OpenBLAS starts no thread whatever it is asked, so that half needs two)."""
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    assert _threads_after_numpy(base) == 1
    if (os.cpu_count() or 1) >= 2:
        assert _threads_after_numpy({**base, "OPENBLAS_NUM_THREADS": "2"}) == 2


def test_a_hook_gets_the_environment_drsync_was_started_with(tmp_path: Path) -> None:
    """What drsync sets for itself (Arrow's pool, NumPy's BLAS threads) is not passed on: a snapshot hook
    (the same function runs the switchover hook; fencing and DistCp share ``environ_for_children``)
    sees the operator's environment, with the operator's own values where the operator chose them."""
    (tmp_path / "data").mkdir()
    seen = tmp_path / "hook-env"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\nid="c"\nrelease="1"\ndata="data"\nrepository="repo"\n'
                   f'[snapshots]\npre_hook = "env > {seen}"\n')
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "ARROW_DEFAULT_MEMORY_POOL")}

    def drsync(env: dict[str, str], *args: str) -> None:  # not run_drsync: it adds this process's environment
        proc = subprocess.run([sys.executable, "-m", "drsync", *args, "--config", str(cfg)], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    def hook_env(env: dict[str, str]) -> dict[str, str]:
        drsync(env, "snapshot", "create")
        return dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)

    drsync(base, "init")

    unset = hook_env(base)
    assert "OPENBLAS_NUM_THREADS" not in unset and "ARROW_DEFAULT_MEMORY_POOL" not in unset
    assert "DRSYNC_DATA" in unset  # the hook ran with its own variables too
    chosen = hook_env({**base, "OPENBLAS_NUM_THREADS": "3", "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"})
    assert (chosen["OPENBLAS_NUM_THREADS"], chosen["ARROW_DEFAULT_MEMORY_POOL"]) == ("3", "jemalloc")
