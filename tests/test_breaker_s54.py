"""Breaker s54, on links followed through each other (drsync.repository.link_walk): escaping manifests are refused
with the link named, harmless ones (loops, dangling links, long and odd targets) pass, and a link whose ``..``
climbs back out of a directory reached through another link (``x -> d/e``, ``y -> x/../..``, which the kernel
resolves to the root itself) is captured, validated and restored: its text alone is not the judge (it was,
before s55)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drsync.errors import IntegrityError
from drsync.repository.manifest_check import validate
from tests.conftest import run_drsync
from tests.test_escaping_links import _links_manifest


@pytest.mark.parametrize("links", [
    {"d/b": "..", "a": "d/b/.."},
    {"d/b": "..", "l": "d/b", "a": "l/.."},
    {"d/b": "..", b"\xff".decode("utf-8", "surrogateescape"): "d/b/d/b/.."},
    {"d/b": "./../", "a": "d//b/./..//"},
])
def test_a_manifest_with_a_link_leaving_through_others_is_refused(links: dict[str, str]) -> None:
    with pytest.raises(IntegrityError, match="outside the data root"):
        validate(_links_manifest(links, dirs=("d",)))


@pytest.mark.parametrize("links", [
    {"d/b": "..", "a": "d/b/d"},
    {"self": "self", "c1": "c2", "c2": "c1/..", "d/b": ".."},
    {"d/b": "..", "a": "d/b/nonexist", "t": "d/b/" + "d/b/" * 1000},
    {"d/b": "..", "long": "d/" * 2047 + "."},  # 4095 bytes
])
def test_harmless_link_sets_pass(links: dict[str, str]) -> None:
    validate(_links_manifest(links, dirs=("d",)))


def test_a_manifest_with_a_link_climbing_back_through_a_deeper_link_is_accepted() -> None:
    validate(_links_manifest({"x": "d/e", "y": "x/../.."}, dirs=("d", "d/e")))


def test_a_link_climbing_back_through_a_deeper_link_is_captured(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    os.symlink("d/e", src / "x")
    os.symlink("x/../..", src / "y")
    assert os.path.realpath(src / "y") == str(src)  # the kernel: the root itself
    repo = str(tmp_path / "repo")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s").code == 0
    assert run_drsync("snapshot", "restore", "s", "--repo", repo, "--target", tmp_path / "t").code == 0
    assert os.readlink(tmp_path / "t" / "y") == "x/../.."
    assert os.path.realpath(tmp_path / "t" / "y") == str(tmp_path / "t")
