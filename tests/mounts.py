"""Filesystems mounted by a test inside its own directories (real tmpfs and bind mounts: the test runs as
root), all unmounted when the test ends (the ``mounts`` fixture of tests/conftest.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


class Mounts:
    """tmpfs and bind mounts made by a test, all unmounted at its end."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def _run(self, *args: str) -> None:
        r = subprocess.run(list(args), capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")

    def tmpfs(self, where: Path, files: dict[str, str] | None = None) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self._run("mount", "-t", "tmpfs", "-o", "size=8m", "drsync-test", str(where))
        self.points.append(where)
        for rel, text in (files or {}).items():
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            (where / rel).write_text(text)

    def bind(self, source: Path, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self._run("mount", "--bind", str(source), str(where))
        self.points.append(where)

    def umount(self, where: Path, lazy: bool = False) -> None:
        subprocess.run(["umount", *(["-l"] if lazy else []), str(where)], check=True)
        self.points.remove(where)
        # a lazy unmount takes the mounts below it too
        if lazy:
            self.points = [p for p in self.points if not str(p).startswith(str(where) + "/")]
