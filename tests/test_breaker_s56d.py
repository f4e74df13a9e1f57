"""Breaker s56d: the lease of an apply onto an HDFS root (drsync/dataroot/hdfs_lease.py), on the real HDFS.

New holes beyond s56c: an apply onto a root inside another's checks the ancestors' leases before it writes
its own (the restic order, write then look, is kept only for its own root); a holder taken over in the middle
of its staging goes on writing into (or emptying) the staging area of the apply that took it over, and
only looks at its lease before its journal. Another host is a process in a UTS namespace of its own
(``unshare -u``) with a host lock directory of its own, as in tests/test_breaker_s56c.py."""

from __future__ import annotations

import posixpath
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from drsync.apply import ApplyPlan, apply_manifest
from drsync.dataroot import hdfs_lease
from drsync.dataroot.hdfs import HdfsDataRoot
from drsync.dataroot.hdfs_lease import STALE_S, is_lease
from drsync.errors import OperationFailed
from drsync.flocks import ApplyBusy
from drsync.storage.hdfs import HdfsFs, parse_hdfs_url
from tests.conftest import init_repo_at, run_drsync
from tests.sites import HdfsSite
from tests.test_breaker_s56c import (
    OTHER,
    _expected,
    _finish,
    _gate,
    _kill,
    _lease_of,
    _popen_other,
    _snapshots,
    _state,
    _tree,
    _wait,
    needs_other_host,
)


class _HookFs(HdfsFs):
    """An HdfsFs that runs ``hooks[kind]`` once, just before its first call of that kind on a matching path."""

    def __init__(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.hooks: dict[str, object] = {}

    def _run(self, kind: str, path: str) -> None:
        hook = self.hooks.get(kind)
        if hook is not None and hook[0](path):  # type: ignore[index]
            del self.hooks[kind]
            hook[1]()  # type: ignore[index]

    def write(self, path, *a, **k):  # type: ignore[no-untyped-def]
        self._run("write", path)
        return super().write(path, *a, **k)


def test_an_apply_inside_a_root_whose_apply_starts_meanwhile_is_refused_or_refuses_it(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Apply I onto /x/y looks for leases in the ancestors' staging areas first, and writes its own lease
    only afterwards. Apply O onto /x starts in between: its lease is written, its walk finds
    /x/y/.drsync-staging (made by I, its lease not written yet) holding no lease, so O goes on; I then writes
    its lease, finds no other in /x/y/.drsync-staging and goes on too. Two applies write into /x/y at
    once (safety rule 2). Same window as the s56c race for one root, closed there by writing before
    looking; here the look at the ancestors comes before the write."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    webhdfs.fs.mkdirs(site.path("x/y/d"))
    outer = HdfsDataRoot(site.url("x"))
    inner_fs = _HookFs(parse_hdfs_url(site.url("x/y")), retry_s=5)
    inner = HdfsDataRoot(site.url("x/y"), fs=inner_fs)
    went_on: dict[str, bool] = {}
    with ExitStack() as held:
        def outer_apply_starts() -> None:
            try:
                held.enter_context(outer.claim("outer apply"))
                outer.existing()
                outer.check_plan(ApplyPlan())
                went_on["outer"] = True
            except ApplyBusy:
                went_on["outer"] = False

        inner_fs.hooks["write"] = (lambda p: is_lease(posixpath.basename(p)), outer_apply_starts)
        try:
            held.enter_context(inner.claim("inner apply"))
            went_on["inner"] = True
        except ApplyBusy:
            went_on["inner"] = False
        assert "outer" in went_on  # the hook ran
        assert not (went_on["outer"] and went_on["inner"]), "both applies hold /x/y"


# --- a holder taken over in the middle of its staging ----------------------------------------------------------


def _root_and_s2(webhdfs, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Snapshots S1 and S2, an empty HDFS root ``r``: (repo URL, S1's id, the site, r's URL, r's staging path,
    the repository, S2's info)."""
    from drsync.repository.repo import Repository
    from drsync.storage import open_storage

    repo_url, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    webhdfs.fs.mkdirs(site.path("r"))
    repo = Repository.open(open_storage(repo_url))
    return repo_url, s1, site, site.url("r"), site.path("r/.drsync-staging"), repo, repo.find_snapshot(s2)


def _taken_over_mid_staging(webhdfs, tmp_path: Path, monkeypatch, *, a_cancels: bool):  # type: ignore[no-untyped-def]
    """Apply A (this process) of S2 onto an empty root is held up at the start of its staging (its cancel
    check, standing for a paused VM) past STALE_S (its lease aged by hand); host B restores S1 there, takes
    the stale lease over, stages and is paused before its journal. A then resumes: it stages on (or is
    cancelled). B then resumes and commits. Returns (A's outcome, B's exit code and stderr)."""

    monkeypatch.delenv("DRSYNC_FAULT_PAUSE", raising=False)
    monkeypatch.setattr(hdfs_lease, "RENEW_S", 1000.0)  # A's renewer stays out of the way (the VM is paused)
    repo_url, s1, _, target, staging, repo, info = _root_and_s2(webhdfs, tmp_path)
    manifest = repo.load_manifest(info)
    held_up, resume = threading.Event(), threading.Event()
    calls = [0]

    def cancel() -> bool:
        calls[0] += 1
        if calls[0] == 1:
            held_up.set()
            resume.wait(240)
            return a_cancels
        return False

    outcome: dict[str, object] = {}

    def run_a() -> None:
        try:
            outcome["result"] = apply_manifest(manifest, repo, target, what=f"snapshot {info.id}", cancel=cancel)
        except BaseException as e:
            outcome["error"] = e

    a = threading.Thread(target=run_a)
    a.start()
    b = None
    try:
        assert held_up.wait(120), outcome
        webhdfs.admin_fs.set_times(_lease_of(webhdfs, staging), int((time.time() - STALE_S - 30) * 1e9))
        gates = _gate(tmp_path, "apply-staged")
        b = _popen_other(tmp_path, OTHER, "snapshot", "restore", s1, "--repo", repo_url, "--target", target,
                         "--overwrite", "--delete-extra", DRSYNC_FAULT_PAUSE=str(gates))
        _wait("B staged", lambda: (gates / "apply-staged.reached").exists(), b)
        resume.set()
        a.join(120)
        assert not a.is_alive()
        (gates / "apply-staged").unlink()
        code, err = _finish(b)
    finally:
        resume.set()
        if b is not None:
            _kill(b)
        a.join(120)
    return outcome, code, err


@needs_other_host
def test_a_holder_taken_over_mid_staging_does_not_write_into_the_new_holders_staging_area(
        webhdfs, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A resumes and stages every file of S2 as .drsync-staging/N, the names B gave S1's files: B's staged
    files are overwritten with A's bytes. A stops at verify_claim (ApplyBusy), too late; B commits and the
    root holds S2's bytes under S1's names: a root that matches neither snapshot."""
    outcome, code, err = _taken_over_mid_staging(webhdfs, tmp_path, monkeypatch, a_cancels=False)
    assert isinstance(outcome.get("error"), ApplyBusy), outcome  # A refused, as it should
    assert code == 0, err
    assert _state(webhdfs, HdfsSite(webhdfs, webhdfs.test_dir).path("r")) == _expected(tmp_path / "S1")


@needs_other_host
def test_a_holder_taken_over_mid_staging_that_fails_does_not_empty_the_new_holders_staging_area(
        webhdfs, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A resumes and fails (cancelled; a missing chunk or an I/O error goes the same way): its cleanup
    (drop_staging) empties the staging area, B's staged files, mark and trash included, without looking at
    its lease. B then journals and commits a plan whose staged files are gone: B's restore is not whole."""
    outcome, code, err = _taken_over_mid_staging(webhdfs, tmp_path, monkeypatch, a_cancels=True)
    assert isinstance(outcome.get("error"), (ApplyBusy, OperationFailed)), outcome
    assert code == 0, err
    assert _state(webhdfs, HdfsSite(webhdfs, webhdfs.test_dir).path("r")) == _expected(tmp_path / "S1")


# --- a target made by prepare_target while another host makes it too -------------------------------------------


class _MkdirsHookFs(_HookFs):
    def mkdirs(self, path, *a, **k):  # type: ignore[no-untyped-def]
        self._run("mkdirs", path)
        return super().mkdirs(path, *a, **k)


@needs_other_host
def test_a_restore_that_failed_after_making_its_target_does_not_remove_another_hosts_restore_there(
        webhdfs, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Apply B onto a target that does not exist: prepare_target looks (missing), then makes it (MKDIRS answers
    true for a directory that exists) and says it made it. Host A restores S1 onto the same target in between,
    whole, and gives its lease back. B's claim then succeeds, B's plan is refused (a name HDFS cannot hold),
    and B removes "the target it made": A's complete restore is deleted."""
    from drsync.errors import UsageError
    from drsync.repository.repo import Repository
    from drsync.storage import open_storage

    monkeypatch.delenv("DRSYNC_FAULT_PAUSE", raising=False)
    repo_url = str(tmp_path / "repo")
    init_repo_at(repo_url, "e", "1")
    _tree(tmp_path / "S1", "S1")
    s1 = run_drsync("snapshot", "create", "--repo", repo_url, "--source", tmp_path / "S1", "--json").json()["id"]
    (tmp_path / "S3").mkdir()
    (tmp_path / "S3" / "a:b").write_text("colon\n")
    s3 = run_drsync("snapshot", "create", "--repo", repo_url, "--source", tmp_path / "S3", "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target = site.url("r")
    fs = _MkdirsHookFs(parse_hdfs_url(target), retry_s=5)

    def host_a_restores() -> None:
        a = _popen_other(tmp_path, OTHER, "snapshot", "restore", s1, "--repo", repo_url, "--target", target)
        code, err = _finish(a)
        assert code == 0, err

    fs.hooks["mkdirs"] = (lambda p: p.rstrip("/") == site.path("r"), host_a_restores)
    repo = Repository.open(open_storage(repo_url))
    info = repo.find_snapshot(s3)
    with pytest.raises(UsageError):
        apply_manifest(repo.load_manifest(info), repo, HdfsDataRoot(target, fs=fs), what=f"snapshot {info.id}")
    assert "mkdirs" not in fs.hooks  # A ran
    assert webhdfs.fs.status(site.path("r")) is not None, "host A's complete restore was removed"
    assert _state(webhdfs, site.path("r")) == _expected(tmp_path / "S1")


# --- a refused apply leaves nothing behind ---------------------------------------------------------------------


def test_an_apply_whose_lease_was_removed_by_hand_leaves_no_staging_area(webhdfs, tmp_path: Path,
                                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An operator removes the lease of an apply in flight (nothing else holds the root): the apply is refused
    (ApplyBusy), as it should. Its staged files stay in .drsync-staging (the breaker asked for their removal;
    decided against: an apply that lost its lease cannot tell whether another apply stages there now, so it
    leaves the staging area to whoever holds the root next). The next apply empties it and leaves nothing."""

    monkeypatch.delenv("DRSYNC_FAULT_PAUSE", raising=False)
    _, _, site, target, staging, repo, info = _root_and_s2(webhdfs, tmp_path)
    calls = [0]

    def cancel() -> bool:
        calls[0] += 1
        if calls[0] == 1:
            webhdfs.admin_fs.delete(_lease_of(webhdfs, staging))
        return False

    with pytest.raises(ApplyBusy):
        apply_manifest(repo.load_manifest(info), repo, target, what=f"snapshot {info.id}", cancel=cancel)
    assert webhdfs.fs.status(site.path("r/common")) is None  # nothing of the snapshot is in the root
    apply_manifest(repo.load_manifest(info), repo, target, what=f"snapshot {info.id}")
    assert webhdfs.fs.status(staging) is None, sorted(x["pathSuffix"] for x in webhdfs.fs.list_dir(staging))[:8]


# --- a standby agent meeting another host's apply -------------------------------------------------------------


def test_a_standby_whose_apply_is_refused_by_another_hosts_lease_is_not_marked_broken() -> None:
    """The agent's apply meets another host's lease: ApplyBusy, nothing changed. _after_failed_apply then
    runs recover(), whose recover_apply claims the root again and meets the same lease: ApplyBusy, which
    recover() raises on and _after_failed_apply takes for "an apply failed half-way and could not be
    completed": the agent refuses every shipment until it is restarted, though nothing of its own was
    changed and the other apply ends by itself."""
    from types import SimpleNamespace

    from drsync.agent.committer import Committer

    def recover() -> bool:
        raise ApplyBusy("the recovery of an interrupted apply", "another drsync apply (x, pid 1 on host h) is "
                        "writing to hdfs://nn/r")

    agent = SimpleNamespace(recover=recover, broken=None, agent="standby-1")
    Committer._after_failed_apply(agent)  # type: ignore[arg-type]
    assert not agent.broken, agent.broken
