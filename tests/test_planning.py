"""Planning what to ship is a pure function of two manifests."""

from __future__ import annotations

from drsync.agent.primary import chunk_sizes, chunks_to_negotiate
from tests.test_manifest import build

A, B, C, D = (bytes([n]) * 32 for n in (1, 2, 3, 4))


def test_without_an_applied_snapshot_everything_is_negotiated() -> None:
    new = build([{"path": "d", "type": "dir"}, {"path": "d/x", "chunks": [A, B], "chunk_sizes": [2, 3],
                                                 "size": 5}])
    assert chunks_to_negotiate(new, None) == sorted([A, B])
    assert chunk_sizes(new) == {A: 2, B: 3}


def test_only_chunks_of_added_or_changed_files_that_the_standby_lacks() -> None:
    applied = build([{"path": "same", "chunks": [A], "chunk_sizes": [5]},
                     {"path": "edited", "chunks": [B], "chunk_sizes": [5]},
                     {"path": "gone", "chunks": [C], "chunk_sizes": [5]}])
    new = build([{"path": "same", "chunks": [A], "chunk_sizes": [5]},
                 {"path": "edited", "chunks": [B, D], "chunk_sizes": [2, 3]},
                 {"path": "moved-here", "chunks": [C], "chunk_sizes": [5]}])
    # B and C are on the standby already (in the applied snapshot); only D is new.
    assert chunks_to_negotiate(new, applied) == [D]
    assert chunks_to_negotiate(applied, applied) == []
