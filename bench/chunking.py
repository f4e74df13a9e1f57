"""How the FastCDC average chunk size trades chunk count against incremental size.

Chunks 256 MiB of random data in 4 MiB files, changes 1 % of the bytes in three
patterns, and prints the share of the data that would be new (shipped) for each
average size, plus chunking throughput. This measurement chose
``CHUNK_AVG`` in drsync/repository/format.py.

    python bench/chunking.py
"""

from __future__ import annotations

import os
import random
import time

import blake3
from pyfastcdc import FastCDC

FILE = 4 << 20
FILES = 64


def changed(orig: list[bytes], block: int, rnd: random.Random) -> list[bytes]:
    out = [bytearray(f) for f in orig]
    budget = len(out) * FILE // 100
    done = 0
    while done < budget:
        f = rnd.choice(out)
        n = min(block, budget - done)
        off = rnd.randrange(0, len(f) - n)
        f[off:off + n] = os.urandom(n)
        done += n
    return [bytes(f) for f in out]


def main() -> None:
    rnd = random.Random(7)
    orig = [os.urandom(FILE) for _ in range(FILES)]
    total = FILE * FILES
    patterns = {"1 MiB blocks": changed(orig, 1 << 20, rnd), "64 KiB writes": changed(orig, 64 << 10, rnd),
                "4 KiB writes": changed(orig, 4 << 10, rnd)}
    print(f"{'average':>10} {'chunks/GiB':>11} {'GB/s':>6}  " + "  ".join(f"{p:>14}" for p in patterns))
    for avg in (128 << 10, 256 << 10, 512 << 10, 1 << 20):
        cdc = FastCDC(avg, min_size=avg // 4, max_size=avg * 4)

        def ids(files: list[bytes], cdc: FastCDC = cdc) -> dict[bytes, int]:
            return {blake3.blake3(c.data).digest(): c.length for f in files for c in cdc.cut_buf(f)}

        t = time.perf_counter()
        base = ids(orig)
        speed = total / (time.perf_counter() - t) / 1e9
        shares = []
        for files in patterns.values():
            new = ids(files)
            shares.append(100 * sum(n for k, n in new.items() if k not in base) / total)
        print(f"{avg >> 10:>7} KiB {len(base) * (1 << 30) // total:>11} {speed:>6.1f}  "
              + "  ".join(f"{s:>13.2f}%" for s in shares))


if __name__ == "__main__":
    main()
