"""A manifest's bytes gathered piece by piece and hashed as they come: :class:`Spool`.

A manifest of 1,000,000 files is about 74 MiB of Parquet, and the table decoded from it about 160
MiB. Holding both at once is what put a standby's commit and a primary's shipment over their memory
target, so a manifest that arrives (a Commit's pieces) or is copied out of a repository is gathered
into a spool: in memory up to :data:`SPOOL_MEMORY_BYTES`, past that in an unnamed local temporary
file whose pages are the page cache's, not the process's. It is hashed (BLAKE3) while it is written,
and what is decoded or stored afterwards is read back from the spool: exactly the bytes that were
hashed, never a second read of the source. A large manifest stored in a local repository is not copied:
its spool (:meth:`Spool.of_descriptor`) hashes the stored file through a descriptor and reads it back
through that same descriptor's file, whose bytes never change (stored objects are replaced by renames).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import weakref
from collections.abc import Iterator
from typing import BinaryIO

import blake3
import pyarrow as pa

from drsync.errors import IntegrityError
from drsync.storage import OffsetReader

# Bytes a spool keeps in memory; a larger one moves to a temporary file ($TMPDIR) as it grows.
SPOOL_MEMORY_BYTES = 16 << 20


class Spool:
    """Bytes written in pieces (:meth:`write`), hashed as written, then read back any number of times
    (:meth:`source` for a Parquet reader, :meth:`pieces` to store or send them). Close it (or use it
    as a context manager) to free the temporary file at once; it is freed with the object otherwise."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        self._limit = SPOOL_MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._buf: io.BytesIO | None = io.BytesIO()
        self._data: bytes | None = None  # an in-memory spool's bytes, once read
        self._file: BinaryIO | None = None
        self._read = False  # a file spool read from (source, pieces): written no more, as an in-memory one
        self._hasher = blake3.blake3()
        self._closed = False
        self._readers: list[weakref.ref[pa.NativeFile]] = []  # of the file, from source(): closed with it
        self.size = 0  # bytes written
        self._stamp: tuple[int, int, int] | None = None  # of a stored file's spool: see check_unchanged
        self._stored = False  # a spool of a stored file (of_descriptor, or a duplicate of one)

    @classmethod
    def of(cls, data: bytes) -> Spool:
        """A spool over bytes already in memory (kept as they are, not copied)."""
        s = cls()
        s._buf, s._data, s.size = None, data, len(data)
        s._hasher.update(data)
        return s

    @classmethod
    def of_descriptor(cls, fd: int, limit: int, piece: int = 4 << 20) -> Spool:
        """A spool over a stored file that drsync never rewrites in place (``fd``, read-only; the spool's from
        now on, closed with it, whatever raises): hashed by reading it once, at most ``limit + 1`` bytes (a
        larger file is refused by its size where it is decoded), then read back through that same file, not
        copied. At 1,000,000 files this spares a no-change cycle a 70 MiB copy on each side. Another program
        writing into the file in place meanwhile is found by :meth:`check_unchanged`, which a reader calls
        when it is done, before it trusts what it read."""
        try:
            s = cls()
            s._buf, s._read, s._stored = None, True, True
            s._file = open(fd, "rb", closefd=True)  # noqa: SIM115 (closed by close())
        except BaseException:
            os.close(fd)
            raise
        try:
            s._stamp = _stamp(os.fstat(fd), time.time_ns())  # before the bytes: a write while read moves it
            s._hasher, s.size = _hash_through(fd, limit, piece)
        except BaseException:
            s.close()
            raise
        return s

    def check_unchanged(self, what: str) -> None:
        """For a spool over a stored file (:meth:`of_descriptor`, or a :meth:`duplicate` of one): that the file
        still holds the bytes hashed. Its size, modification and change times are compared (an fstat);
        when they moved (a hard link made or removed moves the change time too) the file is hashed again.
        IntegrityError when its bytes changed: it was written in place, by something other than drsync,
        while drsync read it. Nothing to check for other spools (their bytes are their own). A stamp taken
        within 2 s of the file's last change is not trusted (filesystems that keep whole seconds): such a file
        is always hashed again. Not seen: a write undone before the check (the rows decoded meanwhile are not
        hashed again); only a program that can write the repository does that, and it could as well write a
        whole snapshot of its own (a manifest's hash is a checksum, not a signature)."""
        if not self._stored or self._file is None:
            return
        fd = self._file.fileno()  # ValueError once closed
        at = time.time_ns()
        st = os.fstat(fd)
        if self._stamp is not None and _stamp(st, None) == self._stamp:
            return
        hasher, size = _hash_through(fd, self.size)
        if size != self.size or hasher.hexdigest() != self._hasher.hexdigest():
            raise IntegrityError(f"{what} was written in place while drsync read it (by another program: drsync "
                                 f"replaces files, it never rewrites them); what was read from it is not trusted. "
                                 f"Find what writes into the repository, then run 'drsync repo verify'")
        self._stamp = _stamp(st, at)

    def duplicate(self) -> Spool | None:
        """Another spool of a file spool's bytes, hashed alike, through a descriptor of its own on the same file
        (no copy; closing either leaves the other), or None for an in-memory one. The file is written no more."""
        if self._file is None:
            return None
        self._file.flush()  # ValueError once closed
        self._read = True
        s = Spool()
        s._buf, s._read, s.size = None, True, self.size
        s._hasher, s._stamp, s._stored = self._hasher.copy(), self._stamp, self._stored
        s._file = open(os.dup(self._file.fileno()), "rb")  # noqa: SIM115 (closed by close())
        return s

    def file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of a file spool's file, None for an in-memory one: a spool of a stored file
        (:meth:`of_descriptor`, or a :meth:`duplicate` of one) has the stored file's."""
        if self._file is None or self._file.closed:
            return None
        st = os.fstat(self._file.fileno())
        return st.st_dev, st.st_ino

    def write(self, piece: bytes | bytearray | memoryview) -> None:
        if self._data is not None or self._read or self._closed:
            raise ValueError("a spool is written before it is read or closed")
        self._hasher.update(piece)
        self.size += len(piece)
        if self._file is not None:
            self._file.write(piece)
            return
        assert self._buf is not None
        self._buf.write(piece)
        if self.size > self._limit:  # past the limit: to an unnamed temporary file, and on from there
            self._file = tempfile.TemporaryFile(prefix="drsync-spool-")  # noqa: SIM115 (closed by close())
            self._file.write(self._buf.getbuffer())
            self._buf = None

    # A spool is a writable file to a writer that wants one (Parquet's: it asks for these three).
    @property
    def closed(self) -> bool:
        return self._closed or (self._file is not None and self._file.closed)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def hexdigest(self) -> str:
        """BLAKE3 of everything written, hex."""
        return self._hasher.hexdigest()

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def _bytes(self) -> bytes:
        if self._file is not None:
            self._file.flush()  # ValueError once closed
            raise AssertionError("a file spool has no bytes in memory")
        if self._closed:
            raise ValueError("the spool is closed")
        if self._data is None:
            assert self._buf is not None
            self._data = self._buf.getvalue()  # CPython hands the buffer over without a copy
            self._buf = None
        return self._data

    def source(self) -> bytes | pa.NativeFile:
        """What a Parquet reader decodes (``Manifest.from_bytes(data, what, size)``,
        ``ManifestFile``): the bytes of an in-memory spool, else a reader of the temporary file with a
        position of its own (several may be open at once)."""
        if self._file is None:
            return self._bytes()
        self._file.flush()  # ValueError once closed
        self._read = True
        try:  # a descriptor of the reader's own on the (unnamed) file: read by Arrow itself, no Python per read;
            # closed with the spool (a reader of a closed spool fails, as below)
            reader = pa.OSFile(f"/proc/self/fd/{self._file.fileno()}", mode="r")
            self._readers = [r for r in self._readers if r() is not None]  # those dropped are let go
            self._readers.append(weakref.ref(reader))
            return reader
        except OSError:  # no /proc
            pass
        file = self._file  # kept by the reader: the file lives as long as a reader does, and a closed one
        # fails (fileno raises) rather than reading whatever file reused its descriptor number
        return pa.PythonFile(OffsetReader(self.size, lambda at, n: os.pread(file.fileno(), n, at)), mode="r")

    def pieces(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The bytes in pieces of at most ``size`` (one empty piece for an empty spool)."""
        if self._file is None:
            data = self._bytes()
            for lo in range(0, max(1, len(data)), size):
                yield data[lo:lo + size]
            return
        self._file.flush()
        self._read = True
        for lo in range(0, max(1, self.size), size):
            yield os.pread(self._file.fileno(), min(size, self.size - lo), lo)

    def getvalue(self) -> bytes:
        """The whole content as bytes (for small spools and tests: a large one is read into memory)."""
        return self._bytes() if self._file is None else b"".join(self.pieces())

    def close(self) -> None:
        """Free the temporary file (a reader from :meth:`source` still open fails from now on), or let go
        of the bytes held in memory (a caller may still hold them)."""
        if self._file is not None:
            self._file.close()
            for ref in self._readers:
                reader = ref()
                if reader is not None:
                    reader.close()
            self._readers = []
        else:
            self._buf, self._data, self._closed = None, None, True

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hash_through(fd: int, limit: int, piece: int = 4 << 20) -> tuple[blake3.blake3, int]:
    """BLAKE3 of the file ``fd`` from its start, read at most ``limit + 1`` bytes (pieces of ``piece`` bytes),
    and how many bytes it read."""
    hasher, size = blake3.blake3(), 0
    while size <= limit and (got := os.pread(fd, min(piece, limit + 1 - size), size)):
        hasher.update(got)
        size += len(got)
    return hasher, size


# A file changed this recently when stamped may change again within its filesystem's time granularity (1 s on
# ext3 and some network filesystems, 2 s on FAT) without its times moving: its stamp is not trusted.
_RACY_NS = 2_000_000_000


def _stamp(st: os.stat_result, stamped_at_ns: int | None) -> tuple[int, int, int] | None:
    """(size, mtime, ctime) of a stored file, or None when they cannot vouch for it (``stamped_at_ns``: when
    it is taken, the wall clock; a change time that recent is "racy", as git calls it)."""
    if stamped_at_ns is not None and max(st.st_ctime_ns, st.st_mtime_ns) >= stamped_at_ns - _RACY_NS:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
