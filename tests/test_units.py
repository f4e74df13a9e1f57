"""One time format in JSON output, binary size units: pure helpers, and the CLI that uses them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from drsync.units import human_size, with_iso_times
from tests.conftest import make_tree, run_drsync


def test_unix_times_become_iso_with_zone_and_keep_a_unix_twin() -> None:
    doc = {"created_at": 1_764_581_283.353, "since": 1_764_581_283, "duration_s": 2.5, "kill_at": 3,
           "nested": [{"held_at": 1_764_581_283.0, "captured_at": None}], "at_least": 1_764_581_283,
           "already_at": "2026-12-01T09:28:03.353Z", "flag_at": True, "word_at": "noon"}
    out = with_iso_times(doc)
    assert out["created_at"] == "2025-12-01T09:28:03.353Z" and out["created_at_unix"] == 1_764_581_283.353
    assert out["since"] == "2025-12-01T09:28:03.000Z" and out["since_unix"] == 1_764_581_283
    assert out["nested"][0]["held_at"].endswith("Z") and out["nested"][0]["captured_at"] is None
    # Durations, counts, non-time keys, strings and booleans stay as they are.
    for k in ("duration_s", "kill_at", "at_least", "already_at", "flag_at", "word_at"):
        assert out[k] == doc[k]
    assert out["already_at_unix"] == 1_764_581_283.353 + 365 * 86400 and "word_at_unix" not in out
    assert datetime.fromisoformat(out["created_at"]).tzinfo is not None


def test_sizes_in_binary_units() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536 * 1024, 5 << 40)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB"]


def test_backup_list_json_has_iso_times_and_unix_twins(tmp_path: Path) -> None:
    make_tree(tmp_path / "data", files=3, big=0)
    repo = tmp_path / "repo"
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json")
    assert snap.code == 0, snap.err
    assert run_drsync("backup", "create", "--snapshot", json.loads(snap.out)["id"], "--repo", repo, "--dest",
                      tmp_path / "backups").code == 0
    listed = run_drsync("backup", "list", tmp_path / "backups", "--json")
    assert listed.code == 0, listed.err
    rows = json.loads(listed.out)
    rows = rows["backups"] if isinstance(rows, dict) else rows
    assert rows and datetime.fromisoformat(rows[0]["created_at"].replace("Z", "+00:00")).tzinfo is not None
    assert isinstance(rows[0]["created_at_unix"], float)


def test_the_json_a_failing_command_prints_has_iso_times_too(tmp_path: Path) -> None:
    """Issue 20: `apply --confirm X --json` that fails printed its reply with done_at as Unix seconds, while
    every successful command's JSON has ISO 8601 times with a zone and a `_unix` twin."""
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "standby.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                   f'repository = "{tmp_path / "repo"}"\n[agent]\nrole = "standby"\n')
    assert run_drsync("init", "--config", cfg).code == 0
    r = run_drsync("apply", "--confirm", "nothing-held", "--json", "--wait", "1", "--config", cfg)
    assert r.code == 4 and len(r.err.strip().splitlines()) == 1, (r.code, r.err)
    doc = json.loads(r.out)
    assert not doc["ok"] and isinstance(doc["done_at_unix"], float), doc
    assert datetime.fromisoformat(doc["done_at"].replace("Z", "+00:00")).tzinfo is not None
