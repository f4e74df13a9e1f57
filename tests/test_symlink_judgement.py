"""Which symlinks a capture keeps and a manifest may hold, judged against the kernel itself.

A link is dropped (capture) or refused (validation) when following it leaves the data root; a link's text
alone decides only when it leaves whatever the other links are (:func:`symlink_leaves_root`: empty,
absolute, a NUL, or leading ``..`` above the root). A ``..`` after a name climbs from where that name
leads, so ``y -> x/../..`` with ``x -> d/e`` is the root itself and is kept. The oracle is ``openat2``
with ``RESOLVE_BENEATH`` on the real trees, source and restored: EXDEV means the walk would leave the root."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from drsync import engine, native_walk
from drsync.dataroot import hdfs
from drsync.errors import IntegrityError
from drsync.repository.manifest_check import symlink_leaves_root, validate
from drsync.repository.repo import Repository
from drsync.storage.hdfs import HdfsError
from drsync.storage.local import LocalStorage
from tests.test_escaping_links import _links_manifest
from tests.webhdfs import Inode

_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
_RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _kernel(root: Path, rel: str) -> int:
    """0 when the kernel resolves ``root/rel`` beneath ``root`` (following links), else the errno (EXDEV:
    it would leave the root; ELOOP, ENOENT, ENOTDIR: it reaches nothing)."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        how = _OpenHow(os.O_PATH, 0, _RESOLVE_BENEATH)
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            return ctypes.get_errno()
        os.close(fd)
        return 0
    finally:
        os.close(dirfd)


def _have_openat2(tmp: Path) -> bool:
    return _kernel(tmp, ".") != errno.ENOSYS


@pytest.mark.parametrize(("path", "target", "leaves"), [
    ("a", "", True), ("a", "/etc", True), ("a", "x\x00y", True),
    ("a", "..", True), ("a", "./..", True), ("a", ".//../x", True), ("d/a", "../..", True),
    ("d/e/a", "../../../x", True),
    ("a", "x/../..", False),  # x may be a link to a deeper directory: judged by the walk
    ("d/a", "..", False), ("d/e/a", "../../x", False), ("a", "x", False), ("a", ".", False),
    ("a", "d/../../..", False),
])
def test_symlink_leaves_root_only_when_no_other_link_can_change_it(path: str, target: str, leaves: bool) -> None:
    assert symlink_leaves_root(path, target) is leaves


def test_a_climb_back_through_a_deeper_link_is_accepted_and_one_past_the_root_refused() -> None:
    validate(_links_manifest({"x": "d/e", "y": "x/../.."}, dirs=("d", "d/e")))
    with pytest.raises(IntegrityError, match=r"y -> x/\.\./\.\./\.\. (points|leads) outside the data root"):
        validate(_links_manifest({"x": "d/e", "y": "x/../../.."}, dirs=("d", "d/e")))
    with pytest.raises(IntegrityError, match=r"y -> \.\./x points outside the data root"):
        validate(_links_manifest({"x": "d/e", "y": "../x"}, dirs=("d", "d/e")))


_DIRS = ("d", "d/e", "d/e/f", "g")
_WORDS = ("..", "..", "..", ".", "", "d", "e", "f", "g", "nx")


def _random_tree(src: Path, rnd: random.Random) -> dict[str, str]:
    for d in _DIRS:
        (src / d).mkdir(parents=True, exist_ok=True)
    (src / "d" / "file").write_bytes(b"x")
    links: dict[str, str] = {}
    names = [f"l{i}" for i in range(8)]
    for name in names:
        where = rnd.choice(("", "d", "d/e", "g"))
        path = f"{where}/{name}" if where else name
        if rnd.random() < 0.4:  # another link, then climbs: from where that link leads, not from its name
            comps = [rnd.choice(names), *[".."] * rnd.randint(1, 4), *rnd.sample(_WORDS, rnd.randint(0, 2))]
        elif rnd.random() < 0.3:  # a deeper directory, to climb back out of
            comps = [rnd.choice(("d/e/f", "d/e", "../d/e", "g/../d/e/f"))]
        else:
            comps = [rnd.choice((*_WORDS, *names)) for _ in range(rnd.randint(1, 5))]
        target = "/".join(comps)
        if target:
            links[path] = target
    # links may name each other by any of their places: a name in a target is tried as a link too
    for path, target in links.items():
        os.symlink(target, src / path)
    return links


def _random_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int,
                   native: bool) -> tuple[random.Random, Path, dict[str, str]]:
    """A random link tree at ``tmp_path/src`` (:func:`_random_tree`), captured with the C listing or the
    Python one; skipped without the oracle or the C listing."""
    if not _have_openat2(tmp_path):
        pytest.skip("the kernel has no openat2 (the oracle)")
    if native and not native_walk.available():
        pytest.skip("drsync._listdir was not built")
    monkeypatch.setattr(native_walk, "available", lambda: native)
    rnd = random.Random(seed)
    src = tmp_path / "src"
    return rnd, src, _random_tree(src, rnd)


def _captured_links(repo: Repository, src: Path) -> tuple[dict[str, str], engine.SnapshotInfo]:
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    manifest = repo.load_manifest(info)
    return {e.path: e.target for e in manifest.entries() if e.type == "symlink"}, info


@pytest.mark.parametrize("native", [True, False], ids=["c-listing", "python-listing"])
@pytest.mark.parametrize("seed", range(150))
def test_a_capture_keeps_every_link_the_kernel_resolves_inside_and_restores_none_that_leaves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, native: bool) -> None:
    _, src, links = _random_source(tmp_path, monkeypatch, seed, native)
    answers = {p: _kernel(src, p) for p in links}
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    kept, info = _captured_links(repo, src)
    for path, answer in answers.items():
        if answer == 0:
            assert kept.get(path) == links[path], f"{path} -> {links[path]} resolves inside; dropped"
        elif answer == errno.EXDEV:  # directly, through kept links, or through a link dropped by its text
            assert path not in kept, f"{path} -> {links[path]} leaves the root; captured"
    tgt = tmp_path / "tgt"
    engine.restore_snapshot(repo, info.id, str(tgt), cluster_id="c", release="1")
    for path, target in kept.items():
        assert os.readlink(tgt / path) == target
        assert _kernel(tgt, path) == answers[path] if answers[path] == 0 else _kernel(tgt, path) != errno.EXDEV


@pytest.mark.parametrize("native", [True, False], ids=["c-listing", "python-listing"])
def test_links_through_a_link_dropped_by_its_text_are_dropped_and_warned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Breaker s55: ``a -> /etc`` is dropped by its text; ``b -> a`` and ``f -> a/..`` lead outside through it
    (the kernel: EXDEV) and were kept, with no warning. ``c -> b`` leads through both; ``ok -> d`` stays."""
    if native and not native_walk.available():
        pytest.skip("drsync._listdir was not built")
    monkeypatch.setattr(native_walk, "available", lambda: native)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name, target in (("a", "/etc"), ("b", "a"), ("f", "a/.."), ("c", "b/passwd"), ("ok", "d"),
                         ("d/up", "../b")):
        os.symlink(target, src / name)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    kept, info = _captured_links(repo, src)
    assert kept == {"ok": "d"}
    text = "\n".join(info.warnings)
    for name in ("b", "f", "c", "d/up"):
        assert f"{name}: symlink to" in text and "leads outside the data root through other links" in text
    assert text.count("a: symlink to /etc leaves the data root") == 1


def test_a_stray_staging_directory_at_the_top_is_warned_by_its_name_in_the_root(tmp_path: Path) -> None:
    """Breaker s55b: the warning named the stray ``.drsync-staging`` at the top by its absolute path, every
    other warning by its path in the root."""
    src = tmp_path / "src"
    (src / ".drsync-staging").mkdir(parents=True)
    (src / ".drsync-staging" / "7").write_bytes(b"x")
    (src / "f").write_bytes(b"y")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    assert ".drsync-staging: the name is reserved for drsync's staging area; not captured" in info.warnings
    assert not any(str(tmp_path) in w for w in info.warnings)


def test_a_link_through_a_link_inside_the_reserved_staging_name_is_dropped(tmp_path: Path) -> None:
    """Breaker s55b: ``b -> .drsync-staging/l`` with ``.drsync-staging/l -> /etc`` leaves the root (the kernel:
    EXDEV). The staging name is never listed; the walk reads ``l`` from the tree when it reaches it."""
    src = tmp_path / "src"
    (src / ".drsync-staging").mkdir(parents=True)
    os.symlink("/etc", src / ".drsync-staging" / "l")
    os.symlink(".drsync-staging/l", src / "b")
    assert _kernel(src, "b") == errno.EXDEV
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    kept, info = _captured_links(repo, src)
    assert "b" not in kept
    assert "b: symlink to .drsync-staging/l leads outside the data root through other links; not captured" \
        in info.warnings
    assert not any(w.startswith(".drsync-staging/l:") for w in info.warnings)  # never listed, never named


_HIDDEN = (".drsync-staging", "d/.drsync-staging", "x", "d/e/y")  # never listed: reserved name, excluded


@pytest.mark.parametrize("native", [True, False], ids=["c-listing", "python-listing"])
@pytest.mark.parametrize("seed", range(60))
def test_links_through_paths_a_capture_does_not_list_are_judged_as_the_kernel_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, native: bool) -> None:
    """Links inside excluded paths and reserved staging names (which a capture never lists) are read when a
    walk from a listed link reaches them: a listed link that leaves through one is dropped, one that stays
    inside is kept. Hidden places hold links of every kind (absolute, climbing, to each other, to listed
    links), and may themselves be links."""
    rnd, src, links = _random_source(tmp_path, monkeypatch, seed, native)
    hidden: list[str] = []
    for h in _HIDDEN:
        if h.endswith(".drsync-staging") and rnd.random() < 0.3:  # the hidden place is itself a link
            os.symlink(rnd.choice(("/etc", "..", "d/e", "../..", ".drsync-staging", "g")), src / h)
            hidden.append(h)
            continue
        (src / h / "sub").mkdir(parents=True)
        for i in range(3):
            where = rnd.choice((h, f"{h}/sub"))
            os.symlink(rnd.choice(("/etc", "..", "../..", "../../..", "sub", "l0", "../l1", "../g", ".",
                                   "../../d/e", f"../{rnd.choice(list(links) or ['g'])}")), src / where / f"h{i}")
            hidden.append(f"{where}/h{i}")
    for i in range(6):  # listed links that pass through the hidden places
        where = rnd.choice(("", "d", "g"))
        path = f"{where}/t{i}" if where else f"t{i}"
        up = "../" * where.count("/") + ("../" if where else "")
        target = up + rnd.choice(hidden) + rnd.choice(("", "/passwd", "/..", "/../..", "/sub"))
        os.symlink(target, src / path)
        links[path] = target
    answers = {p: _kernel(src, p) for p in links}
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(
        str(src), exclude_paths=(str(src / "x"), str(src / "d/e/y"))))
    manifest = repo.load_manifest(info)
    kept = {e.path: e.target for e in manifest.entries() if e.type == "symlink"}
    assert not [p for p in kept if any(p == h or p.startswith(h + "/") for h in _HIDDEN)]
    for h in _HIDDEN:  # a link that resolves inside without the hidden places never walked through them
        if (src / h).is_symlink():
            (src / h).unlink()
        elif (src / h).exists():
            shutil.rmtree(src / h)
    for path, answer in answers.items():
        if answer == 0 and _kernel(src, path) == 0:
            assert kept.get(path) == links[path], f"{path} -> {links[path]} resolves inside; dropped"
        elif answer == errno.EXDEV:
            assert path not in kept, f"{path} -> {links[path]} leaves the root; captured"
    tgt = tmp_path / "tgt"  # the restore validates the manifest: a kept link leaves in the rows alone nowhere
    engine.restore_snapshot(repo, info.id, str(tgt), cluster_id="c", release="1")
    for path in kept:
        assert _kernel(tgt, path) != errno.EXDEV


def test_a_link_inside_only_through_a_hidden_link_is_dropped_as_a_restore_would_refuse_it(tmp_path: Path) -> None:
    """``t -> .drsync-staging/../..`` with ``.drsync-staging -> d/e`` resolves to the root on the tree, but the
    snapshot holds no ``.drsync-staging``: in its rows alone ``t`` climbs above the root, and a restore would
    refuse the snapshot. It is dropped and warned; ``u -> .drsync-staging/..`` stays (inside either way)."""
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    os.symlink("d/e", src / ".drsync-staging")
    os.symlink(".drsync-staging/../..", src / "t")
    os.symlink(".drsync-staging/..", src / "u")
    assert _kernel(src, "t") == 0
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    kept, info = _captured_links(repo, src)
    assert kept == {"u": ".drsync-staging/.."}
    assert "t: symlink to .drsync-staging/../.. leaves the data root; not captured" in info.warnings
    engine.restore_snapshot(repo, info.id, str(tmp_path / "tgt"), cluster_id="c", release="1")


class _Namespace:
    """An in-memory HDFS namespace answering ``list_dir`` as WebHDFS LISTSTATUS does. A stand-in: HDFS
    holds symlinks only where a cluster enables them, and the test cluster refuses to make them."""

    def __init__(self) -> None:
        self.root = Inode("DIRECTORY", 1, "drsync", "drsync", 0o755, 1000, 1000)

    def _node(self, path: str) -> Inode:
        node = self.root
        for part in [p for p in path.split("/") if p]:
            if part not in node.children:
                raise HdfsError(f"{path}: not found", "FileNotFoundException")
            node = node.children[part]
        return node

    def add(self, path: str, symlink: str | None = None) -> None:
        head, _, name = path.rpartition("/")
        self._node(head).children[name] = Inode("SYMLINK" if symlink is not None else "DIRECTORY",
                                                len(path), "drsync", "drsync", 0o755, 1000, 1000, symlink=symlink)

    def list_dir(self, path: str) -> list[dict[str, object]]:
        return [c.status(n) for n, c in sorted(self._node(path).children.items())]


def test_an_hdfs_walk_reads_links_inside_excluded_and_reserved_paths() -> None:
    """The HDFS listing passes over excluded paths and the reserved staging name as the local ones do, and
    reads a link there from its parent's listing when a walk reaches it."""
    ns = _Namespace()
    for d in ("/data", "/data/d", "/data/d/e", "/data/.drsync-staging", "/data/x"):
        ns.add(d)
    ns.add("/data/.drsync-staging/l", "/etc")
    ns.add("/data/x/up", "../..")
    ns.add("/data/x/in", "../d/e")
    for name, target in (("b", ".drsync-staging/l"), ("c", "x/up/y"), ("ok", "x/in/.."), ("plain", "d/e")):
        ns.add(f"/data/{name}", target)
    scan = hdfs.walk(ns, "/data", exclude=frozenset({"x"}))  # type: ignore[arg-type]
    kept = {p: t for p, typ, t in zip(scan.values("path"), scan.values("type"), scan.values("target"),
                                      strict=True) if typ == "symlink"}
    assert kept == {"ok": "x/in/..", "plain": "d/e"}
    assert "b: symlink to .drsync-staging/l leads outside the data root through other links; not captured" \
        in scan.warnings
