"""A lean manifest's row-group cache is bounded in bytes, not only in groups: wide extended attributes
(or long chunk lists) make a group tens of MiB at 65,536 rows, and four of them were held at once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
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


@pytest.mark.parametrize("budget, kept", [(1 << 30, 4), (450_000, 2), (300_000, 1)])
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


def test_a_column_read_in_order_is_streamed_and_equals_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge's ranges of a lean manifest's extended attributes, in row order, across row groups and the
    stream's own batches: the table's values, with no row group cached; a range asked out of order (or again)
    is still answered right, from the row groups."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 100)
    monkeypatch.setattr(manifest_mod, "_ORDERED_ROWS", 7)
    whole = _wide(600)
    want = whole.table.column("xattrs")
    lean = Manifest.lean(ManifestFile(whole.to_bytes()))
    read = lean.in_order("xattrs")
    start = 0
    for count in (1, 13, 100, 87, 200, 99):
        assert read(np.arange(start, start + count)).to_pylist() == want.slice(start, count).to_pylist()
        start += count
    assert lean._groups is not None and not lean._groups._recent  # streamed, nothing held
    sparse = np.array([500, 503, 541, 599])  # ascending, with gaps, across the stream's batches
    assert read(sparse).to_pylist() == want.take(pa.array(sparse)).to_pylist()
    assert not lean._groups._recent
    for rows in ([50, 70], [599, 598], []):  # before the batch held, descending, none: from the row groups
        assert read(np.array(rows, np.int64)).to_pylist() == want.take(pa.array(rows, pa.int64())).to_pylist()
    with pytest.raises(IndexError):
        lean.in_order("xattrs")(np.array([600]))
    # a whole manifest (nothing left out) answers from its table
    assert whole.in_order("xattrs")(np.arange(590, 600)).to_pylist() == want.slice(590, 10).to_pylist()
    # entries and journal values of ascending rows read through one such reader are those of the table
    rows = np.arange(0, 600, 7)
    xattrs = lean.in_order("xattrs")
    got = [e.xattrs for e in lean.entries_at(rows, light=True, xattrs=xattrs)]
    assert got == [e.xattrs for e in whole.entries_at(rows, light=True)]
    assert lean.values_at(np.arange(600), ("xattrs",), lean.in_order("xattrs")) == whole.values_at(
        np.arange(600), ("xattrs",))
