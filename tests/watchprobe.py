"""A :class:`~drsync.agent.watcher.RootWatcher` in a process of its own, for tests that need the kernel to
misbehave for it alone: a tiny watch limit in a user namespace (``unshare -U -r``), a queue overflow while
the process is stopped (SIGSTOP). ``python -m tests.watchprobe ROOT [EXCLUDED...]`` prints one JSON line
once it watches, then one per line read on stdin: changes seen, whether a change is pending, the problem
(:meth:`RootWatcher.problem`) and the coverage problem (:meth:`RootWatcher.coverage_problem`). With
``DRSYNC_PROBE_ALSO=OTHER_ROOT`` a second watcher in the same process watches OTHER_ROOT, and each line
also holds its problem (``also_problem``)."""

from __future__ import annotations

import json
import os
import sys

from drsync.agent.watcher import RootWatcher, WatchError


def main() -> None:
    root, *excluded = sys.argv[1:]
    w = RootWatcher(root, exclude=excluded)
    try:
        w.start()
    except WatchError as e:
        print(json.dumps({"started": False, "error": str(e)}), flush=True)
        return
    also = RootWatcher(os.environ["DRSYNC_PROBE_ALSO"]) if os.environ.get("DRSYNC_PROBE_ALSO") else None
    if also is not None:
        also.start()
    print(json.dumps({"started": True, "coverage": w.coverage_problem()}), flush=True)
    for _ in sys.stdin:
        print(json.dumps({"changes": w.changes, "pending": w.take() is not None, "problem": w.problem(),
                          "coverage": w.coverage_problem(),
                          "also_problem": also.problem() if also is not None else None}), flush=True)
    w.stop()
    if also is not None:
        also.stop()


if __name__ == "__main__":
    main()
