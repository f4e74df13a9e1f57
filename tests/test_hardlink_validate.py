"""A manifest's hard links are judged in columns (drsync.repository.manifest_check._check_hard_links): every
way a link row can be wrong is refused with the message a row-by-row check gave, the first in row order,
wherever slices and row groups cut; sound groups pass, whichever side of their link the first file sorts."""

from __future__ import annotations

import pytest

import drsync.repository.manifest as mf
import drsync.repository.manifest_check as mc
from drsync.errors import IntegrityError
from drsync.repository.manifest_check import validate
from tests.test_manifest import build

NOT_A_FILE = "which is not another file of the snapshot without a link of its own"
DIFFERS = "whose size or content differs"
CID2 = bytes(32)


@pytest.fixture(autouse=True)
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mc, "_SLICE_ROWS", 2)
    monkeypatch.setattr(mf, "ROW_GROUP", 4)


def _tree(*extra: dict) -> list[dict]:
    rows = [{"path": "d", "type": "dir"}, {"path": "d/sub", "type": "dir"}]
    rows += [{"path": f"d/f{i}"} for i in range(7)]
    rows += [{"path": "d/l", "type": "symlink", "target": "f0"}, {"path": "d/sub/g"}]
    return rows + list(extra)


def _judge(rows: list[dict]) -> None:
    m = build(rows)
    for what in (m, mf.ManifestFile(m.to_bytes())):
        validate(what)


def test_sound_groups_pass_whichever_side_their_first_file_sorts() -> None:
    _judge(_tree({"path": "d/a", "hardlink": "d/f3"}, {"path": "d/z", "hardlink": "d/f3"},
                 {"path": "d/sub/h", "hardlink": "d/f0"}, {"path": "d/b", "hardlink": "d/sub/g"}))


@pytest.mark.parametrize("row, message", [
    ({"path": "d/x", "hardlink": "d/x"}, NOT_A_FILE),  # itself
    ({"path": "d/x", "hardlink": "d/missing"}, NOT_A_FILE),
    ({"path": "d/x", "hardlink": "d/sub"}, NOT_A_FILE),  # a directory
    ({"path": "d/x", "hardlink": "d/l"}, NOT_A_FILE),  # a symlink
    ({"path": "d/x", "size": 9, "chunk_sizes": [9], "hardlink": "d/f1"}, DIFFERS),
    ({"path": "d/x", "chunks": [CID2], "hardlink": "d/f1"}, DIFFERS),  # same size, other bytes
    ({"path": "d/x", "type": "dir", "hardlink": "d/f1"}, "a dir cannot be a hard link"),
])
def test_each_wrong_link_is_refused(row: dict, message: str) -> None:
    with pytest.raises(IntegrityError, match=f"d/x: .*{message}" if message != NOT_A_FILE else message):
        _judge(_tree(row))


def test_a_link_to_a_file_that_links_itself_is_refused() -> None:
    with pytest.raises(IntegrityError, match=f"d/y: hard link to d/x, {NOT_A_FILE}"):
        _judge(_tree({"path": "d/x", "hardlink": "d/f1"}, {"path": "d/y", "hardlink": "d/x"}))


def test_a_null_content_against_a_digest_differs() -> None:
    with pytest.raises(IntegrityError, match=f"d/x: hard link to d/f1, {DIFFERS}"):
        _judge(_tree({"path": "d/x", "content": None, "hardlink": "d/f1"}))


def test_the_first_wrong_link_in_row_order_is_named() -> None:
    """d/a (size) sorts before d/y (missing first file); either check's fault, the earlier row is named."""
    with pytest.raises(IntegrityError, match=f"d/a: hard link to d/f2, {DIFFERS}"):
        _judge(_tree({"path": "d/y", "hardlink": "d/nope"}, {"path": "d/a", "size": 3, "chunk_sizes": [3],
                                                              "hardlink": "d/f2"}))
    with pytest.raises(IntegrityError, match=f"d/a: hard link to d/nope, {NOT_A_FILE}"):
        _judge(_tree({"path": "d/y", "size": 3, "chunk_sizes": [3], "hardlink": "d/f2"},
                     {"path": "d/a", "hardlink": "d/nope"}))
