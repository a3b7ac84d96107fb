"""Slices: the named parts of the world, and the transactions that change them.

A slice is either a *value* (saved whole) or a *keyed collection* (id -> record,
saved per record). Handlers change slices only inside a transaction; a handler
that raises rolls its transaction back, so a failed action leaves the world
byte-identical. Every committed change is remembered as dirty so the saver
writes only what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from state.codec import canonical, clone

Migrate = Callable[[int, Any], Any]


@dataclass(frozen=True)
class SliceSpec:
    """What a plugin declares about one slice of the world.

    ``initial`` builds the empty value (a dict of records for keyed slices).
    ``migrate(old_version, value)`` upgrades a stored value to ``version``.
    ``defaults`` fills fields missing from a stored value (or from each record
    of a keyed slice), so data written by an older version still loads.
    """

    name: str
    initial: Callable[[], Any] = dict
    version: int = 1
    keyed: bool = False
    migrate: Migrate | None = None
    defaults: Mapping[str, Any] | None = None

    def fill_defaults(self, value: Any) -> Any:
        if not self.defaults:
            return value
        if self.keyed:
            return {k: _fill(r, self.defaults) for k, r in value.items()}
        return _fill(value, self.defaults)


def _fill(value: Any, defaults: Mapping[str, Any]) -> Any:
    if not isinstance(value, dict):
        return value
    missing = {k: clone(v) for k, v in defaults.items() if k not in value}
    return {**value, **missing} if missing else value


class ReadOnlyError(RuntimeError):
    """A read-only action tried to change the world."""


_DELETED = object()


class Transaction:
    """The action being applied: whether writes are allowed, and which slices took
    one, so that committing costs what the action touched, not the world's size."""

    __slots__ = ("open", "touched")

    def __init__(self) -> None:
        self.open = False
        self.touched: dict[KeyedSlice | ValueSlice, None] = {}  # in order of first write


class KeyedSlice:
    """A keyed collection seen through the current transaction.

    Records returned by reads are shared with the world: treat them as
    read-only. Use ``edit(key)`` for a private copy that is written back on
    commit, or ``put``/``delete``.
    """

    def __init__(self, spec: SliceSpec, records: dict[str, Any],
                 txn: Transaction | None = None) -> None:
        self.spec = spec
        self._base = records
        self._overlay: dict[str, Any] = {}
        self._replacement: dict[str, Any] | None = None
        self._txn = txn if txn is not None else Transaction()
        self.dirty: set[str] = set()
        self.replaced = False

    # reads -----------------------------------------------------------
    def _current(self) -> dict[str, Any]:
        return self._replacement if self._replacement is not None else self._base

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._overlay:
            value = self._overlay[key]
            return default if value is _DELETED else value
        return self._current().get(key, default)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _DELETED)
        if value is _DELETED:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, _DELETED) is not _DELETED  # type: ignore[arg-type]

    def keys(self) -> Iterator[str]:
        if not self._overlay:
            yield from list(self._current())
            return
        for key in self._current():
            if self._overlay.get(key) is not _DELETED:
                yield key
        for key, value in self._overlay.items():
            if value is not _DELETED and key not in self._current():
                yield key

    __iter__ = keys

    def items(self) -> Iterator[tuple[str, Any]]:
        if not self._overlay:
            yield from list(self._current().items())
            return
        for key in self.keys():
            yield key, self.get(key)

    def values(self) -> Iterator[Any]:
        for key in self.keys():
            yield self.get(key)

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # writes ----------------------------------------------------------
    def put(self, key: str, record: Any) -> None:
        _writing(self)
        self._overlay[key] = record

    def edit(self, key: str) -> Any:
        """A private copy of a record, saved back when the action succeeds."""
        _writing(self)
        if key in self._overlay and self._overlay[key] is not _DELETED:
            return self._overlay[key]
        record = clone(self[key])
        self._overlay[key] = record
        return record

    def delete(self, key: str) -> None:
        _writing(self)
        if key not in self:
            raise KeyError(key)
        self._overlay[key] = _DELETED

    def replace_all(self, records: dict[str, Any]) -> None:
        """Swap in a whole new collection (an import); saved as a full rewrite."""
        _writing(self)
        self._replacement = dict(records)
        self._overlay = {}

    # transaction -----------------------------------------------------
    def commit(self) -> None:
        if self._replacement is not None:
            self._base.clear()
            self._base.update(self._replacement)
            self.replaced = True
            self._replacement = None
        for key, value in self._overlay.items():
            if value is _DELETED:
                self._base.pop(key, None)
            else:
                self._base[key] = value
            self.dirty.add(key)
        self._overlay = {}

    def rollback(self) -> None:
        self._overlay = {}
        self._replacement = None

    @property
    def pending(self) -> bool:
        return bool(self._overlay) or self._replacement is not None

    @property
    def replacing(self) -> bool:
        """Whether this transaction replaced every record (``replace_all``)."""
        return self._replacement is not None

    def changes(self) -> Iterator[tuple[str, Any, Any]]:
        """What this transaction has changed so far, as ``(key, committed record,
        new record)``, None for an absent one: the cost of what it wrote (of every
        key, after ``replace_all``)."""
        base = self._base
        if self._replacement is None:
            keys: Iterable[str] = list(self._overlay)
        else:
            keys = list(base) + [k for k in self.keys() if k not in base]
        for key in keys:
            old, new = base.get(key), self.get(key)
            if old is not new:
                yield key, old, new

    def mark_unsaved(self) -> None:
        """The store does not hold this collection as it is: rewrite it all next save."""
        self.replaced = True

    def data(self) -> dict[str, Any]:
        """The committed records (the world as saved)."""
        return self._base


class ValueSlice:
    """A small value saved whole. ``value`` reads; ``edit()`` or ``set()`` writes."""

    def __init__(self, spec: SliceSpec, value: Any, txn: Transaction | None = None) -> None:
        self.spec = spec
        self._base = value
        self._new: Any = _DELETED
        self._txn = txn if txn is not None else Transaction()
        self.dirty = False

    @property
    def value(self) -> Any:
        return self._base if self._new is _DELETED else self._new

    def edit(self) -> Any:
        _writing(self)
        if self._new is _DELETED:
            self._new = clone(self._base)
        return self._new

    def set(self, value: Any) -> None:
        _writing(self)
        self._new = value

    def commit(self) -> None:
        if self._new is not _DELETED:
            self._base = self._new
            self._new = _DELETED
            self.dirty = True

    def rollback(self) -> None:
        self._new = _DELETED

    @property
    def pending(self) -> bool:
        return self._new is not _DELETED

    def mark_unsaved(self) -> None:
        """The store does not hold this value as it is: write it next save."""
        self.dirty = True

    def data(self) -> Any:
        return self._base


Slice = KeyedSlice | ValueSlice


def _writing(s: Slice) -> None:
    """Called before each write: refused outside a transaction, noted inside one."""
    txn = s._txn
    if not txn.open:
        raise ReadOnlyError(f"slice {s.spec.name!r} is read-only here")
    txn.touched[s] = None


@dataclass
class Slices:
    """Every slice, by name, and the transaction that spans them."""

    slices: dict[str, Slice] = field(default_factory=dict)
    replacements: int = 0  # commits that swapped a keyed collection wholesale (imports)
    txn: Transaction = field(default_factory=Transaction)

    @classmethod
    def fresh(cls, specs: list[SliceSpec]) -> Slices:
        world = cls()
        for spec in specs:
            world.add(spec, spec.initial())
        return world

    def add(self, spec: SliceSpec, value: Any) -> None:
        self.slices[spec.name] = (KeyedSlice(spec, value, self.txn) if spec.keyed
                                  else ValueSlice(spec, value, self.txn))

    def __getitem__(self, name: str) -> Slice:
        return self.slices[name]

    def begin(self) -> None:
        """Open a transaction: slices may be written until commit or rollback."""
        self.txn.open = True

    def commit(self) -> list[str]:
        """Apply the transaction; the names of the slices that changed."""
        changed = []
        for s in self.txn.touched:
            if s.pending:
                if isinstance(s, KeyedSlice) and s._replacement is not None:
                    self.replacements += 1
                s.commit()
                changed.append(s.spec.name)
        self._close()
        return changed

    def rollback(self) -> None:
        for s in self.txn.touched:
            s.rollback()
        self._close()

    def _close(self) -> None:
        self.txn.touched.clear()
        self.txn.open = False

    def snapshot(self, names: list[str] | None = None) -> dict[str, Any]:
        """Committed data of the named slices (all by default); shared, do not mutate."""
        chosen = names if names is not None else list(self.slices)
        return {n: self.slices[n].data() for n in chosen}

    def encode(self) -> bytes:
        """Canonical CBOR of the whole world: equal worlds give equal bytes."""
        return canonical(self.snapshot())
