"""The apply hold of a standby: what keeps shipments stored but not applied (safety rule 8).

The guards' hold (deletions, mass changes) and the operator's (``drsync apply --hold``), durable in
``state_dir/apply-hold.json`` (no file while nothing is held or flagged).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from drsync import documents, fsutil
from drsync.errors import IntegrityError


@dataclass
class ApplyHold:
    """What keeps a standby from applying shipments (state_dir/apply-hold.json; survives restarts).

    Two holds, independent of each other:

    * the deletion guard's: ``snapshot`` was shipped, stored, and not applied because it would remove
      too many of the applied snapshot's files (:func:`drsync.guard.deletion_guard`). The hold stays on
      that first snapshot while later shipments are stored and refused too, so that the snapshot an
      operator inspected is the one ``drsync apply --confirm`` applies; ``latest`` names the newest of
      them. It is lifted by that confirmation, or by a later shipment that passes the guard against the
      applied snapshot (production came back: nothing of concern is applied).
      The mass-change guard (:func:`drsync.guard.change_guard`, ``replication.on_mass_change = "hold"``)
      holds the same way, for a snapshot that rewrites the content of too many files (``changed``).
    * the operator's (``drsync apply --hold``, lifted by ``--resume``): every shipment is stored and
      refused, none applied.

    Not a hold: with ``replication.on_mass_change = "alert"``, a snapshot the mass-change guard flags is
    applied and named in ``flagged`` until an operator acknowledges it (``drsync apply --confirm ID``,
    or ``--resume``).
    """

    snapshot: str = ""  # the held snapshot ("" when the deletion guard holds nothing)
    captured_at: float = 0.0
    applied: str = ""  # the applied snapshot it was judged against
    held_at: float = 0.0
    files: int = 0  # files of the applied snapshot (non-directory entries; regular files for a mass change only)
    removed: int = 0  # of those, how many the held snapshot would remove
    message: str = ""  # the refusal, as the primary was told
    latest: str = ""  # the newest shipment stored and refused while held
    refused: int = 0  # shipments refused since the hold began
    operator_since: float = 0.0  # drsync apply --hold in force since (0: not)
    position: list[int] = field(default_factory=list)  # the held snapshot's [sender epoch, sender seq]
    latest_position: list[int] = field(default_factory=list)
    changed: int = 0  # files of the applied snapshot whose content the held snapshot rewrites (mass change)
    flagged: str = ""  # on_mass_change = "alert": an applied snapshot flagged as a mass change, not acknowledged
    flagged_message: str = ""

    @property
    def mass_change(self) -> bool:
        """A mass change awaits an operator: a snapshot held for it, or applied and flagged."""
        return bool((self.snapshot and self.changed) or self.flagged)

    @property
    def active(self) -> bool:
        return bool(self.snapshot or self.operator_since)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"held": self.active, "operator_hold": bool(self.operator_since),
                                "mass_change": self.mass_change}


# The type of each field of apply-hold.json (documents.typed).
_FIELD_TYPES: dict[str, type] = {
    name: {"str": str, "float": float, "int": int}.get(str(f.type), list)
    for name, f in ApplyHold.__dataclass_fields__.items()}


class HoldFile:
    """The durable :class:`ApplyHold` of a state directory; no file while nothing is held or flagged."""

    NAME = "apply-hold.json"

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, self.NAME)

    def load(self) -> ApplyHold:
        """The hold on record. IntegrityError (one line naming the file) when the file holds something else than
        drsync writes: a hold is never read as lifted, nor a field as another type (a string "false" is true)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return ApplyHold()
        try:
            doc = documents.typed_loads(data, _FIELD_TYPES, self.NAME)
            hold = ApplyHold(**{k: v for k, v in doc.items() if k in _FIELD_TYPES})
            for name in ("position", "latest_position"):
                if not all(isinstance(x, int) and not isinstance(x, bool) for x in getattr(hold, name)):
                    raise ValueError(f"{self.NAME}: {name} is not a list of integers")
        except ValueError as e:
            raise IntegrityError(f"apply hold file {self.path} is damaged ({e}); nothing is applied until it is "
                                 f"fixed by hand or restored from a copy") from None
        return hold

    def save(self, hold: ApplyHold) -> None:
        if hold.active or hold.flagged:
            fsutil.atomic_write(self.path, json.dumps(asdict(hold)).encode(), durable=True)
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsutil.fsync_dir(self.dir)
