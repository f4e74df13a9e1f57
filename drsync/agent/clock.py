"""The primary's clock, as seen from another machine, and the one definition of lag. Pure: no I/O.

Lag (DESIGN.md "lag") is *now minus the capture time of the newest snapshot
fully applied on the standby, both read on the primary's clock*. Capture times
are stamped by the primary's clock; a standby whose clock is X seconds off
would hide (or invent) X seconds of lag if it subtracted them from its own
``time.time()``. So a standby estimates ``offset = primary clock - own clock``
from the timestamps every request of the primary carries, and reads the
primary's "now" as ``time.time() + offset``. While the primary is gone the last
estimate stays: the standby keeps counting on its own clock.

Standbys are never compared by such times: they are ranked by position (the
epoch and sequence number of the snapshot they applied, see
:func:`drsync.agent.roles.candidate_rank`).
"""

from __future__ import annotations

import time
from collections import deque

# Samples older than this (counted back from the newest one) no longer count, so that a clock
# step on either machine is followed within this window.
WINDOW_S = 120.0
MAX_SAMPLES = 512


def lag_s(applied_captured_at: float, offset_s: float = 0.0, now: float | None = None) -> float | None:
    """Lag in seconds: the primary's now (``now``, this machine's clock, plus ``offset_s``, the primary's
    clock minus this machine's) minus the capture time of the applied snapshot (primary's clock). None
    when nothing was applied (``applied_captured_at`` 0). Never negative."""
    if not applied_captured_at:
        return None
    return max(0.0, (time.time() if now is None else now) + offset_s - applied_captured_at)


class ClockOffset:
    """Estimates the offset of a remote clock (the primary's) to this machine's clock.

    A sample is (remote ``sent_at``, local ``received_at``) of one request;
    ``sent_at - received_at`` is the true offset minus the request's one-way
    delay, so it is never above the offset (with a correct delay), and the
    sample with the smallest delay -- the largest value -- is the best
    estimate. Samples age out ``window_s`` after the newest one, so that a
    clock step is followed; without new samples (primary gone) the estimate
    stays where it was. Samples from a new source (another primary) replace
    the old source's.
    """

    def __init__(self, offset_s: float = 0.0, source: str = "", *, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.source = source
        self.instance = ""  # the sender process the samples came from
        self._initial = offset_s  # e.g. restored from the state file; used until a sample arrives
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (monotonic at, offset - delay)

    def add(self, sent_at: float, received_at: float, *, source: str = "", instance: str = "",
            at: float | None = None) -> float:
        """Record one request's timestamps (``at``: this machine's monotonic time of arrival). Returns the
        estimate. A new ``source`` (another primary) or ``instance`` (the same primary restarted: its clock
        may have stepped back) starts the estimate afresh."""
        if not sent_at or not received_at:
            return self.offset_s
        at = time.monotonic() if at is None else at
        if (source and source != self.source) or (instance and instance != self.instance):
            self._samples.clear()
            self.source = source or self.source
            self.instance = instance
        self._samples.append((at, sent_at - received_at))
        while self._samples and self._samples[0][0] < at - self.window_s:
            self._samples.popleft()
        return self.offset_s

    @property
    def known(self) -> bool:
        return bool(self._samples)

    @property
    def offset_s(self) -> float:
        """The remote clock minus this machine's clock, in seconds (best estimate)."""
        if not self._samples:
            return self._initial
        return max(s for _, s in self._samples)
