"""A lean manifest's row-group cache is bounded in bytes, not only in groups: wide extended attributes
(or long chunk lists) make a group tens of MiB at 65,536 rows, and four of them were held at once."""

from __future__ import annotations

import numpy as np
import pytest

from drsync.repository import manifest as manifest_mod
from drsync.repository.manifest import Manifest, ManifestFile, encode_xattrs


def _wide(n: int) -> Manifest:
    paths = [f"d/f{i:05}" for i in range(n)]
    return Manifest.from_columns({
        "path": paths, "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n, "size": [0] * n,
        "mtime_ns": [1] * n, "target": [None] * n, "ctime_ns": [1] * n, "inode": [0] * n, "content": [None] * n,
        "chunks": [[] for _ in range(n)],
        "chunk_sizes": [[] for _ in range(n)],
        "xattrs": [encode_xattrs([(b"user.k", bytes([i % 251]) * 2000)]) for i in range(n)]})


@pytest.mark.parametrize("budget, kept", [(1 << 30, 4), (300_000, 2)])
def test_cached_row_groups_stay_within_the_byte_budget(monkeypatch: pytest.MonkeyPatch, budget: int,
                                                      kept: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 100)
    monkeypatch.setattr(manifest_mod, "_CACHED_BYTES", budget)
    whole = _wide(600)
    lean = Manifest.lean(ManifestFile(whole.to_bytes()))
    for g in range(6):  # a window of rows in each group, in order, as the apply's merge reads them
        rows = np.arange(g * 100, g * 100 + 50)
        assert lean.columns_at(rows, ["xattrs"]).column("xattrs").to_pylist() == \
            whole.table.column("xattrs").take(rows).to_pylist()
    assert lean._groups is not None and len(lean._groups._recent) == kept
    # what the cache evicted is read again when asked
    rows = np.array([0, 599, 250])
    assert lean.columns_at(rows, ["xattrs"]).column("xattrs").to_pylist() == \
        whole.table.column("xattrs").take(rows).to_pylist()
