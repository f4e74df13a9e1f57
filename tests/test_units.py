"""One time format in JSON output, binary size units: pure helpers, and the CLI that uses them."""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from drsync.units import human_size, with_iso_times
from tests.conftest import init_repo, init_repo_at, make_tree, run_drsync


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
    init_repo_at(repo, "c", "1")
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
    init_repo(cfg)
    r = run_drsync("apply", "--confirm", "nothing-held", "--json", "--wait", "1", "--config", cfg)
    assert r.code == 4 and len(r.err.strip().splitlines()) == 1, (r.code, r.err)
    doc = json.loads(r.out)
    assert not doc["ok"] and isinstance(doc["done_at_unix"], float), doc
    assert datetime.fromisoformat(doc["done_at"].replace("Z", "+00:00")).tzinfo is not None


def test_until_and_heartbeat_keys_and_offset_iso_times_get_the_one_format() -> None:
    """Issue 20 audit: paused_until was a local-offset time with microseconds, protected_until a bare Unix
    number, an agent record's heartbeat too: every such key is ISO 8601 in UTC with its ``_unix`` twin."""
    out = with_iso_times({"protected_until": 1_764_581_283.5, "heartbeat": 1_764_581_283,
                          "paused_until": "2025-12-01T10:28:03.353123+01:00", "primary_since": 1_764_581_283,
                          "until_count": 3, "timeout_s": 1_764_581_283})
    assert out["protected_until"] == "2025-12-01T09:28:03.500Z" and out["protected_until_unix"] == 1_764_581_283.5
    assert out["heartbeat"] == "2025-12-01T09:28:03.000Z" and out["heartbeat_unix"] == 1_764_581_283
    assert out["paused_until"] == "2025-12-01T09:28:03.353Z"
    assert abs(out["paused_until_unix"] - 1_764_581_283.353123) < 1e-6
    assert out["primary_since"].endswith("Z") and out["until_count"] == 3 and out["timeout_s"] == 1_764_581_283


_TIME_KEY = re.compile(r"^(at|.*_at|.*since|.*until|last_seen|heartbeat)$")


def _time_format_problems(doc: Any, where: str = "") -> list[str]:
    """Every time-like key of a JSON document that is not ISO 8601 UTC (``...Z``) with a numeric ``_unix`` twin."""
    out: list[str] = []
    if isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _time_format_problems(v, f"{where}[{i}]")
    elif isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(k, str) and _TIME_KEY.match(k) and v is not None:
                twin = doc.get(f"{k}_unix")
                if not (isinstance(v, str) and v.endswith("Z") and isinstance(twin, int | float)):
                    out.append(f"{where}.{k} = {v!r} ({k}_unix = {twin!r})")
            else:
                out += _time_format_problems(v, f"{where}.{k}")
    return out


def test_json_outputs_of_running_agents_and_commands_use_one_time_format(tmp_path: Path) -> None:
    """status.json of a primary and a standby, and the --json of snapshot list and status: every time-like
    key (``at``, ``*_at``, ``*since``, ``*until``, ``last_seen``, ``heartbeat``) is ISO 8601 with its zone and
    a ``_unix`` twin."""
    from tests.group import wait_for
    from tests.test_agents import Pair

    pair = Pair(tmp_path)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the first sync")
        docs = {name: json.loads(urllib.request.urlopen(f"http://{pair.metrics[name]}/status.json",
                                                        timeout=10).read()) for name in ("primary", "standby")}
        for name, cfg in (("primary", pair.primary_cfg), ("standby", pair.standby_cfg)):
            r = run_drsync("snapshot", "list", "--config", cfg, "--json")
            assert r.code == 0 and r.json(), r.err
            docs[f"{name} snapshot list"] = r.json()
        problems = {what: _time_format_problems(doc) for what, doc in docs.items()}
        assert not any(problems.values()), problems
        assert docs["primary snapshot list"][0]["captured_at"].endswith("Z")  # the walker saw real times
    finally:
        pair.stop_all()
