"""Glob patterns over slash-separated relative paths (``tables/**``, ``*.tmp``).

``*`` and ``?`` stay inside one path component; ``**`` crosses components. A
pattern without a slash matches the last component anywhere, like .gitignore, and
a pattern that matches a directory matches everything below it too (so leaving out
``b`` never keeps ``b/f`` without its directory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable


def _translate(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                out[-1] = "(?:.*/)?"
                i += 1
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_globs(patterns: Iterable[str]) -> Callable[[str], bool]:
    parts = []
    for p in patterns:
        p = p.strip().lstrip("/")
        if not p:
            continue
        body = _translate(p.rstrip("/"))
        parts.append(body if "/" in p.rstrip("/") else f"(?:.*/)?{body}")
    if not parts:
        return lambda path: False
    rx = re.compile(rf"^(?:{'|'.join(parts)})(?:/.*)?$", re.DOTALL)
    return lambda path: rx.match(path) is not None
