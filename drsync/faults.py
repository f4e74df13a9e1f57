"""Pause points for fault trials: where a test can hold drsync still, as a very slow disk or a very
large repository would.

Some faults cannot be produced on demand: a full backup that takes hours, a garbage collection over
a repository of millions of chunks. Tests stand in for them by pausing drsync at a named point:
with ``DRSYNC_FAULT_PAUSE=<directory>`` in the environment, :func:`pause` at point ``name`` checks
for the file ``<directory>/<name>``; while it exists drsync writes ``<directory>/<name>.reached``
(so the test knows it got there) and waits. Deleting the file lets it go on. Without the variable
(production) a pause point costs one environment lookup.

Points: ``backup`` (a periodic backup, with the repository's shared lock held, before it copies
anything), ``gc-mark`` (garbage collection's mark, with the repository's shared lock held, after it read every
snapshot's manifest), ``gc`` (garbage collection's sweep, with the repository's exclusive lock held),
``point-apply`` (a promotion at a recovery point: applies held, before its apply starts),
``relay-commit`` (a standby relaying a snapshot to a standby that follows it, before the commit),
``claim`` (an agent the epoch names, before it takes the primary node: a promotion it never acts on),
``hdfs-commit`` (an apply onto HDFS with its journal written, before the commit moves anything),
``keep-history`` (a DistCp-engine standby's apply committed and recorded, before its history snapshot),
``snapshot-commit`` (a snapshot captured and its chunks flushed under the shared lock, before its commit),
``apply-staged`` (an apply's files staged and flushed, its apply lock held, before its journal and commit),
``apply-commit`` (an apply's journal written, before its commit changes the target).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("drsync.faults")

POLL_S = 0.02


def pause(name: str) -> None:
    """Wait here while ``$DRSYNC_FAULT_PAUSE/<name>`` exists (see the module docstring)."""
    where = os.environ.get("DRSYNC_FAULT_PAUSE")
    if not where:
        return
    gate = os.path.join(where, name)
    if not os.path.exists(gate):
        return
    log.warning("fault trial: paused at %s while %s exists", name, gate)
    with open(f"{gate}.reached", "w") as f:
        f.write(f"{os.getpid()}\n")
    while os.path.exists(gate):
        time.sleep(POLL_S)
    log.warning("fault trial: %s resumed", name)
