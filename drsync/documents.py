"""How drsync reads a JSON document it did not write in this process (a repository's documents, a
backup's ``backup.json``, a peer's or ZooKeeper's data, the agent's own state files): strictly.

Python's :func:`json.loads` accepts ``NaN`` and ``Infinity`` (not JSON: drsync's ``--json`` output
would stop being JSON if it passed them on) and raises :class:`RecursionError`, which no caller
expects, for arrays or objects nested some thousand levels deep. :func:`loads` turns both into the
:class:`ValueError` every reader already handles as "damaged".
"""

from __future__ import annotations

import json
from typing import Any


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | str, *, allow_nan: bool = False) -> Any:
    """The JSON value of ``data``. Raises ValueError (``json.JSONDecodeError`` is one) for anything that
    is not JSON, for values nested too deeply to read, and (unless ``allow_nan``, for documents an older
    drsync may have written with them) for ``NaN``, ``Infinity`` and ``-Infinity``."""
    try:
        return json.loads(data) if allow_nan else json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("values nested too deeply to read") from None
