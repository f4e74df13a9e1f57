"""A :class:`~drsync.agent.watcher.RootWatcher` over a tree that spans filesystems, for
tests/test_continuous.py: run in a user and mount namespace of its own (``unshare -U -r -m``), it mounts
tmpfs filesystems inside a tmpfs root and prints one JSON line of what the watcher said.

``python -m tests.mountprobe BASE limit``: the tree spans two filesystems from the start and the watch
limit is 5 (set by the caller); a sixth directory, on the second filesystem, has the inode number of a
watched one on the first. ``python -m tests.mountprobe BASE mount-later``: a filesystem is mounted over a
watched directory after the watch was set up. ``... umount-later``: one mounted at the start is
unmounted, uncovering directories that never had a watch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from drsync.agent.watcher import RootWatcher


def mount(where: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "drsync-test", where], check=True)


def main() -> None:
    base, case = sys.argv[1:3]
    root = os.path.join(base, "root")
    os.makedirs(root)
    mount(root)
    for d in ("d1", "d2", "d3", "m"):
        os.mkdir(os.path.join(root, d))
    m = os.path.join(root, "m")
    if case == "umount-later":
        os.makedirs(os.path.join(m, "hidden", "deeper"))  # under the mount: no watch is ever set up here
    if case in ("limit", "umount-later"):
        mount(m)
    w = RootWatcher(root)
    w.start()
    out: dict[str, object] = {"coverage_at_start": w.coverage_problem(), "problem_at_start": w.problem()}
    if case == "limit":
        new = os.path.join(m, "new")
        os.mkdir(new)  # the sixth directory: past the limit
        out["same_inode_number"] = os.stat(new).st_ino in {os.stat(os.path.join(root, d)).st_ino
                                                           for d in ("d1", "d2", "d3")} | {os.stat(root).st_ino}
        deadline = time.monotonic() + 10
        while w.first_change is None and time.monotonic() < deadline:
            time.sleep(0.05)
        out["new_dirs"] = w.new_dirs_problem()
    elif case == "mount-later":
        mount(m)
        out["problem"] = w.problem()
    else:
        subprocess.run(["umount", m], check=True)
        out["problem"] = w.problem()
    out["coverage"] = w.coverage_problem()
    w.stop()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
