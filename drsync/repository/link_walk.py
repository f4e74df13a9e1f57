"""Symlinks followed through each other as the kernel follows them: which of a tree's links lead outside its root.

A link's own target may look inside (``a -> d/b/..``) and still leave the root through another link
(``d/b -> ..``). Only a link whose target *climbs* (a ``..`` component, empty, absolute, or holding a NUL)
can start an escape: a target that only descends leaves the root only through a link it passes that
leaves it, and where a link leads does not depend on who follows it. So :func:`escaping_in` resolves the
climbing links first, reading the targets of the links their walks pass through from the tree's rows
again (a few passes; nothing per link beyond an 8-byte hash of its path), and judges every other link only
when some climbing one leaves the root. Walks keep a stack of their own (a chain of any length is judged,
not a RecursionError) and no closures (what a call held is freed when it returns).

Pure: used by manifest validation, capture and the apply planner.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.repository.link_leaders import hashes_of, in_sorted

Rows = Callable[[], Iterable[pa.Table]]  # a tree's rows (columns path, type, target), read again at each call

_CLIMBS = r"(^|/)\.\.(/|$)|^/|^$|\x00"  # a target that can start an escape (see climbing_target)
_JUDGE = 1 << 14  # links judged at a time once some link escapes (each step of their walks is hashed)
_ROUNDS = 8  # passes over the rows for targets the climbing links' walks need, before all are held
_BUSY, _OUT, _LOOP, _IN, _BLOCKED = 1, 2, 3, 4, 5  # a walked link's state: being resolved, where it led, or
# waiting for a target not held yet (its walk stopped there: the next walk that reaches it stops at once)
_UNSET = object()  # a frame's walk goes on (no outcome yet)
_LOOPS = object()  # an outcome: the link resolves through itself (the kernel says ELOOP; nothing is reached)
_SYMLINK = "symlink"


def climbing_target(target: str | bytes) -> bool:
    """Whether a symlink target has a ``..`` component, or is empty, absolute or holds a NUL: only a set of
    links holding one can lead outside the root."""
    if isinstance(target, str):
        return not target or target.startswith("/") or "\x00" in target or ".." in target.split("/")
    return not target or target.startswith(b"/") or b"\x00" in target or b".." in target.split(b"/")


def may_escape(targets: pa.Array | pa.ChunkedArray) -> bool:
    """Whether any of ``targets`` (a symlink target column; a null counts as empty) climbs
    (:func:`climbing_target`): without one no set of links leaves the root."""
    if not len(targets):
        return False
    return bool(pc.any(_climbing_mask(targets)).as_py())


def _climbing_mask(targets: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pc.or_kleene(pc.match_substring_regex(targets, _CLIMBS), pc.is_null(targets))


def escaping_links(links: dict[str, str]) -> list[str]:
    """The links (path -> target, text) that resolve outside the root when followed as the kernel would,
    sorted. For a set small enough to hold as a dict; :func:`escaping_in` for a tree's rows."""
    if not any(climbing_target(t) for t in links.values()):
        return []
    walker = _Walker(links.get)
    for p in links:
        walker.resolve(p)
    return sorted(p for p, s in walker.state.items() if s == _OUT)


def escaping_in(rows: Rows, every: bool = True, outside: LeftOut | None = None) -> list[tuple[bytes, bytes]]:
    """The links among ``rows`` (columns path, type, target; text or binary; a null target counts as empty)
    that resolve outside the root, as (path, target) bytes sorted by path. ``every=False``: some of them,
    at least one when any does (enough to refuse a manifest). ``outside``: what a walk may reach that is not
    among ``rows`` (:class:`LeftOut`: links dropped by their text, paths the listing passed over).

    Holds an 8-byte hash per link, the climbing links and the links their walks pass through; ``rows`` is
    read again for those (one pass per step of the longest such chain, at most :data:`_ROUNDS`, then every
    link is held in columns). When some link escapes and ``every`` is asked, every link is held in columns
    (:class:`_LinkColumns`) and each whose walk meets another link is walked.

    When a walk met a link of ``outside``'s unwalked paths, the links are judged again without them (they
    are not among the rows, as a restore of the rows will not have them): ``t -> hidden/../..`` with
    ``hidden -> d/e`` stays inside on the tree, and leaves in the rows alone. Both answers are named."""
    out_of = outside if outside is not None else LeftOut()
    lazily = _escaping_lazily(rows, every, out_of)
    bad = lazily if lazily is not None else _escaping_held(rows, every, out_of)
    if not out_of.met_unwalked or (bad and not every):
        return bad
    gone = pa.array(sorted(p for p, _ in bad), pa.binary())
    alone = LeftOut(out_of.dropped)
    again = _escaping_lazily(_without_links(rows, gone), every, alone)
    if again is None:
        again = _escaping_held(_without_links(rows, gone), every, alone)
    return sorted(bad + again)


def _without_links(rows: Rows, gone: pa.Array) -> Rows:
    """``rows`` less the links at the paths ``gone`` (binary)."""
    def read() -> Iterable[pa.Table]:
        for t in rows():
            hit = pc.and_(pc.equal(t.column("type"), _SYMLINK),
                          pc.is_in(t.column("path").cast(pa.binary()), value_set=gone))
            yield t.filter(pc.invert(hit))
    return read


class LeftOut:
    """What a walk may reach that is not among a tree's rows (:func:`escaping_in`'s ``outside``).

    ``dropped``: the sorted ``hash()`` (int64) of the paths of links left out because they leave the root (a
    capture's links dropped by their text): a walk that reaches one leaves too (``b -> a``, ``a -> /etc``).
    ``unwalked``: the sorted hashes of paths the listing passed over (excluded paths, drsync's reserved
    staging name) that are directories or links: a walk at or below one asks ``read`` (a path relative to
    the root -> its link target, None when no link is there) what is there, as the kernel would find it.
    Without ``read`` they are taken for directories. The paths so answered (``reached``) are never among
    the links :func:`escaping_in` names. One instance serves one tree's judgement (what was read is kept)."""

    def __init__(self, dropped: np.ndarray | None = None, unwalked: np.ndarray | None = None,
                 read: Callable[[bytes], bytes | None] | None = None) -> None:
        empty = np.zeros(0, np.int64)
        self.dropped = dropped if dropped is not None else empty
        self.unwalked = unwalked if unwalked is not None and read is not None else empty
        self.read = read
        self.reached: set[bytes] = set()
        self.met_unwalked = False  # a walk found a link at or below an unwalked path
        self._read: dict[bytes, bytes | None] = {}

    def __bool__(self) -> bool:
        return bool(len(self.dropped) or len(self.unwalked))

    def has(self, hashes: np.ndarray) -> np.ndarray:
        """Which of ``hashes`` (int64 path hashes) may name a link not among the rows."""
        return in_sorted(self.dropped, hashes) | in_sorted(self.unwalked, hashes)

    def target_of(self, path: bytes, h: int | None = None) -> bytes | None:
        """The target of a link not among the rows at ``path`` (b"/" for a dropped one), or None."""
        if not self:
            return None
        if len(self.dropped) and in_sorted(self.dropped, np.array([hash(path) if h is None else h], np.int64))[0]:
            self.reached.add(path)
            return b"/"
        if not len(self.unwalked) or not self._below_unwalked(path):
            return None
        if path not in self._read:
            self._read[path] = self.read(path)  # type: ignore[misc]
        target = self._read[path]
        if target is not None:
            self.reached.add(path)
            self.met_unwalked = True
        return target

    def _below_unwalked(self, path: bytes) -> bool:
        return bool(in_sorted(self.unwalked, np.array([hash(p) for p in path_and_above(path)], np.int64)).any())


def path_and_above(path: bytes) -> list[bytes]:
    """``path`` and every directory above it (``a``, ``a/b``, ``a/b/c`` for ``a/b/c``), shortest first."""
    return [path[:i] for i, c in enumerate(path) if c == 0x2F] + [path]


def _escaping_lazily(rows: Rows, every: bool, outside: LeftOut) -> list[tuple[bytes, bytes]] | None:
    """:func:`escaping_in` from the climbing links and the links their walks pass through, or None when every
    link must be held: some link escapes and ``every`` is asked, or a chain needs more passes than allowed.
    With ``outside`` links, the links whose steps name one of them or another link are walked too."""
    hashes: list[np.ndarray] = []
    known: dict[bytes, bytes] = {}  # link -> target: the climbing ones, then those their walks pass through
    for paths, targets in _links(rows):
        hashes.append(hashes_of(paths))
        mask = _climbing_mask(targets)
        known.update(zip(paths.filter(mask).to_pylist(), targets.filter(mask).to_pylist(), strict=True))
    if not known and not outside:
        return []
    members = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.int64)
    del hashes
    if outside:  # a link that does not climb leaves through one of them, maybe through other links first
        for paths, targets in _links(rows):
            for start in range(0, len(paths), _JUDGE):
                ps, ts = paths.slice(start, _JUDGE).to_pylist(), targets.slice(start, _JUDGE).to_pylist()
                for k in _meeting(ps, ts, lambda h: outside.has(h) | in_sorted(members, h)):
                    known[ps[k]] = ts[k]
    if not known:
        return []
    climbing = list(known)
    absent: set[bytes] = set()  # paths whose hash is a link's, and which are not links

    def target_of(path: bytes) -> bytes | None:
        target = known.get(path)
        if target is not None:
            return target
        h = hash(path)
        if path in absent or not in_sorted(members, np.array([h], np.int64))[0]:
            return outside.target_of(path, h)
        raise _Unknown(path)

    walker = _Walker(target_of)
    todo = climbing
    for _ in range(_ROUNDS):
        wanted: set[bytes] = set()
        for p in todo:
            try:
                walker.resolve(p)
            except _Unknown as u:
                wanted.add(u.path)
        if not wanted:
            break
        found = _targets_of(rows, wanted)
        known.update(found)
        absent.update(wanted.difference(found))
        walker.unblock()
        todo = [p for p in todo if p not in walker.state]
    else:
        return None  # a chain longer than the passes allowed
    out = sorted(p for p, s in walker.state.items() if s == _OUT and p not in outside.reached)
    return None if out and every else [(p, known[p]) for p in out]


def _meeting(paths: list[bytes], targets: list[bytes], named: Callable[[np.ndarray], np.ndarray]) -> list[int]:
    """The indices of the links among ``paths`` (targets ``targets``) that do not climb and one of whose
    steps (its directory joined with each component of its target in turn) ``named`` says may be a link
    (a bool mask over step hashes). A link none of whose steps is a link leads where its text says."""
    steps: list[int] = []
    owner: list[int] = []
    for k, (path, target) in enumerate(zip(paths, targets, strict=True)):
        if climbing_target(target):
            continue
        cur = path.rpartition(b"/")[0]
        for comp in target.split(b"/"):
            if comp and comp != b".":
                cur = cur + b"/" + comp if cur else comp
                steps.append(hash(cur))
                owner.append(k)
    if not steps:
        return []
    hit = named(np.asarray(steps, dtype=np.int64))
    return np.unique(np.asarray(owner, dtype=np.int64)[hit]).tolist()


class _Unknown(Exception):
    """A walk reached a link whose target is not held yet (``path``): read, then walked again."""

    def __init__(self, path: bytes) -> None:
        super().__init__(path)
        self.path = path


class _Walker:
    """Links resolved through each other: ``target_of(path)`` gives a link's target (None: no link there; it
    may raise :class:`_Unknown`). ``state``: each walked link's outcome; ``dest``: where each link that a walk
    passed through leads, kept to be asked again (a walked link leading inside without one is walked again)."""

    def __init__(self, target_of: Callable[[bytes], bytes | None] | Callable[[str], str | None]) -> None:
        self.target_of = target_of
        self.state: dict[bytes, int] = {}
        self.dest: dict[bytes, tuple[bytes, ...]] = {}
        self.blocked: dict[bytes, bytes] = {}  # a link whose walk stopped -> the link whose target it waits for
        self.steps = 0  # components walked (each walk's cost: a chain is walked once, not once per link on it)

    def unblock(self) -> None:
        """Forget the walks that stopped (the targets they waited for are held now): they are walked again."""
        for p in self.blocked:
            del self.state[p]
        self.blocked.clear()

    def resolve(self, first: bytes) -> None:  # (or str throughout, for escaping_links)
        """Resolve link ``first`` unless walked already, and every link its walk passes through. On
        :class:`_Unknown` the links being walked are forgotten (those finished are kept) and it propagates."""
        s = self.state.get(first)
        if s == _BLOCKED:
            raise _Unknown(self.blocked[first])
        if s is not None:
            return
        state, dest, target_of = self.state, self.dest, self.target_of
        sep, dot, up, nul = (b"/", b".", b"..", b"\x00") if isinstance(first, bytes) else ("/", ".", "..", "\x00")
        stack: list[tuple[bytes, list[bytes], list[bytes], list[int]]] = []  # link, where its walk is, target, next
        pending: bytes | None = first
        done: tuple[bytes, ...] | object | None = _UNSET  # what the frame just finished resolved to
        try:
            while pending is not None or stack:
                if pending is not None:  # start resolving a link
                    target = target_of(pending)  # type: ignore[arg-type]
                    assert target is not None
                    state[pending] = _BUSY  # reaching it again before it is resolved is a loop
                    if not target or target.startswith(sep) or nul in target:  # type: ignore[arg-type, operator]
                        state[pending], done = _OUT, None
                    else:
                        stack.append((pending, pending.split(sep)[:-1], target.split(sep), [0]))  # type: ignore
                    pending = None
                    continue
                p, cur, comps, at = stack[-1]
                if done is not _UNSET:  # a link this walk passed through was resolved to ``done``
                    r, done = done, _UNSET
                    if r is None or r is _LOOPS:
                        state[p], done = (_OUT if r is None else _LOOP), r
                        stack.pop()
                        continue
                    cur[:] = r  # type: ignore[call-overload]
                result: tuple[bytes, ...] | object | None = _UNSET
                while at[0] < len(comps):
                    comp = comps[at[0]]
                    at[0] += 1
                    self.steps += 1
                    if not comp or comp == dot:
                        continue
                    if comp == up:
                        if not cur:
                            result = None
                            break
                        cur.pop()
                        continue
                    cur.append(comp)
                    key = sep.join(cur)  # type: ignore[arg-type]
                    s = state.get(key)
                    if s == _BLOCKED:
                        raise _Unknown(self.blocked[key])
                    if s is None or (s == _IN and key not in dest):
                        if s is None and target_of(key) is None:  # type: ignore[arg-type]
                            continue  # no link there
                        pending = key  # resolved first; this walk goes on from where it leads
                        break
                    if s == _IN:
                        cur[:] = dest[key]
                        continue
                    result = None if s == _OUT else _LOOPS  # left the root; or a loop (or back to a link walked)
                    break
                if pending is not None:
                    continue
                if result is _UNSET:
                    result = tuple(cur)
                stack.pop()
                if result is None or result is _LOOPS:
                    state[p] = _OUT if result is None else _LOOP
                else:
                    state[p] = _IN
                    if stack:  # passed through by the walk below it: where it leads is asked again
                        dest[p] = result  # type: ignore[assignment]
                done = result
        except _Unknown as u:
            for p, *_ in stack:  # each waits for the same target: a walk that reaches one stops there
                state[p], self.blocked[p] = _BLOCKED, u.path
            if pending is not None and state.get(pending) == _BUSY:
                del state[pending]
            raise


def _links(rows: Rows) -> Iterable[tuple[pa.Array, pa.Array]]:
    """The symlinks of ``rows``, a table at a time: (paths, targets) as binary arrays, a null target empty."""
    for t in rows():
        links = t.filter(pc.equal(t.column("type"), _SYMLINK))
        if links.num_rows:
            yield (links.column("path").cast(pa.binary()).combine_chunks(),
                   pc.fill_null(links.column("target").cast(pa.binary()), b"").combine_chunks())


def _targets_of(rows: Rows, wanted: set[bytes]) -> dict[bytes, bytes]:
    """The targets of the links among ``wanted`` paths (one pass over ``rows``)."""
    found: dict[bytes, bytes] = {}
    asked = pa.array(sorted(wanted), pa.binary())
    for paths, targets in _links(rows):
        hit = pc.is_in(paths, value_set=asked)
        found.update(zip(paths.filter(hit).to_pylist(), targets.filter(hit).to_pylist(), strict=True))
    return found


def _escaping_held(rows: Rows, every: bool, outside: LeftOut) -> list[tuple[bytes, bytes]]:
    """:func:`escaping_in` with every link held in columns: each climbing link is walked, and (``every``)
    each other one whose walk meets another link; one whose every step (its directory and each component
    of its target, which only descends) names no link leads where its text says, inside the root."""
    links = _LinkColumns(rows)

    def target_of(path: bytes) -> bytes | None:
        target = links.target_of(path)
        return target if target is not None else outside.target_of(path)

    walker = _Walker(target_of)
    for p in links.climbing():
        walker.resolve(p)
    if every and (outside or any(s == _OUT for s in walker.state.values())):
        for paths, targets in links.steps():
            for k in _meeting(paths, targets, lambda h: outside.has(h) | in_sorted(links.hashes, h)):
                walker.resolve(paths[k])
    out = sorted(p for p, s in walker.state.items() if s == _OUT and p not in outside.reached)
    return [(p, links.target_of(p) or b"") for p in out]


class _LinkColumns:
    """Every symlink of ``rows`` in Arrow columns (about ``len(path) + len(target) + 24`` bytes a link, no
    Python object per link), looked up by path through a sorted array of path hashes."""

    def __init__(self, rows: Rows) -> None:
        self._paths: list[pa.Array] = []
        self._targets: list[pa.Array] = []
        self._starts: list[int] = []  # the index of each chunk's first link
        self._climbing: list[pa.Array] = []
        hashes: list[np.ndarray] = []
        count = 0
        for paths, targets in _links(rows):
            hashes.append(hashes_of(paths))
            self._climbing.append(paths.filter(_climbing_mask(targets)))
            self._paths.append(paths)
            self._targets.append(targets)
            self._starts.append(count)
            count += len(paths)
        every = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        del hashes
        self._order = np.argsort(every, kind="stable")
        self._sorted = every[self._order]

    @property
    def hashes(self) -> np.ndarray:
        """Every link's path hash, sorted."""
        return self._sorted

    def climbing(self) -> list[bytes]:
        return [p for chunk in self._climbing for p in chunk.to_pylist()]

    def steps(self) -> Iterable[tuple[list[bytes], list[bytes]]]:
        """Every link's path and target, a step of :data:`_JUDGE` links at a time."""
        for paths, targets in zip(self._paths, self._targets, strict=True):
            for start in range(0, len(paths), _JUDGE):
                yield paths.slice(start, _JUDGE).to_pylist(), targets.slice(start, _JUDGE).to_pylist()

    def target_of(self, path: bytes) -> bytes | None:
        h = hash(path)
        at = int(np.searchsorted(self._sorted, h))
        while at < len(self._sorted) and self._sorted[at] == h:
            i = int(self._order[at])
            c = bisect.bisect_right(self._starts, i) - 1
            if self._paths[c][i - self._starts[c]].as_py() == path:
                return self._targets[c][i - self._starts[c]].as_py()
            at += 1
        return None
