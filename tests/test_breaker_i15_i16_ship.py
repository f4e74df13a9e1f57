"""A snapshot that names no chunk cannot be shipped (found on main at 1a77fa6, "Negotiation at scale").

The primary's ``chunk_table`` builds the chunk list of the snapshot to ship from the manifest's row
groups, then takes ``column("chunk").chunk(0)`` of the combined table. When no file has a chunk the
combined column has no chunk at all: ``IndexError: Chunk index out of range`` in the shipper,
logged as "unexpected error" and retried for ever. Two kinds of snapshot name no chunk:

- every snapshot of ``replication.engine = "distcp"``: its files carry HDFS checksums, not chunk
  lists (deploy/hdfs/README.md, "Two engines"), so DistCp replication never ships anything (seen
  with two real agents on the real mini cluster; tests/test_distcp_engine.py and
  tests/test_distcp_breaker.py show it too);
- with the agent engine, a data root that holds only empty files and directories (a cluster just
  provisioned): the standby never receives it.
"""

from __future__ import annotations

from pathlib import Path

from drsync.agent.primary import ManifestFile, chunk_table
from drsync.repository.format import manifest_name
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import init_repo, run_drsync
from tests.test_agents import Pair, wait_for


def _empty_tree(root: Path) -> None:
    (root / "incoming" / "2026").mkdir(parents=True)
    (root / "incoming" / "_SUCCESS").touch()
    (root / "empty.csv").touch()


def test_the_chunk_list_of_a_snapshot_of_empty_files_is_empty(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _empty_tree(data)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n')
    init_repo(cfg)
    assert run_drsync("snapshot", "create", "--config", cfg).code == 0
    repo = Repository.open(LocalStorage(tmp_path / "repo"))
    (info,) = repo.list_snapshots()
    table = chunk_table(ManifestFile(repo.storage.read(manifest_name(info.id)), "manifest"))
    assert table.num_rows == 0


def test_a_primary_whose_root_holds_only_empty_files_replicates_it(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    for p in sorted(pair.prod.rglob("*"), reverse=True):  # the pair's generated tree, replaced
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    _empty_tree(pair.prod)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(lambda: pair.in_sync() or "unexpected error" in (tmp_path / "primary.log").read_text(),
                 "the standby to match production, or the primary's shipper to fail")
        assert "unexpected error" not in (tmp_path / "primary.log").read_text(), \
            (tmp_path / "primary.log").read_text()[-1500:]
        wait_for(pair.in_sync, "the standby to match production")
    finally:
        pair.stop_all()
