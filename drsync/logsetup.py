"""The agent's log: one line per record on stderr, as text or as JSON lines (``--log-format``).

Every record carries the time in ISO 8601 with its zone (``2026-12-01T09:01:23.353+00:00``), the
level, the group and the agent; records about one snapshot name it in their message. The JSON form
(python-json-logger) has the keys ``time``, ``level``, ``logger``, ``group``, ``agent`` and
``message``, and ``snapshot`` when the record is about one (the first snapshot its message names),
one object per line, for log shippers.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from drsync.text import OneLineFormatter, without_traceback

FORMATS = ("text", "json")


def _iso(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class _Text(OneLineFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso(record)


class _Json(JsonFormatter):
    def __init__(self, *args: Any, tracebacks: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracebacks = tracebacks

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso(record)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record if self.tracebacks else without_traceback(record))


# How a message names a snapshot: "snapshot <16 hex digits>" (drsync's snapshot ids).
_SNAPSHOT = re.compile(r"\bsnapshots? ([0-9a-f]{16})\b")


class _Context(logging.Filter):
    """Stamps every record with the group and the agent, and the snapshot its message names first."""

    def __init__(self, group: str, agent: str) -> None:
        super().__init__()
        self.group, self.agent = group, agent

    def filter(self, record: logging.LogRecord) -> bool:
        record.group, record.agent = self.group, self.agent
        if not hasattr(record, "snapshot"):
            try:
                found = _SNAPSHOT.search(record.getMessage())
            except (TypeError, ValueError):  # a record whose arguments do not fit its format
                found = None
            if found:
                record.snapshot = found.group(1)
        return True


def configure(*, group: str, agent: str, fmt: str = "text", level: int = logging.INFO,
              tracebacks: bool = False) -> None:
    """Send every log record to stderr in ``fmt`` ("text" or "json"), at ``level`` and above. An
    exception logged with a record is its type and text at the end of the line; ``tracebacks``
    (``--debug``, or level DEBUG) adds the traceback."""
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(group, agent))
    if fmt == "json":
        handler.setFormatter(_Json("%(asctime)s %(levelname)s %(name)s %(group)s %(agent)s %(message)s",
                                   rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                                   tracebacks=tracebacks))
    else:
        handler.setFormatter(_Text("%(asctime)s %(levelname)s group=%(group)s agent=%(agent)s %(name)s: %(message)s",
                                   tracebacks=tracebacks))
    root.addHandler(handler)
    # Libraries speak through drsync's own lines: their warnings are not printed on their own.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
