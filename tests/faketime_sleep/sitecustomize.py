"""Loaded (through PYTHONPATH) by the processes tests run under libfaketime (tests/test_clock_skew.faketime_env).

libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC turns the monotonic deadline of
clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which is what time.sleep calls, into an invalid one:
every time.sleep fails with EINVAL, and an agent that sleeps (a lock's backoff) dies. Timed waits on
locks are not affected: time.sleep waits on one instead when it fails so.
"""

import threading
import time

_sleep = time.sleep


def _faketime_safe_sleep(seconds: float) -> None:
    try:
        _sleep(seconds)
    except OSError:
        if seconds > 0:
            threading.Event().wait(seconds)


time.sleep = _faketime_safe_sleep
