"""Breaker s56a: links through places a capture never lists (excluded paths, the reserved staging name),
judged against the kernel (openat2 RESOLVE_BENEATH: EXDEV means the walk leaves the root).

Each test asserts the promised behaviour and fails where it does not hold."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drsync import engine, native_walk
from drsync.dataroot import hdfs
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.test_symlink_judgement import _have_openat2, _kernel, _Namespace

NOBODY = 65534
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=[True, False], ids=["c-listing", "python-listing"])
def listing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    native = bool(request.param)
    if native and not native_walk.available():
        pytest.skip("drsync._listdir was not built")
    monkeypatch.setattr(native_walk, "available", lambda: native)
    return native




def _chown_all(base: Path) -> None:
    for dp, dns, fns in os.walk(base):
        for n in (dp, *(os.path.join(dp, x) for x in dns + fns)):
            os.lchown(n, NOBODY, NOBODY)


def _as_nobody(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child that became uid/gid 65534; its JSON result (or the error's repr)."""
    from tests.users import preload_everything

    preload_everything()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = fn()
            except BaseException as e:
                out = {"error": repr(e)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _snapper(src: Path, repo_dir: Path, exclude: tuple[str, ...]) -> Callable[[], Any]:
    def snap() -> Any:
        if not repo_dir.exists():
            Repository.init(LocalStorage(str(repo_dir)), cluster_id="c", release="1")
        repo = Repository.open(LocalStorage(str(repo_dir)))
        info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src), exclude_paths=exclude))
        kept = {e.path: e.target for e in repo.load_manifest(info).entries() if e.type == "symlink"}
        return {"id": info.id, "kept": kept, "warnings": list(info.warnings)}
    return snap


def test_hdfs_capture_reusing_an_untouched_directory_still_judges_links_through_its_reserved_place() -> None:
    """HDFS captures after the first list only what the snapshot diff names and take untouched directories
    from the parent (_Reuse). A ``.drsync-staging`` (or an excluded path) inside such a directory is then
    never passed over, so ``t -> g/.drsync-staging/k`` with ``k -> /etc`` is kept: without the reuse the same
    walk drops it."""
    ns = _Namespace()
    for d in ("/data", "/data/g", "/data/g/.drsync-staging", "/data/g/x"):
        ns.add(d)
    ns.add("/data/g/.drsync-staging/k", "/etc")
    ns.add("/data/g/x/h", "/etc")
    first = hdfs.walk(ns, "/data", exclude=frozenset({"g/x"}))  # type: ignore[arg-type]

    class _Parent:
        def pycolumn(self, c: str) -> list[Any]:
            return first.values(c)

    ns.add("/data/t", "g/.drsync-staging/k")  # new: the root is listed again, g is not touched
    ns.add("/data/u", "g/x/h")
    diff = [{"type": "MODIFY", "sourcePath": ""}, {"type": "CREATE", "sourcePath": "t"},
            {"type": "CREATE", "sourcePath": "u"}]
    reuse = hdfs._Reuse(diff, _Parent())  # type: ignore[arg-type]
    assert reuse.reusable("g")
    scan = hdfs.walk(ns, "/data", exclude=frozenset({"g/x"}), reuse=reuse)  # type: ignore[arg-type]
    kept = {p: t for p, typ, t in zip(scan.values("path"), scan.values("type"), scan.values("target"),
                                      strict=True) if typ == "symlink"}
    assert kept == {}, "links leading to /etc through hidden links in a reused directory were kept"


def test_a_link_into_a_directory_the_capture_cannot_list_is_kept_and_restores_inside(
        open_base: Path, listing: bool) -> None:
    """Captured as a user that cannot list ``p``: ``t -> p/.drsync-staging/k`` with ``k -> /etc`` leaves the
    root (the kernel, as root: EXDEV), but the capture cannot see ``k``. Dropping ``t`` would delete it on a
    standby because of a read error (safety rule 8), so it is kept (the breaker asked for the drop; decided
    against). What the snapshot holds never leaves the root: restored, ``t`` dangles (no ``k`` is carried)."""
    src = open_base / "src"
    (src / "p").mkdir(parents=True)
    (src / "f").write_bytes(b"x")
    os.symlink("p/.drsync-staging/k", src / "t")
    _chown_all(open_base)
    snap = _snapper(src, open_base / "repo", ())
    assert "error" not in _as_nobody(snap)
    (src / "p" / ".drsync-staging").mkdir()
    os.symlink("/etc", src / "p" / ".drsync-staging" / "k")
    os.chmod(src / "p", 0)
    if not _have_openat2(src):
        pytest.skip("the kernel has no openat2 (the oracle)")
    assert _kernel(src, "t") == errno.EXDEV
    second = _as_nobody(snap)
    assert "error" not in second, second
    assert second["kept"].get("t") == "p/.drsync-staging/k"
    repo = Repository.open(LocalStorage(str(open_base / "repo")))
    engine.restore_snapshot(repo, second["id"], str(open_base / "tgt"), cluster_id="c", release="1")
    assert _kernel(open_base / "tgt", "t") == errno.ENOENT


def _linked_through_x(open_base: Path) -> Path:
    """``src`` with ``x/h -> ../d`` and ``t -> x/h`` (and a directory ``p``), owned by the capturing user."""
    src = open_base / "src"
    for d in ("p", "d", "x"):
        (src / d).mkdir(parents=True)
    os.symlink("../d", src / "x" / "h")
    os.symlink("x/h", src / "t")
    _chown_all(open_base)
    return src


def test_a_dropped_link_is_warned_about_once_when_an_unlistable_directory_changed(
        open_base: Path, listing: bool) -> None:
    """``t -> x/h`` (x excluded) is dropped once ``x/h -> /etc``. When a directory the capturing user cannot
    list changed since the last snapshot, every path the last snapshot has and this one lacks is kept, t
    among them, and judged again: the same warning twice (the promise: once)."""
    src = _linked_through_x(open_base)
    snap = _snapper(src, open_base / "repo", (str(src / "x"),))
    first = _as_nobody(snap)
    assert first.get("kept") == {"t": "x/h"}, first
    os.unlink(src / "x" / "h")
    os.symlink("/etc", src / "x" / "h")
    (src / "p" / "new").mkdir()
    os.chmod(src / "p", 0)
    second = _as_nobody(snap)
    assert "error" not in second, second
    assert "t" not in second["kept"]
    said = [w for w in second["warnings"] if w.startswith("t: symlink to")]
    assert len(said) == 1, said


def test_a_link_leaving_through_a_newly_excluded_place_is_not_captured_by_the_stale_merge(
        open_base: Path, listing: bool) -> None:
    """The last snapshot had ``x`` (not excluded then) with ``x/h -> ../d``; now x is excluded (a state
    directory put inside the root) and ``x/h -> /etc``. With an unlistable changed directory the stale
    merge brings back the last snapshot's ``x/h`` row and ``t -> x/h``, and keeps t, judged through the stale
    row: the snapshot holds t (while warning "t ... not captured"), and on the source t leads to /etc."""
    src = _linked_through_x(open_base)
    first = _as_nobody(_snapper(src, open_base / "repo", ()))
    assert first.get("kept") == {"t": "x/h", "x/h": "../d"}, first
    os.unlink(src / "x" / "h")
    os.symlink("/etc", src / "x" / "h")
    (src / "p" / "new").mkdir()
    os.chmod(src / "p", 0)
    second = _as_nobody(_snapper(src, open_base / "repo", (str(src / "x"),)))
    assert "error" not in second, second
    if _have_openat2(src):
        assert _kernel(src, "t") == errno.EXDEV
    said_dropped = any(w.startswith("t: symlink to x/h") and w.endswith("not captured") for w in second["warnings"])
    assert not (said_dropped and "t" in second["kept"]), "t is warned as not captured, and captured"
    assert "t" not in second["kept"], "t leads to /etc on the source (through x/h) and was captured"
