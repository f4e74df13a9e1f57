"""Breaker (issue 20): --dry-run must list what a restore into a foreign non-empty directory would overwrite,
as the refusal and the flag it asks for do. A target path whose type differs from the snapshot's (a file or a
symlink where the snapshot has a directory) is listed as "remove" with "overwrite" empty, while the refusal
names it as a path it would overwrite and asks for --overwrite (not --delete-extra); --overwrite alone then
reports it as removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import init_repo_at, run_drsync, tree_state


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_dry_run_lists_a_replaced_path_as_overwritten_like_the_refusal(tmp_path: Path, kind: str) -> None:
    data, repo, target = tmp_path / "data", tmp_path / "repo", tmp_path / "target"
    (data / "a").mkdir(parents=True)
    (data / "a" / "f1").write_text("hi\n")
    init_repo_at(repo, "c1", "1")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    target.mkdir()
    if kind == "file":
        (target / "a").write_text("a file where the snapshot has a directory\n")
    else:
        (tmp_path / "elsewhere").mkdir()
        (target / "a").symlink_to(tmp_path / "elsewhere")
    before = tree_state(target)
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", target, "--dry-run", "--json")
    assert r.code == 4, r.err
    doc = json.loads(r.out)
    assert "would overwrite (a)" in doc["refused"] and "--overwrite" in doc["refused"]
    # What the refusal names as overwritten, the listing shows as overwritten (and not as an extra to remove).
    assert doc["planned"]["overwrite"] == ["a"] and doc["planned"]["remove"] == [], doc["planned"]
    assert tree_state(target) == before
