"""Hostile trials of relays with fixed roles (no ZooKeeper): real agents over loopback gRPC."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import init_repo, make_tree, tree_state
from tests.group import wait_for
from tests.zk import free_port


def _start(tmp: Path, cfgs: dict[str, tuple[str, list[str]]], env: dict[str, dict[str, str]] | None = None):
    addr = {n: f"127.0.0.1:{free_port()}" for n in cfgs}
    procs = {}
    for name, (role, targets) in cfgs.items():
        data = tmp / f"{name}-data"
        if role == "primary":
            make_tree(data, files=20, big=1)
        else:
            data.mkdir()
        cfg = tmp / f"{name}.toml"
        standbys = ", ".join(f'"{addr[t]}"' for t in targets)
        cfg.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{data}"\n'
                       f'repository = "{tmp / (name + "-repo")}"\n[agent]\nname = "{name}"\n'
                       f'role = "{role}"\nlisten = "{addr[name]}"\nmetrics = ""\n[replication]\ninterval = "1s"\n'
                       + (f'standbys = [{standbys}]\n' if targets else ""))
        init_repo(cfg)
    for name in cfgs:
        with open(tmp / f"{name}.log", "ab") as log:
            cmd = [sys.executable, "-m", "drsync", "agent", "--config", str(tmp / f"{name}.toml")]
            procs[name] = subprocess.Popen(cmd,
                                           stdout=log, stderr=log, env=(env or {}).get(name))
    return addr, procs


def _stop(procs) -> None:  # type: ignore[no-untyped-def]
    for p in procs.values():
        try:
            p.send_signal(18)
            p.terminate()
        except ProcessLookupError:
            pass
    for p in procs.values():
        p.wait(timeout=120)


def test_fixed_roles_a_loop_of_relays_never_takes_a_standby_back(tmp_path: Path) -> None:
    """near relays to far, far relays back to near (an operator's mistake the config accepts?)."""
    _, procs = _start(tmp_path, {"far": ("standby", ["near"]), "near": ("standby", ["far"]),
                                    "prod": ("primary", ["near"])})
    try:
        prod, near, far = (tmp_path / f"{n}-data" for n in ("prod", "near", "far"))
        wait_for(lambda: tree_state(far) == tree_state(prod), "far to get prod's tree through near")
        for i in range(8):
            (prod / "catalog" / f"c{i}.txt").write_text(f"{i}\n" * 100)
            if i % 2:
                (prod / "catalog" / f"c{i - 1}.txt").unlink()
            wait_for(lambda: tree_state(near) == tree_state(prod), f"near to get change {i}")
        wait_for(lambda: tree_state(near) == tree_state(prod) and tree_state(far) == tree_state(prod),
                 "both to settle on prod's last tree", timeout=60)
        assert tree_state(near) == tree_state(prod), "near went back to an older snapshot"
        assert tree_state(far) == tree_state(prod)
    finally:
        _stop(procs)


def test_fixed_roles_an_older_relayed_snapshot_after_a_newer_direct_one_is_refused(tmp_path: Path) -> None:
    """prod ships to near and far; near also relays to far. near holds its relay of S1; prod ships S2 to far;
    then near's relay of S1 lands: far must keep S2."""
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {"near": {**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)}}
    _, procs = _start(tmp_path, {"far": ("standby", []), "near": ("standby", ["far"]),
                                    "prod": ("primary", ["near", "far"])}, env)
    try:
        prod, far = tmp_path / "prod-data", tmp_path / "far-data"
        wait_for(lambda: tree_state(far) == tree_state(prod), "far's first sync")
        (pause / "relay-commit").touch()
        (prod / "catalog" / "s1.txt").write_text("s1\n")
        wait_for(lambda: (pause / "relay-commit.reached").exists(), "near to hold its relay of S1")
        (prod / "catalog" / "s1.txt").unlink()
        (prod / "catalog" / "s2.txt").write_text("s2\n")
        wait_for(lambda: tree_state(far) == tree_state(prod), "prod to ship S2 to far directly")
        assert (far / "catalog" / "s2.txt").exists()
        (pause / "relay-commit").unlink()
        # near skips the late relay (far already applied a newer snapshot), or far refuses it; far never
        # goes back meanwhile.
        went_back = []

        def dealt_with() -> bool:
            if (far / "catalog" / "s1.txt").exists() or not (far / "catalog" / "s2.txt").exists():
                went_back.append(time.monotonic())
            return "already applied a newer snapshot" in (tmp_path / "near.log").read_text() or \
                "arrived late" in (tmp_path / "far.log").read_text()
        wait_for(dealt_with, "the late relay of S1 to be skipped or refused")
        assert not went_back, "far went back from S2 to S1, an older snapshot (relayed late by near)"
        assert (far / "catalog" / "s2.txt").exists() and not (far / "catalog" / "s1.txt").exists()
    finally:
        _stop(procs)
