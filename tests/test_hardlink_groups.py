"""A capture's hard-link groups (drsync.hardlink_groups.LinkGroups) held in sorted NumPy columns: the same links and
warnings as the dict of tuples they replace, on random windows, and about 50 bytes a group open (a backup tree
whose days are hard-linked to each other keeps every group open from the first day's walk to the last's: at
1,000,000 names in two such days, the first snapshot peaked at 425 MiB with the dict, 257 with the columns)."""

from __future__ import annotations

import gc
import random
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from drsync.hardlink_groups import LinkGroups, holds
from drsync.repository.snapshots import WarningLog


def _reference(windows: list[list[tuple[bytes, int, int, int, bytes]]]) -> tuple[list[list[bytes | None]], int]:
    """The dict the columns replace: (device, inode) -> [leader, holds, seen, most]."""
    leaders: dict[tuple[int, int], list[object]] = {}
    out, warned = [], 0
    for w in windows:
        got: list[bytes | None] = []
        for path, dev, ino, n, what in w:
            lead = leaders.get((dev, ino))
            if lead is None:
                leaders[(dev, ino)] = [path, what, 1, n]
                got.append(None)
                continue
            if lead[1] == what:
                got.append(lead[0])  # type: ignore[arg-type]
            else:
                got.append(None)
                warned += 1
            lead[2] = lead[2] + 1  # type: ignore[operator]
            lead[3] = max(lead[3], n)  # type: ignore[call-overload]
            if lead[2] >= lead[3]:  # type: ignore[operator]
                del leaders[(dev, ino)]
        out.append(got)
    return out, warned


@pytest.mark.parametrize("seed", range(8))
def test_the_columns_link_as_the_dict_did(seed: int) -> None:
    rnd = random.Random(seed)
    contents = [holds(3, b"x" * 32, 0o644, 0, 0), holds(3, b"y" * 32, 0o644, 0, 0), holds(3, None, 0o600, 1, 1)]
    # Inodes near 0 and 2**64 - 1, devices that differ only in a low byte, digests with trailing NULs in the key.
    inodes = [0, 1, 255, 256, 2**32, 2**63, 2**64 - 1, 2**64 - 256]
    devs = [0, 1, 2**64 - 1]
    for _ in range(40):
        windows = []
        for _ in range(rnd.randint(1, 6)):
            windows.append([(f"p{rnd.randrange(10**6)}".encode(), rnd.choice(devs), rnd.choice(inodes),
                             rnd.randint(2, 4), rnd.choice(contents[:2] if rnd.random() < 0.9 else contents))
                            for _ in range(rnd.randint(0, 12))])
        want, warned = _reference(windows)
        groups, warnings = LinkGroups(), WarningLog()
        got = [groups.window([r[0] for r in w], np.array([r[1] for r in w], np.uint64),
                             np.array([r[2] for r in w], np.uint64), np.array([r[3] for r in w], np.int64),
                             [r[4] for r in w], warnings) for w in windows]
        assert got == want, windows
        assert len(warnings) == warned


def test_a_leader_is_found_for_a_stale_name_only_while_its_group_is_open_and_holds_the_same() -> None:
    groups, x, y = LinkGroups(), holds(3, b"x" * 32, 0o644, 0, 0), holds(3, b"y" * 32, 0o644, 0, 0)
    groups.window([b"a", b"b"], np.array([1, 1], np.uint64), np.array([7, 8], np.uint64), np.array([3, 2]), [x, x],
                  WarningLog())
    assert groups.leader(1, 7, x) == b"a" and groups.leader(1, 7, y) is None and groups.leader(2, 7, x) is None
    groups.window([b"c", b"d"], np.array([1, 1], np.uint64), np.array([7, 8], np.uint64), np.array([3, 2]), [x, x],
                  WarningLog())
    assert groups.leader(1, 7, x) == b"a"  # one name of three still to come
    assert groups.leader(1, 8, x) is None and len(groups) == 1  # both names seen: let go


def test_200000_groups_open_across_windows_hold_about_50_bytes_each() -> None:
    """Two days of 200,000 hard-linked files: every group is open once the first day is walked."""
    n, step = 200_000, 16_384
    what = holds(10, b"c" * 32, 0o644, 0, 0)
    groups, warnings = LinkGroups(), WarningLog()
    gc.collect()
    tracemalloc.start()
    arrow = pa.total_allocated_bytes()
    try:
        for day in (0, 1):
            for start in range(0, n, step):
                ino = np.arange(start, min(n, start + step), dtype=np.uint64)
                got = groups.window([b"daily.%d/f%07d" % (day, i) for i in ino.tolist()], np.ones(len(ino), np.uint64),
                                    ino, np.full(len(ino), 2), [what] * len(ino), warnings)
                assert got == ([None] * len(ino) if day == 0 else [b"daily.0/f%07d" % i for i in ino.tolist()])
            if day == 0:
                assert len(groups) == n
                held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(groups) == 0 and not len(warnings)
    # 48 bytes of columns a group and its 15-byte leader path in Arrow (the dict held about 500 bytes a group)
    assert held < n * 90, f"{held / n:.0f} bytes a group"
    assert peak < n * 200, f"peak {peak / n:.0f} bytes a group"
