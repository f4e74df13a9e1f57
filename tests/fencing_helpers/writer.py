"""A production writer: keeps creating files in a data root until it is killed.

usage: writer.py ROOT JOURNAL PIDFILE PERIOD_S

Each file ROOT/writer/w-NNNNNN.txt is written and fsynced first; only then is its
name appended (and fsynced) to JOURNAL, so every name in the journal is a file
the writer really wrote. PIDFILE holds the writer's pid, for a fence to kill it.
"""

from __future__ import annotations

import os
import sys
import time


def content(n: int) -> bytes:
    return (f"written by the production writer, file {n}\n" * 8).encode()


def main() -> None:
    root, journal, pidfile, period = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    d = os.path.join(root, "writer")
    os.makedirs(d, exist_ok=True)
    n = 0
    with open(journal, "a") as j:
        while True:
            n += 1
            name = f"w-{n:06}.txt"
            fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, content(n))
                os.fsync(fd)
            finally:
                os.close(fd)
            j.write(f"{name} {time.time():.3f}\n")
            j.flush()
            os.fsync(j.fileno())
            time.sleep(period)


if __name__ == "__main__":
    main()
