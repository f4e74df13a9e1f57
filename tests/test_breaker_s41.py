"""Breaker s41: the allocator change (drsync/allocators.py: heaps keep 16 MiB free at their top, buffers of
1152 KiB and more are mapped, at most 2 arenas, ``give_back`` between phases), attacked as an operator would: their
own allocator settings in every spelling glibc reads (variables, ``GLIBC_TUNABLES``), empty and garbage values, the
old settings against the new on the same data (same bytes), and threads encoding and trimming at once.

Every probe runs in a fresh interpreter (glibc reads its variables once, at start). Scale measurements (peak RSS at
1,000,000 files, standby RSS over many cycles, timings) were in the breaker's report, not here. Its scale finding:
with a 9 MiB mapping threshold (the change as first made) ``repo gc`` at 1,000,000 files peaked at 319 MiB, over
DESIGN.md's 300 MiB (281 MiB at 1152 KiB); the threshold stayed at 1152 KiB and upload messages were kept under it
(tests/test_allocators.py, tests/test_upload_messages.py). Its three findings on empty values are fixed: an empty or
unreadable value is no choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tree, run_drsync, tree_state
from tests.test_allocators import ARENAS, MALLINFO, REFAULTS

ALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES",
              "ARROW_DEFAULT_MEMORY_POOL", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OLD = {"MALLOC_MMAP_THRESHOLD_": "1179648", "MALLOC_TRIM_THRESHOLD_": "131072"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_VARS}
    env.update(extra)
    return env


# Whether a buffer of each size is mapped on its own, asked twice: glibc's own dynamic threshold rises after the
# first mapped buffer is freed, so "mapped both times" means a fixed threshold below the size.
MAPPED_TWICE = MALLINFO + """
import json

def mapped(size):
    before = libc.mallinfo2().hblkhd
    buf = bytearray(size)
    m = libc.mallinfo2().hblkhd - before > 0
    del buf
    return m

print(json.dumps({str(s): [mapped(s), mapped(s)] for s in (300 << 10, 1 << 20, 8 << 20, 10 << 20)}))
"""


def mapped(env: dict[str, str]) -> dict[int, list[bool]]:
    out = subprocess.run([sys.executable, "-c", MAPPED_TWICE], env=env, capture_output=True, text=True, check=True,
                         cwd="/tmp")
    return {int(k): v for k, v in json.loads(out.stdout).items()}


def refaults(size: int, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", REFAULTS, str(size)], env=env, capture_output=True, text=True,
                         check=True, cwd="/tmp")
    return int(out.stdout)


# --- 2. an operator's own choice --------------------------------------------------------------------------------


def test_drsync_defaults_map_buffers_larger_than_a_chunk() -> None:
    m = mapped(clean_env())
    assert m[300 << 10] == [False, False] and m[1 << 20] == [False, False]
    assert m[8 << 20] == [True, True] and m[10 << 20] == [True, True]


@pytest.mark.parametrize("env", [
    {"MALLOC_MMAP_THRESHOLD_": "9437184"},
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=9437184"},
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.mmap_threshold=0x900000"},
], ids=["variable", "tunable", "tunable-second-hex"])
def test_an_operators_mmap_threshold_is_kept_in_either_spelling(env: dict[str, str]) -> None:
    """9 MiB, an operator's choice: an 8 MiB buffer stays in the heap (drsync's own setting maps it)."""
    m = mapped(clean_env(**env))
    assert m[1 << 20] == [False, False]
    assert m[8 << 20] == [False, False]
    assert m[10 << 20] == [True, True]


@pytest.mark.parametrize("env", [
    {"MALLOC_TRIM_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
], ids=["variable", "tunable"])
def test_an_operators_trim_threshold_is_kept_in_either_spelling(env: dict[str, str]) -> None:
    """At 128 KiB a buffer freed at the top of the heap gives its pages back and the next faults them in again;
    drsync's 16 MiB keeps them. The tunable spelling is honoured like the variable."""
    pages = (1 << 20) // 4096
    assert refaults(1 << 20, clean_env()) < 50 * pages // 10
    assert refaults(1 << 20, clean_env(**env)) >= 50 * pages // 2


def test_an_operators_arena_max_in_glibc_tunables_is_kept() -> None:
    def arenas(env: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS], env=env, capture_output=True, text=True, check=True,
                             cwd="/tmp")
        return sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert arenas(clean_env()) <= 2
    assert arenas(clean_env(GLIBC_TUNABLES="glibc.malloc.arena_max=8")) > 2


def test_an_operators_arrow_pool_is_kept() -> None:
    probe = "import drsync, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    for pool in ("jemalloc", "mimalloc", "system"):
        out = subprocess.run([sys.executable, "-c", probe], env=clean_env(ARROW_DEFAULT_MEMORY_POOL=pool),
                             capture_output=True, text=True, check=True, cwd="/tmp")
        assert out.stdout.strip() == pool


GARBAGE = [
    {"MALLOC_MMAP_THRESHOLD_": "garbage", "MALLOC_TRIM_THRESHOLD_": "lots", "MALLOC_ARENA_MAX": "many",
     "ARROW_DEFAULT_MEMORY_POOL": "garbage"},
    {"MALLOC_MMAP_THRESHOLD_": "-5", "MALLOC_TRIM_THRESHOLD_": "-1", "MALLOC_ARENA_MAX": "0",
     "ARROW_DEFAULT_MEMORY_POOL": ""},
    {"MALLOC_MMAP_THRESHOLD_": "99999999999999999999999",
     "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1M:glibc.malloc.trim_threshold=x:glibc.malloc.arena_max=-1"},
    {"GLIBC_TUNABLES": ":::=garbage=="},
]

@pytest.mark.parametrize("env", GARBAGE, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_garbage_allocator_settings_never_break_a_snapshot_and_restore(tmp_path: Path, env: dict[str, str]) -> None:
    """drsync runs with whatever an operator wrote (glibc and Arrow ignore or clamp what they cannot read): the
    snapshot restores byte for byte and nothing prints a traceback."""
    src, out, repo = tmp_path / "src", tmp_path / "out", tmp_path / "repo"
    make_tree(src, files=5, big=1)
    full = clean_env(**env)
    for args in (("init", "--repo", repo, "--cluster-id", "c", "--release", "1"),
                 ("snapshot", "create", "--repo", repo, "--source", src),
                 ("snapshot", "restore", "latest", "--repo", repo, "--target", out)):
        r = subprocess.run([sys.executable, "-m", "drsync", *map(str, args)], env=full, capture_output=True,
                           text=True, cwd="/tmp", timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) <= 1, r.stderr
    assert tree_state(out) == tree_state(src)


# Found by the breaker (fixed): an EMPTY variable (systemd `Environment=MALLOC_MMAP_THRESHOLD_=`, a wrapper's
# `MALLOC_MMAP_THRESHOLD_=$X` with X unset) counted as "the operator's choice", so drsync set nothing, and glibc
# reads the empty value as 0: every buffer of every size mapped, faulted in and unmapped (serializing 1 GiB of
# upload messages peaked at 268 MiB instead of 176 MiB, and took up to 2.5x as long). The same for
# `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1M` (glibc takes no suffix). An empty or unreadable value is no choice.
@pytest.mark.parametrize("env", [
    {"MALLOC_MMAP_THRESHOLD_": ""}, {"MALLOC_MMAP_THRESHOLD_": " "}, {"MALLOC_MMAP_THRESHOLD_": "1M"},
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1M"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold="},
], ids=["empty", "blank", "suffix", "tunable-suffix", "tunable-empty"])
def test_an_empty_or_unreadable_mmap_threshold_does_not_map_every_buffer(env: dict[str, str]) -> None:
    m = mapped(clean_env(**env))
    assert m[300 << 10] == [False, False], m
    assert m[1 << 20] == [False, False], m


# Found by the breaker (fixed): as above for the trim threshold: `MALLOC_TRIM_THRESHOLD_=` (empty) left glibc at 0,
# every buffer freed at the top of the heap given back and faulted in again: the slow case the change removed.
def test_an_empty_trim_threshold_variable_keeps_freed_buffers() -> None:
    pages = (1 << 20) // 4096
    assert refaults(1 << 20, clean_env(MALLOC_TRIM_THRESHOLD_="")) < 50 * pages // 10


# Found by the breaker (fixed): `ARROW_DEFAULT_MEMORY_POOL=` (empty) was kept by os.environ.setdefault; Arrow reads
# an empty value as unset and picks mimalloc, the pool allocators.py says keeps 50 to 170 MiB nothing uses at a
# million files. An empty value gets drsync's "system" like an absent one.
def test_an_empty_arrow_pool_variable_gets_the_system_allocator() -> None:
    probe = "import drsync, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    out = subprocess.run([sys.executable, "-c", probe], env=clean_env(ARROW_DEFAULT_MEMORY_POOL=""),
                         capture_output=True, text=True, check=True, cwd="/tmp")
    assert out.stdout.strip() == "system"


# --- 3. nothing else changes ------------------------------------------------------------------------------------


def test_old_and_new_allocator_settings_give_the_same_snapshot_and_restore(tmp_path: Path) -> None:
    """The same tree captured and restored under the old settings (1152 KiB / 128 KiB) and the new: the same
    manifest (files, chunk lists) and the same restored bytes, metadata included."""
    src = tmp_path / "src"
    make_tree(src, files=40, big=3)
    (src / "tables" / "big.bin").write_bytes(os.urandom(12 << 20))  # buffers above the mapping threshold
    results = {}
    for label, env in (("new", {}), ("old", OLD)):
        repo, out = tmp_path / f"repo-{label}", tmp_path / f"out-{label}"
        full = clean_env(**env)
        assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1", env=full).code == 0
        made = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json", env=full)
        assert made.code == 0, made.err
        shown = run_drsync("snapshot", "show", "latest", "--files", "--repo", repo, "--json", env=full)
        assert shown.code == 0, shown.err
        doc = shown.json()
        files = [doc["bytes"], doc["entries"]]
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", out, env=full)
        assert r.code == 0, r.err
        results[label] = (json.dumps(files, sort_keys=True), tree_state(out))
    assert results["new"][1] == results["old"][1] == tree_state(src)
    assert results["new"][0] == results["old"][0]


THREADS = """
import hashlib, os, threading
import drsync
from drsync import allocators
from drsync.transport.grpc import encode_chunk_batch, pb
from drsync.transport import ReceivedChunk

src = os.urandom(16 << 20)
head = pb.ChunkBatch(epoch=3, sender="p", sent_at=1.0)
def chunks(seed):
    return [ReceivedChunk(id=hashlib.sha256(bytes([seed, i])).digest(), encoding=0, raw_length=(1 << 20) - i,
                          data=src[(seed * 7 + i) << 16:((seed * 7 + i) << 16) + (1 << 20) - i]) for i in range(8)]
expect = {s: hashlib.sha256(encode_chunk_batch(head, chunks(s))).hexdigest() for s in range(8)}
bad = []
def work(s):
    for _ in range(20):
        msg = encode_chunk_batch(head, chunks(s))
        parsed = pb.ChunkBatch.FromString(msg)
        if hashlib.sha256(msg).hexdigest() != expect[s] or len(parsed.chunks) != 8:
            bad.append(s)
        allocators.give_back()
ts = [threading.Thread(target=work, args=(s,)) for s in range(8)]
for t in ts: t.start()
for t in ts: t.join()
print(len(bad))
"""


@pytest.mark.parametrize("env", [{}, OLD], ids=["new", "old"])
def test_threads_encoding_messages_and_trimming_at_once_get_the_same_bytes(env: dict[str, str]) -> None:
    """Eight threads serialize and parse message-sized Upload batches while calling give_back (malloc_trim) between
    them, as the agent's gRPC workers and its committer do: no crash, every message the same bytes."""
    out = subprocess.run([sys.executable, "-c", THREADS], env=clean_env(**env), capture_output=True, text=True,
                         cwd="/tmp", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
