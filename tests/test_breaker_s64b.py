"""Breaker s64b: unchanged captures shipped by reference (f2c8002) and committed undecoded (0228d53).

Real agents (tests.test_agents.Pair): the standby runs as an agent process, the primary ships one cycle at a
time (``drsync agent --once``) so each cycle is a known capture. Every case checks that the standby's root is
the snapshot it records as applied and that ``drsync repo verify`` stays clean where nothing was damaged.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture
from tests.test_breaker_s62 import _rot_chunk


def _once(p: Pair) -> dict:
    r = run_drsync("agent", "--config", p.primary_cfg, "--once", "--json")
    doc = r.json() if r.out.strip() else {}
    doc["code"], doc["err"] = r.code, r.err
    return doc


def _fig(doc: dict) -> dict:
    results = doc.get("results") or {}
    assert len(results) == 1, (sorted(doc), doc.get("err"), doc.get("refused"), doc.get("failed"))
    return next(iter(results.values()))


def _state(p: Pair) -> dict:
    r = run_drsync("apply", "--json", "--config", p.standby_cfg)
    assert r.code == 0, r.err
    return r.json()  # type: ignore[no-any-return]


def _prod_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.prod_site.url("primary-repo")))


def _standby_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.standby_site.url("standby-repo")))


def _standby_dir(p: Pair) -> Path:
    return Path(p.standby_site.url("standby-repo"))


def _newest(p: Pair) -> str:
    return _prod_repo(p).list_snapshots()[-1].id


def _verify(p: Pair) -> None:
    v = run_drsync("repo", "verify", "--config", p.standby_cfg)
    assert v.code == 0, v.out + v.err


def _root_is_applied(p: Pair, label: str) -> None:
    p.assert_root_is_applied_snapshot(label)


def _restarted_root_is_applied(p: Pair, label: str) -> None:
    """After a restart of the standby alone: its root is its applied snapshot, and its repository verifies."""
    p.stop_all()
    p.start("standby")
    _root_is_applied(p, label)
    _verify(p)


def _synced(p: Pair) -> str:
    """A first cycle plus one change, applied: returns the applied id."""
    p.start("standby")
    assert _once(p)["code"] == 0
    (p.prod / "catalog" / "own-pack.bin").write_bytes(random.Random(5).randbytes(90_000))
    assert _once(p)["code"] == 0 and p.in_sync()
    wait_for(lambda: _state(p)["applied_snapshot"] == _newest(p), "the change to be recorded as applied")
    return _newest(p)


def _append(cfg: Path, text: str) -> None:
    with open(cfg, "a") as f:
        f.write(text)


def _unchanged(p: Pair) -> dict:
    doc = _once(p)
    assert doc["code"] == 0, doc["err"]
    return doc


# --- apply_delay ---------------------------------------------------------------------------------


def test_unchanged_cycles_on_a_delayed_standby_are_queued_then_applied(pair: Pair) -> None:  # noqa: F811
    _append(pair.standby_cfg, '[replication]\napply_delay = "2s"\n')
    pair.start("standby")
    assert _once(pair)["code"] == 0  # the first one is applied at once
    first = _newest(pair)
    wait_for(lambda: _state(pair)["applied_snapshot"] == first, "the first snapshot applied at once")
    fig = _fig(_unchanged(pair))
    assert fig["manifest_sent"] == "reference" and fig["missing_chunks"] == 0, fig
    second = _newest(pair)
    assert _state(pair)["applied_snapshot"] == first  # deferred, not applied at once
    wait_for(lambda: _state(pair)["applied_snapshot"] == second, "the unchanged snapshot to be applied when due")
    assert pair.in_sync()
    _restarted_root_is_applied(pair, "delayed")


def test_an_operator_hold_stores_unchanged_snapshots_and_resume_keeps_the_root(pair: Pair) -> None:  # noqa: F811
    _synced(pair)
    good = tree_state(pair.standby_data)
    r = run_drsync("apply", "--hold", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    stored = []
    for _ in range(2):
        doc = _once(pair)
        assert doc["code"] != 0 and "holds applies" in doc["err"], doc["err"]
        stored.append(_newest(pair))
    assert set(stored) <= {s.id for s in _standby_repo(pair).list_snapshots()}
    assert _state(pair)["refused"] >= 2
    assert tree_state(pair.standby_data) == good
    r = run_drsync("apply", "--resume", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    fig = _fig(_unchanged(pair))
    assert fig["manifest_sent"] == "reference", fig
    wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "the next unchanged one applied")
    assert pair.in_sync()
    _restarted_root_is_applied(pair, "resumed")


def test_a_lost_pack_while_held_is_sent_again_and_nothing_applied(pair: Pair) -> None:  # noqa: F811
    """An operator's hold, then a pack lost: the unchanged cycle's commit refuses for the lost chunks before
    the hold, the retry asks about every chunk and sends them; the snapshot is stored, not applied."""
    _synced(pair)
    good = tree_state(pair.standby_data)
    assert run_drsync("apply", "--hold", "--config", pair.standby_cfg).code == 0
    lonely = pair.prod / "catalog" / "own-pack.bin"
    repo = _standby_repo(pair)
    loc = repo.index.get(chunks.chunk_id(lonely.read_bytes()))
    assert loc is not None and len(list(repo.storage.list(fmt.PACKS_DIR))) > 1
    repo.storage.delete(fmt.pack_name(loc.pack_id))
    doc = _once(pair)
    assert "every chunk" in doc["err"] and "holds applies" in doc["err"], doc["err"]
    assert _newest(pair) in {s.id for s in _standby_repo(pair).list_snapshots()}
    assert tree_state(pair.standby_data) == good
    assert _state(pair)["applied_snapshot"] != _newest(pair)
    _verify(pair)
    assert run_drsync("apply", "--resume", "--config", pair.standby_cfg).code == 0
    _unchanged(pair)
    wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "applies to resume")
    _restarted_root_is_applied(pair, "lost-held")


def test_a_damaged_chunk_repaired_then_an_unchanged_cycle_sends_it_again(pair: Pair) -> None:  # noqa: F811
    _synced(pair)
    lonely = pair.prod / "catalog" / "own-pack.bin"
    _rot_chunk(_standby_dir(pair), chunks.chunk_id(lonely.read_bytes()))
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg)
    assert r.code == 0, r.out + r.err
    doc = _once(pair)
    assert doc["code"] == 0, doc["err"]
    fig = _fig(doc)
    assert fig["manifest_sent"] == "reference" and fig["missing_chunks"] >= 1, fig
    wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "the unchanged snapshot applied")
    _restarted_root_is_applied(pair, "rot")


def test_a_deleted_copy_of_the_named_manifest_gets_the_bytes(pair: Pair) -> None:  # noqa: F811
    applied = _synced(pair)
    (_standby_dir(pair) / fmt.manifest_name(applied)).unlink()
    doc = _once(pair)
    assert doc["code"] == 0, doc["err"]
    newest = _newest(pair)
    wait_for(lambda: _state(pair)["applied_snapshot"] == newest, "the snapshot sent with its bytes applied")
    s = _standby_repo(pair)
    s.manifest_spool(s.find_snapshot(newest)).close()  # checked against its hash
    assert pair.in_sync()
    fig = _fig(_unchanged(pair))  # and the next names the new copy
    assert fig["manifest_sent"] == "reference", fig


def test_a_damaged_copy_of_the_named_manifest_does_not_damage_the_new_snapshot(pair: Pair) -> None:  # noqa: F811
    applied = _synced(pair)
    _unchanged(pair)  # a second stored snapshot with the same manifest bytes
    applied = _newest(pair)
    wait_for(lambda: _state(pair)["applied_snapshot"] == applied, "the unchanged one applied")
    path = _standby_dir(pair) / fmt.manifest_name(applied)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    doc = _once(pair)
    assert doc["code"] == 0 and "was sent whole" in doc["err"], doc["err"]
    newest = _newest(pair)
    wait_for(lambda: _state(pair)["applied_snapshot"] == newest, "the snapshot sent with its bytes applied")
    s = _standby_repo(pair)
    s.manifest_spool(s.find_snapshot(newest)).close()  # checked against its hash: IntegrityError if damaged


def test_a_reinitialised_standby_repository_gets_everything_again(pair: Pair) -> None:  # noqa: F811
    """The standby's repository is wiped and initialised again between cycles (its state directory kept: it
    still says it applied the old snapshot). The primary names that snapshot; the standby does not hold it."""
    _synced(pair)
    pair.stop_all()
    import shutil
    shutil.rmtree(_standby_dir(pair))
    r = run_drsync("init", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    pair.start("standby")
    doc = _once(pair)
    assert doc["code"] == 0, doc["err"]
    wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "the standby to apply again")
    assert pair.in_sync()
    fig = _fig(_unchanged(pair))
    assert fig["manifest_sent"] == "reference" and fig["missing_chunks"] == 0, fig
    _restarted_root_is_applied(pair, "reinit")


def test_a_lost_index_file_then_repair_then_unchanged_cycle(pair: Pair) -> None:  # noqa: F811
    _synced(pair)
    idx = sorted(p for p in (_standby_dir(pair) / fmt.INDEX_DIR).rglob("*") if p.is_file())
    assert idx
    idx[-1].unlink()
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg)
    assert r.code == 0, r.out + r.err
    doc = _once(pair)
    assert doc["code"] == 0, doc["err"]
    fig = _fig(doc)
    assert fig["manifest_sent"] == "reference", fig  # repair re-indexed the packs: nothing to send again
    wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "the unchanged snapshot applied")
    _restarted_root_is_applied(pair, "index")


# --- crashes and retention -------------------------------------------------------------------------


def test_kill_9_of_the_standby_around_unchanged_cycles(pair: Pair) -> None:  # noqa: F811
    _synced(pair)
    pair.start("primary")
    for i in range(3):
        before = _state(pair)["applied_snapshot"]
        wait_for(lambda b=before: _state(pair)["applied_snapshot"] != b, f"an unchanged cycle applied ({i})")
        pair.kill("standby", signal.SIGKILL)
        pair.start("standby")
    before = _state(pair)["applied_snapshot"]
    wait_for(lambda: _state(pair)["applied_snapshot"] != before, "cycles to go on after the kills")
    pair.kill("primary", signal.SIGKILL)
    assert pair.in_sync()
    _root_is_applied(pair, "kill9")
    _verify(pair)


def test_retention_on_the_primary_expiring_the_applied_snapshot(pair: Pair) -> None:  # noqa: F811
    """keep last = 1 on the primary: the snapshot the standby applied is gone from the primary's repository
    when it ships the next unchanged capture; it is not named then (sent whole), and all stays consistent."""
    _append(pair.primary_cfg, "[snapshots]\nkeep = { last = 1 }\n")
    _synced(pair)
    for _ in range(2):
        doc = _unchanged(pair)
        wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "the unchanged snapshot applied")
        assert _fig(doc)["manifest_sent"] in ("reference", "bytes"), doc
    assert pair.in_sync()
    _restarted_root_is_applied(pair, "retention")


def test_standby_retention_keeps_last_one_with_unchanged_cycles(pair: Pair) -> None:  # noqa: F811
    _append(pair.standby_cfg, "[snapshots]\nkeep = { last = 1 }\n")
    _synced(pair)
    for _ in range(3):
        doc = _unchanged(pair)
        assert _fig(doc)["manifest_sent"] == "reference", doc
        wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "the unchanged snapshot applied")
    r = run_drsync("snapshot", "expire", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    assert run_drsync("repo", "gc", "--config", pair.standby_cfg).code == 0
    doc = _unchanged(pair)
    assert _fig(doc)["manifest_sent"] == "reference", doc
    wait_for(lambda: _state(pair)["applied_snapshot"] == _newest(pair), "applied after a GC")
    _restarted_root_is_applied(pair, "standby-retention")
