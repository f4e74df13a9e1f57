"""What the status page shows of an agent's recent past: activity and lag samples, thread-safe.

Shippers, the committer (gRPC threads) and the agent's loop append; the HTTP thread
reads. Readers get copies taken under the lock, never the live deques.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# The status page's lag chart: one sample every few seconds, kept in memory for some hours.
LAG_SAMPLE_S = 5.0
LAG_WINDOW_S = 6 * 3600.0
RECENT = 20


class Activity:
    def __init__(self, lag: Callable[[], float | None]) -> None:
        self._lag = lag
        self._lock = threading.Lock()
        self._events: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._lag_history: deque[tuple[float, float | None]] = deque(maxlen=int(LAG_WINDOW_S / LAG_SAMPLE_S))
        self._last_sample = 0.0

    def add(self, snapshot: str, ok: bool, summary: str) -> None:
        """One capture, shipment or apply, for the page's "recent activity" table."""
        with self._lock:
            self._events.append({"at": time.time(), "snapshot": snapshot, "ok": ok, "summary": summary})

    def sample_lag(self) -> None:
        """Record the lag now, at most every :data:`LAG_SAMPLE_S`."""
        now = time.time()
        with self._lock:
            if now - self._last_sample < LAG_SAMPLE_S:
                return
            self._last_sample = now
        lag = self._lag()
        with self._lock:
            self._lag_history.append((now, lag))

    def recent(self) -> list[dict[str, Any]]:
        """Newest first (copies)."""
        with self._lock:
            return [dict(e) for e in reversed(self._events)]

    def lag_history(self) -> list[tuple[float, float | None]]:
        with self._lock:
            return list(self._lag_history)
