"""drsync sets its allocators up before Arrow is imported (drsync.allocators), and leaves an
operator's own choice alone."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import drsync, pyarrow as pa; print(pa.default_memory_pool().backend_name)"


def _backend(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_arrow_uses_the_system_allocator_unless_the_operator_chose_one() -> None:
    base = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _backend(base) == "system"
    assert _backend({**base, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"
