"""Paths given to drsync name what the kernel (and the operator's shell) names: a ``..`` after a symlink
climbs from where that link leads. ``os.path.abspath`` collapses ``lnk/..`` by its text, so ``--target
/srv/lnk/../x`` with ``lnk -> /a/b`` was restored into ``/srv/x``, a directory the operator never named (and
``ls /srv/lnk/../x`` shows ``/a/x``, still empty). Each place drsync takes a local path is tried: a restore's
target, a capture's source, the repository, a backup's destination."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from drsync.errors import UsageError
from drsync.fsutil import absolute
from tests.conftest import Result


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """``tmp/srv/lnk -> tmp/a/b``: ``srv/lnk/../NAME`` is ``a/NAME`` to the kernel, ``srv/NAME`` by text."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "srv").mkdir()
    os.symlink(tmp_path / "a" / "b", tmp_path / "srv" / "lnk")
    return tmp_path


def test_absolute_climbs_from_where_a_link_leads(place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert absolute(f"{place}/srv/lnk/../x") == f"{place}/a/x"
    assert absolute(f"{place}/srv/lnk/../x/./y//z") == f"{place}/a/x/y/z"
    assert absolute(f"{place}/srv/lnk/../../srv/lnk") == f"{place}/srv/lnk"  # a final link is named, not followed
    assert absolute(f"{place}/srv/./lnk") == f"{place}/srv/lnk"
    assert absolute(f"//{place}/srv/lnk") == f"{place}/srv/lnk"  # a leading "//" is "/" to the kernel
    (place / "srv" / "file").write_text("x")
    os.symlink("loop", place / "srv" / "loop")
    for bad in ("nothere", "file", "loop"):  # the kernel cannot go up from these: the path names nothing
        with pytest.raises(UsageError, match=r"climbs from .* which is not a directory"):
            absolute(f"{place}/srv/{bad}/../x")
    monkeypatch.chdir(place / "srv")
    assert absolute("lnk/../x") == f"{place}/a/x"
    assert absolute("x") == f"{place}/srv/x"
    assert absolute(Path("lnk/..")) == f"{place}/a"
    gone = place / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # an operator's shell in a removed directory: absolute paths still work
    assert absolute(f"{place}/srv/lnk/../x") == f"{place}/a/x"
    assert absolute(f"{place}/srv/x") == f"{place}/srv/x"


def test_every_local_path_names_what_the_kernel_names(place: Path, drsync: Callable[..., Result]) -> None:
    data = place / "a" / "data"  # given as srv/lnk/../data
    (data / "d").mkdir(parents=True)
    (data / "d" / "f").write_text("payload")
    via = f"{place}/srv/lnk/.."
    r = drsync("init", "--repo", f"{via}/repo", "--cluster-id", "c", "--release", "1")
    assert r.code == 0, r.err
    assert (place / "a" / "repo").is_dir() and not (place / "srv" / "repo").exists()
    r = drsync("snapshot", "create", "--repo", f"{via}/repo", "--source", f"{via}/data", "--name", "s", "--json")
    assert r.code == 0, r.err
    assert r.json()["files"] == 1
    r = drsync("snapshot", "restore", "s", "--repo", f"{via}/repo", "--target", f"{via}/restored", "--json")
    assert r.code == 0, r.err
    assert (place / "a" / "restored" / "d" / "f").read_text() == "payload"
    assert not (place / "srv" / "restored").exists()
    r = drsync("backup", "create", "--repo", f"{via}/repo", "--snapshot", "s", "--dest", f"{via}/backups",
               "--mode", "full", "--json")
    assert r.code == 0, r.err
    made = Path(json.loads(r.out)["path"])
    assert made.parent == place / "a" / "backups" and made.is_dir()
    assert not (place / "srv" / "backups").exists()
    r = drsync("backup", "verify", f"{via}/backups/{made.name}", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["backup"] == str(made)
    r = drsync("backup", "restore", f"{via}/backups/{made.name}", "--target", f"{via}/from-backup")
    assert r.code == 0, r.err
    assert (place / "a" / "from-backup" / "d" / "f").read_text() == "payload"
    assert not (place / "srv" / "from-backup").exists()
