"""How drsync reads a JSON document it did not write in this process (a repository's documents, a
backup's ``backup.json``, a peer's or ZooKeeper's data, the agent's own state files): strictly.

Python's :func:`json.loads` accepts ``NaN`` and ``Infinity`` (not JSON: drsync's ``--json`` output
would stop being JSON if it passed them on) and raises :class:`RecursionError`, which no caller
expects, for arrays or objects nested some thousand levels deep. :func:`loads` turns both into the
:class:`ValueError` every reader already handles as "damaged".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | str, *, allow_nan: bool = False) -> Any:
    """The JSON value of ``data``. Raises ValueError (``json.JSONDecodeError`` is one) for anything that
    is not JSON, for values nested too deeply to read, and (unless ``allow_nan``, for documents an older
    drsync may have written with them) for ``NaN``, ``Infinity`` and ``-Infinity``."""
    try:
        if allow_nan:
            return json.loads(data, parse_int=_integer)
        return json.loads(data, parse_int=_integer, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("values nested too deeply to read") from None


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > _INT_DIGITS:  # Python's own error here would advise sys.set_int_max_str_digits
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (more than {_INT_DIGITS})")
    return int(text)


_INT_DIGITS = 4300  # what int() reads by default


def typed(doc: Any, spec: Mapping[str, type], what: str) -> dict[str, Any]:
    """``doc`` as a dict whose keys named in ``spec`` hold, where present, a value of their type: ``int``
    an integer (never a bool), ``float`` a finite number (an integer is taken as one), ``str``, ``bool``,
    ``list``, ``dict``. Other keys pass unchecked. Raises ValueError naming ``what`` and the first key
    that does not fit (a document written by hand, or damaged)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is {_shown(doc)}, not a JSON object")
    for key, kind in spec.items():
        if key not in doc:
            continue
        v = doc[key]
        if kind is float:
            fits = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif kind is int:
            fits = isinstance(v, int) and not isinstance(v, bool)
        else:
            fits = isinstance(v, kind)
        if not fits:
            name = {float: "a finite number", int: "an integer", str: "a string", bool: "true or false",
                    list: "a list", dict: "an object"}.get(kind, kind.__name__)
            raise ValueError(f"{what}: {key} is {_shown(v)}, not {name}")
    return doc


def _shown(v: Any) -> str:
    text = json.dumps(v, allow_nan=True) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def typed_loads(data: bytes | str, spec: Mapping[str, type], what: str) -> dict[str, Any]:
    """:func:`loads` (``NaN`` and ``Infinity`` read, then refused where ``spec`` names a number) and
    :func:`typed`, for a document drsync wrote itself. ValueError "``what`` is not JSON" or :func:`typed`'s."""
    try:
        doc = loads(data, allow_nan=True)
    except ValueError:
        raise ValueError(f"{what} is not JSON") from None
    return typed(doc, spec, what)
