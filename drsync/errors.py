"""The error hierarchy. Every error an operator can meet carries its exit code.

Exit codes are a contract (DESIGN.md): 0 ok, 1 operation failed, 2 usage or
configuration error, 3 integrity error, 4 refused for safety. The command line
prints ``str(error)`` as one line; messages therefore name what is wrong and
what to do about it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_REFUSED = 4


class DrsyncError(Exception):
    """Base of all errors drsync reports to a human."""

    exit_code = EXIT_FAILED


class OperationFailed(DrsyncError):
    """The operation could not be done (I/O error, lock held, hook failed...)."""

    exit_code = EXIT_FAILED


class UsageError(DrsyncError):
    """Bad arguments, bad configuration, missing repository, wrong target."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """The configuration file is malformed, has an unknown key or a wrong type."""


class IntegrityError(DrsyncError):
    """Stored data does not match its hash, or a stored structure is malformed."""

    exit_code = EXIT_INTEGRITY


class DeltaRejected(IntegrityError):
    """A standby could not use a chunk sent as a delta (it cannot read a base: damage or an I/O error there,
    or the decoded chunk does not match its id). Nothing of that chunk was stored; the sender sends whole
    chunks instead. ``sent`` is set by the sender to what its upload had sent before (figures)."""

    sent: object = None


class ChunkDamaged(IntegrityError):
    """A chunk the index places in a pack could not be read from it whole and intact: the pack is missing or
    short there, or its bytes do not match the chunk's id. ``chunk_id`` (32 bytes) and ``pack_id`` name the
    index row to forget (:mod:`drsync.repository.repair`)."""

    def __init__(self, message: str, chunk_id: bytes, pack_id: str) -> None:
        super().__init__(message)
        self.chunk_id, self.pack_id = chunk_id, pack_id


class ChunksLost(IntegrityError):
    """A snapshot names chunks the repository does not hold, or holds in packs that are gone (a commit's
    check on a standby: its repository lost them, e.g. a pack deleted or lost with a disk, an index file
    gone). Nothing was committed. A standby forgets what it lost (:mod:`drsync.repository.repair`) and the
    sender negotiates every chunk of the snapshot again and sends what is missing. ``sent`` as
    :class:`DeltaRejected`'s."""

    sent: object = None


class ManifestNotHeld(IntegrityError):
    """A commit named the manifest of a snapshot instead of sending it, and the standby cannot read that
    snapshot's manifest (gone, damaged) or it is not the one the shipped document names. Nothing was
    committed; the sender sends the manifest's bytes."""


class RefusedError(DrsyncError):
    """Refused for safety: wrong cluster or release, fenced, too much lag."""

    exit_code = EXIT_REFUSED


class FencedError(RefusedError):
    """A shipment carries an epoch lower than the highest this agent has seen, or its sender may no longer
    act as primary (the fencing epoch of DESIGN.md)."""


class LockedError(OperationFailed):
    """The repository is locked by another process."""


class NotFound(UsageError):
    """A snapshot, backup or repository that was named does not exist."""
