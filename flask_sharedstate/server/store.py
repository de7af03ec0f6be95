"""The shared state itself: values, expiry, locks and atomic blocks.

One :class:`Store` holds any number of namespaces. Each client talks to it
through a :class:`Session`, which is also the owner of the locks and of the
atomic block it takes; :meth:`Session.close` releases them, so a client that
disconnects (or dies) never leaves a lock behind.

Every operation runs under one store-wide condition, so each is one atomic
step. Values are ``int``, ``float`` (which :meth:`Session.incr` adds to) or
``bytes`` (a pickle the store never opens).

Atomic blocks are pessimistic and run one at a time per namespace: the first
read of a block takes the namespace's transaction slot, every key the block
reads is *claimed*, and single-step writes by other sessions to a claimed key
wait until the block commits or aborts. That is what makes an ``incr``
racing an atomic block on the same key lose nothing, without ever re-running
the user's block.
"""

from __future__ import annotations

import io
import math
import pickle
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import AtomicBlockLost
from .catalogue import OPERATIONS as CATALOGUE
from .persistence import Journal, NoGlobals, Record
from .protocol import KEEP_TTL, MAX_SECONDS
from .versions import VersionTable

Value = int | float | bytes

#: The store's one clock: deadlines are on it, and turned into wall-clock
#: times only in journal records.
now = time.monotonic

#: The longest a write's reply waits for a compaction that has fallen behind.
COMPACTION_WAIT = 1.0

_ABSENT: Any = object()
#: How to undo one change: ("key", space, key, old value or _ABSENT, old deadline),
#: ("clear", space, old data, old deadlines) or ("default", space, key).
Undo = tuple[Any, ...]


class LockTimeout(Exception):
    """A lock, an atomic block or a write blocked by one waited too long."""


class WouldBlock(Exception):
    """The operation must wait (for a lock, or an atomic block) and has changed nothing.

    :meth:`Session.call` waits and tries again; the state server parks the
    request instead, and tries it again when something was released.
    """

    def __init__(self, timeout: float, what: str) -> None:
        super().__init__(what)
        self.timeout = timeout
        self.what = what

    def timed_out(self) -> LockTimeout:
        return LockTimeout(f"{self.what} waited {self.timeout:g}s")


class Namespace:
    """The state of one namespace."""

    __slots__ = (
        "name",
        "data",
        "deadlines",
        "locks",
        "txn_owner",
        "txn_keys",
        "applied_defaults",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Value] = {}
        #: key -> monotonic deadline, only for keys with a time to live
        self.deadlines: dict[str, float] = {}
        #: lock name -> owning session
        self.locks: dict[str, Session] = {}
        self.txn_owner: Session | None = None
        self.txn_keys: set[str] = set()
        #: default keys already set once, so a deleted default stays deleted
        self.applied_defaults: set[str] = set()

    def drop_expired(self, now: float, versions: VersionTable | None) -> int:
        """Remove every key whose deadline has passed; return how many."""
        if not self.deadlines:
            return 0
        expired = [k for k, d in self.deadlines.items() if d <= now]
        for key in expired:
            del self.deadlines[key]
            del self.data[key]
            if versions is not None:
                versions.bump(self.name, key)
        return len(expired)


class Store:
    """All namespaces of one state server (or of one process, for ``memory``)."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.namespaces: dict[str, Namespace] = {}
        self.sessions = 0
        self._serial = 0
        #: bumped whenever a lock or an atomic block is let go: a waiter parked by the
        #: state server may now go on
        self.released = 0
        #: where changes go before an operation's reply, when persistence is on
        self.journal = journal
        #: the operation under way: how to undo each of its changes, and their records
        self._undo: list[Undo] = []
        self._records: list[Record] = []
        #: the version table the workers' read caches check (the state server's, on a
        #: unix socket), or None
        self.versions: VersionTable | None = None
        #: workers' read-cache counts as they last reported them: pid -> (hits, misses, when)
        self.cache_reports: dict[int, tuple[int, int, float]] = {}

    def _space(self, name: str) -> Namespace:
        space = self.namespaces.get(name)
        if space is None:
            space = self.namespaces[name] = Namespace(name)
        return space

    def _wall_deadline(self, deadline: float | None) -> float | None:
        return None if deadline is None else time.time() + (deadline - now())

    # -- changes: the one place that makes, records, writes and undoes them ----------
    #
    # Every change to values, deadlines and applied defaults goes through put,
    # remove, clear and mark_default (with ``cond`` held), which remember how
    # to undo it and the journal record that says it. ``commit`` writes an
    # operation's records before its reply; if that fails, or the operation
    # raised, ``rollback`` undoes all of it: an operation is applied whole or
    # not at all. Locks and atomic-block slots are not changes: never journaled,
    # never undone. One list serves every session: ``cond`` is held from an
    # operation's first change to its commit or rollback.
    #
    # Each change also bumps the key's slot in the version table, here, before
    # the reply: a worker's cached copy of the key stops being valid before any
    # process can hear that the change was made. (A rollback leaves the bump:
    # it costs a round trip, never a wrong value.)

    def put(self, space: Namespace, key: str, value: Value, ttl: float | None | str) -> None:
        """Set ``key``; ``ttl`` is seconds, None (no expiry) or KEEP_TTL."""
        data, deadlines = space.data, space.deadlines
        self._undo.append(("key", space, key, data.get(key, _ABSENT), deadlines.get(key)))
        if self.versions is not None:
            self.versions.bump(space.name, key)
        data[key] = value
        if ttl is None:
            deadlines.pop(key, None)
        elif ttl != KEEP_TTL:
            deadlines[key] = now() + ttl  # type: ignore[operator]
        if self.journal is not None:
            deadline = self._wall_deadline(deadlines.get(key))
            self._records.append(("put", space.name, key, value, deadline))

    def remove(self, space: Namespace, key: str) -> bool:
        data = space.data
        if key not in data:
            return False
        if self.versions is not None:
            self.versions.bump(space.name, key)
        self._undo.append(("key", space, key, data.pop(key), space.deadlines.pop(key, None)))
        if self.journal is not None:
            self._records.append(("del", space.name, key))
        return True

    def clear(self, space: Namespace) -> None:
        self._undo.append(("clear", space, space.data, space.deadlines))
        if self.versions is not None:
            self.versions.renew()  # every cached value of every worker, at once
        space.data, space.deadlines = {}, {}
        if self.journal is not None:
            self._records.append(("clear", space.name))

    def mark_default(self, space: Namespace, key: str) -> None:
        """Remember that default ``key`` was applied, so that it is never applied again."""
        if key not in space.applied_defaults:
            space.applied_defaults.add(key)
            self._undo.append(("default", space, key))
            if self.journal is not None:
                self._records.append(("default", space.name, key))

    def commit(self) -> None:
        """Write the operation's changes to the journal; undo them all if that fails."""
        records, self._records = self._records, []
        journal = self.journal
        if records and journal is not None:
            try:
                journal.append(records)
            except BaseException:
                self.rollback()
                raise
        self._undo.clear()  # before any wait: other operations run meanwhile
        if journal is not None and journal.behind():
            # A writer faster than the compaction would grow the file without
            # bound: the reply waits (a little) for the compaction to finish.
            self.cond.wait_for(lambda: not journal.behind(), COMPACTION_WAIT)

    def rollback(self) -> None:
        """Undo the changes of the operation under way, newest first."""
        undo, self._undo = self._undo, []
        self._records.clear()
        for change in reversed(undo):
            kind, space = change[0], change[1]
            if kind == "key":
                _, _, key, value, deadline = change
                if value is _ABSENT:
                    space.data.pop(key, None)
                else:
                    space.data[key] = value
                if deadline is None:
                    space.deadlines.pop(key, None)
                else:
                    space.deadlines[key] = deadline
            elif kind == "clear":
                space.data, space.deadlines = change[2], change[3]
            else:
                space.applied_defaults.discard(change[2])

    def restore(self, records: Iterable[Record]) -> int:
        """Replay journal records into an empty store; return how many keys it holds."""
        now_wall, now_store = time.time(), now()
        with self.cond:
            for record in records:
                kind, space = record[0], self._space(record[1])
                if kind == "put":
                    _, _, key, value, deadline = record
                    if deadline is not None and deadline <= now_wall:
                        space.data.pop(key, None)
                        space.deadlines.pop(key, None)
                        continue
                    space.data[key] = value
                    if deadline is None:
                        space.deadlines.pop(key, None)
                    else:
                        space.deadlines[key] = now_store + (deadline - now_wall)
                elif kind == "del":
                    space.data.pop(record[2], None)
                    space.deadlines.pop(record[2], None)
                elif kind == "clear":
                    space.data.clear()
                    space.deadlines.clear()
                elif kind == "default":
                    space.applied_defaults.add(record[2])
            return sum(len(s.data) for s in self.namespaces.values())

    def snapshot(self) -> list[Record]:
        """The whole state as journal records (call with ``cond`` held: it is a copy)."""
        records: list[Record] = []
        for space in self.namespaces.values():
            name, deadlines = space.name, space.deadlines
            for key, value in space.data.items():
                records.append(("put", name, key, value, self._wall_deadline(deadlines.get(key))))
            records.extend(("default", name, key) for key in space.applied_defaults)
        return records

    def session(self, namespace: str, wait_timeout: float) -> Session:
        with self.cond:
            space = self._space(namespace)
            self.sessions += 1
            self._serial += 1
            serial = self._serial
        return Session(self, space, wait_timeout, serial)

    def sweep(self) -> int:
        """Drop every expired key now; return how many. Called periodically."""
        with self.cond:
            versions = self.versions
            return sum(space.drop_expired(now(), versions) for space in self.namespaces.values())


def _check_key(key: object) -> str:
    if type(key) is not str:
        raise TypeError(f"keys must be str, not {type(key).__name__}")
    return key


def _check_ttl(ttl: object) -> float | None:
    """As ``operations.check_ttl`` (which clients apply first): None, or 0 < ttl <= MAX_SECONDS."""
    if ttl is None:
        return None
    if type(ttl) not in (int, float) or not 0 < ttl <= MAX_SECONDS:  # type: ignore[operator]
        raise ValueError(
            f"ttl must be seconds above 0 and at most {MAX_SECONDS:g}, or None, not {ttl!r}"
        )
    return float(ttl)  # type: ignore[arg-type]


def _check_count(name: str, value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
    return value


def _check_value(key: str, value: object) -> Value:
    if type(value) not in (int, float, bytes):
        raise TypeError(f"value for key {key!r} must be int, float or pickled bytes")
    return value  # type: ignore[return-value]


class Session:
    """One client's view of a namespace; owner of its locks and atomic block.

    Methods named in :data:`OPERATIONS` are the wire operations.
    """

    def __init__(self, store: Store, space: Namespace, wait_timeout: float, serial: int) -> None:
        #: unique within the store: tells an atomic block that its session changed
        self.id = serial
        self.store = store
        self.space = space
        self.wait_timeout = wait_timeout
        self.closed = False
        #: how many locks this session holds
        self.held = 0

    # -- helpers, called with store.cond held -------------------------------

    def _alive(self, key: str) -> bool:
        space = self.space
        if key not in space.data:
            return False
        deadline = space.deadlines.get(key)
        if deadline is not None and deadline <= now():
            del space.data[key]
            del space.deadlines[key]
            if self.store.versions is not None:
                self.store.versions.bump(space.name, key)
            return False
        return True

    def _purge(self) -> None:
        self.space.drop_expired(now(), self.store.versions)

    def _wait(self, blocked: Callable[[], bool], timeout: float, what: str) -> None:
        if blocked():
            raise WouldBlock(timeout, what)

    def _writable(self, keys: Iterable[str]) -> None:
        """Wait while another session's atomic block has claimed one of ``keys``."""
        space = self.space

        def blocked() -> bool:
            owner = space.txn_owner
            return owner is not None and owner is not self and not space.txn_keys.isdisjoint(keys)

        self._wait(blocked, self.wait_timeout, "a write to a key held by an atomic block")

    def _store(self, key: str, value: Value, ttl: float | None | str) -> None:
        self.store.put(self.space, key, value, ttl)

    def _remove(self, key: str) -> bool:
        return self.store.remove(self.space, key)

    def holds_nothing(self) -> bool:
        """Whether this session holds no lock and no atomic block (so may be let go)."""
        return not self.held and self.space.txn_owner is not self

    def attempt(self, op: str, args: tuple[Any, ...]) -> Any:
        """Run one operation as one atomic step, or raise :exc:`WouldBlock` having
        changed nothing: the state server parks it and tries again when something
        is released (:attr:`Store.released`)."""
        method = OPERATIONS.get(op)
        if method is None:
            raise ValueError(f"unknown operation {op!r}")
        store = self.store
        with store.cond:
            try:
                result = method(self, *args)
            except BaseException:
                store.rollback()
                raise
            store.commit()
            return result

    def call(self, op: str, args: tuple[Any, ...]) -> Any:
        """Run one operation as one atomic step, waiting (in this thread) where it must.

        Its changes are in the journal (in the OS's hands, or synced) before it
        returns; if they cannot be written, or it raises, none of them stays.
        """
        method = OPERATIONS.get(op)
        if method is None:
            raise ValueError(f"unknown operation {op!r}")
        deadline = None
        store = self.store
        with store.cond:
            while True:
                try:
                    result = method(self, *args)
                except WouldBlock as blocked:
                    store.rollback()
                    current = now()
                    if deadline is None:
                        deadline = current + blocked.timeout
                    if current >= deadline:
                        raise blocked.timed_out() from None
                    store.cond.wait(deadline - current)
                    continue
                except BaseException:
                    store.rollback()
                    raise
                store.commit()
                return result

    # -- the read cache's read (the state server's own operation) ---------------

    def read_versioned(
        self, keys: list[str], limit: int, report: tuple[int, int, int] | None = None
    ) -> tuple[int, list[tuple[Any, ...]]]:
        """Read ``keys`` for a worker's read cache, as one step.

        Returns the table's instance id and, per key, ``(kind, value, slot,
        version, deadline)``: kind 0 absent, 1 present (value), 2 present but
        larger than ``limit`` bytes (no value: the worker will not cache it).
        ``deadline`` is the key's expiry on the shared monotonic clock, or None.
        ``report`` is the worker's ``(pid, hits, misses)``, for ``status``.
        Instance 0: there is no table (slots and versions 0); nothing may be cached.
        """
        store = self.store
        with store.cond:
            if report is not None:
                pid, hits, misses = report
                store.cache_reports[int(pid)] = (int(hits), int(misses), time.time())
            versions = store.versions
            space = self.space
            entries: list[tuple[Any, ...]] = []
            for key in keys:
                alive = self._alive(_check_key(key))  # an expired key's removal bumps
                slot, version = (0, 0) if versions is None else versions.version(space.name, key)
                if not alive:
                    entries.append((0, None, slot, version, None))
                    continue
                value = space.data[key]
                deadline = space.deadlines.get(key)
                if type(value) is bytes and len(value) > limit:
                    entries.append((2, None, slot, version, deadline))
                else:
                    entries.append((1, value, slot, version, deadline))
            return (0 if versions is None else versions.instance), entries

    # -- the operations ------------------------------------------------------

    def get(self, key: str) -> Value | None:
        return self.space.data[key] if self._alive(_check_key(key)) else None

    def contains(self, key: str) -> bool:
        return self._alive(_check_key(key))

    def get_many(self, keys: list[str]) -> list[Value | None]:
        return [self.get(key) for key in keys]

    def set(self, key: str, value: Value, ttl: float | None = None) -> None:
        key = _check_key(key)
        value = _check_value(key, value)
        ttl = _check_ttl(ttl)
        self._writable((key,))
        self._store(key, value, ttl)

    def set_many(self, items: list[tuple[str, Value]], ttl: float | None = None) -> None:
        items = [(_check_key(k), _check_value(k, v)) for k, v in items]
        ttl = _check_ttl(ttl)
        self._writable([k for k, _ in items])
        for key, value in items:
            self._store(key, value, ttl)

    def delete(self, key: str) -> bool:
        key = _check_key(key)
        self._writable((key,))
        return self._alive(key) and self._remove(key)

    def pop(self, key: str) -> Value | None:
        key = _check_key(key)
        self._writable((key,))
        if not self._alive(key):
            return None
        value = self.space.data[key]
        self._remove(key)
        return value

    def setdefault(self, key: str, value: Value, ttl: float | None = None) -> Value:
        key = _check_key(key)
        value = _check_value(key, value)
        ttl = _check_ttl(ttl)
        self._writable((key,))
        if self._alive(key):
            return self.space.data[key]
        self._store(key, value, ttl)
        return value

    def incr(self, key: str, delta: int | float = 1, ttl: float | None = None) -> int | float:
        """Add ``delta``; a key this call creates gets ``ttl``, an existing one keeps its own."""
        key = _check_key(key)
        if type(delta) not in (int, float):
            raise TypeError(f"incr delta must be int or float, not {type(delta).__name__}")
        ttl = _check_ttl(ttl)
        self._writable((key,))
        if self._alive(key):
            current = self.space.data[key]
            if type(current) not in (int, float):
                raise TypeError(f"cannot incr key {key!r}: its value is not an int or float")
            new = current + delta  # type: ignore[operator]
            self._store(key, new, KEEP_TTL)
        else:
            new = delta
            self._store(key, new, ttl)
        return new

    def compare_and_set(
        self, key: str, expected: Value, new: Value, ttl: float | None | str = KEEP_TTL
    ) -> bool:
        key = _check_key(key)
        new = _check_value(key, new)
        if ttl != KEEP_TTL:
            ttl = _check_ttl(ttl)
        self._writable((key,))
        if not self._alive(key):
            return False
        current = self.space.data[key]
        if type(current) is bytes or type(expected) is bytes:
            if type(current) is not type(expected) or current != expected:
                return False
        elif current != expected:
            return False
        self._store(key, new, ttl)
        return True

    def expire(self, key: str, seconds: float | None) -> bool:
        key = _check_key(key)
        ttl = _check_ttl(seconds)
        self._writable((key,))
        if not self._alive(key):
            return False
        self._store(key, self.space.data[key], ttl)
        return True

    def ttl(self, key: str) -> float | None:
        key = _check_key(key)
        if not self._alive(key):
            raise KeyError(key)
        deadline = self.space.deadlines.get(key)
        return None if deadline is None else max(0.0, deadline - now())

    def length(self) -> int:
        self._purge()
        return len(self.space.data)

    def keys(self) -> list[str]:
        self._purge()
        return list(self.space.data)

    def items(self) -> list[tuple[str, Value]]:
        self._purge()
        return list(self.space.data.items())

    def clear(self) -> None:
        self._writable(list(self.space.data))
        self.store.clear(self.space)

    def apply_defaults(self, items: list[tuple[str, Value]]) -> None:
        """Set each default key that this namespace has never had set as a default."""
        applied = self.space.applied_defaults
        fresh = [(k, v) for k, v in items if k not in applied]
        if not fresh:
            return
        checked = [(_check_key(k), _check_value(k, v)) for k, v in fresh]
        self._writable([k for k, _ in checked])
        for key, value in checked:
            self.store.mark_default(self.space, key)
            if not self._alive(key):
                self._store(key, value, None)

    # -- rate limits (limiter.py) ------------------------------------------------

    def window_acquire(self, key: str, limit: int, expiry: float, amount: int, now: float) -> bool:
        """A moving window's hit: record ``amount`` hits at ``now`` if the last ``expiry``
        seconds hold at most ``limit - amount``. The value is a pickled list of times,
        newest first (a plain list to readers); the store writes it and reads it back
        with an unpickler that refuses every global."""
        key = _check_key(key)
        ttl = _check_ttl(expiry)
        limit, amount = _check_count("limit", limit), _check_count("amount", amount)
        if type(now) not in (int, float):
            raise TypeError("window_acquire: now must be a number of seconds")
        self._writable((key,))
        entries: Any = []
        if self._alive(key):
            value = self.space.data[key]
            try:
                entries = NoGlobals(io.BytesIO(value)).load() if type(value) is bytes else None
            except Exception:  # noqa: BLE001 - not a window, whatever it is
                entries = None
            if type(entries) is not list or not all(type(t) is float for t in entries):
                raise TypeError(f"key {key!r} does not hold a moving window")
        fresh = [t for t in entries if t > now - expiry]
        if len(fresh) + amount > limit:
            return False
        hits = [float(now)] * amount + fresh
        self._store(key, pickle.dumps(hits, protocol=pickle.HIGHEST_PROTOCOL), ttl)
        return True

    def sliding_acquire(
        self, previous: str, current: str, limit: int, amount: int, weight: float, ttl: float
    ) -> bool:
        """A sliding-window counter's hit: add ``amount`` to ``current`` if
        ``floor(previous * weight + current) + amount <= limit``; a counter this call
        creates lives ``ttl`` seconds."""
        previous, current = _check_key(previous), _check_key(current)
        checked_ttl = _check_ttl(ttl)
        limit, amount = _check_count("limit", limit), _check_count("amount", amount)
        if type(weight) not in (int, float) or not 0 <= weight <= 1:
            raise ValueError("sliding_acquire: weight must be from 0 to 1")
        self._writable((current,))
        counts: list[int | float] = []
        for key in (previous, current):
            value = self.space.data[key] if self._alive(key) else 0
            if not isinstance(value, (int, float)):
                raise TypeError(f"key {key!r} does not hold a counter")
            counts.append(value)
        if math.floor(counts[0] * weight + counts[1]) + amount > limit:
            return False
        if self._alive(current):
            self._store(current, counts[1] + amount, KEEP_TTL)
        else:
            self._store(current, amount, checked_ttl)
        return True

    # -- locks -----------------------------------------------------------------

    def acquire(self, name: str, timeout: float) -> bool:
        """Take lock ``name``, waiting up to ``timeout`` seconds (0: do not wait)."""
        locks = self.space.locks
        owner = locks.get(name)
        if owner is self:
            raise RuntimeError(f"lock {name!r} is already held by this client; it is not reentrant")
        if owner is not None:
            if timeout <= 0:
                return False
            self._wait(lambda: name in locks, timeout, f"lock {name!r}")
        locks[name] = self
        self.held += 1
        return True

    def release(self, name: str) -> None:
        if self.space.locks.get(name) is not self:
            raise RuntimeError(f"lock {name!r} is not held by this client")
        del self.space.locks[name]
        self.held -= 1
        self.store.released += 1
        self.store.cond.notify_all()

    def extend(self, name: str, additional: float | None = None) -> bool:
        """Check that this session holds lock ``name``. Locks here have no lease to
        extend: they are held until released or until the session closes."""
        if self.space.locks.get(name) is not self:
            raise RuntimeError(f"lock {name!r} is not held by this client")
        return True

    def locked(self, name: str) -> bool:
        return name in self.space.locks

    # -- get_or_set's single flight ------------------------------------------------

    def get_or_claim(self, key: str, lock: str, timeout: float) -> tuple[bool, Value | None]:
        """``(True, value)`` if ``key`` is present, else take lock ``lock`` and answer
        ``(False, None)``; while another session holds it, wait (up to ``timeout``)
        for whichever comes first: the value, or the lock let go."""
        key = _check_key(key)
        if self._alive(key):
            return True, self.space.data[key]
        if self.acquire(lock, 0.0):
            return False, None
        raise WouldBlock(timeout, f"the value of {key!r} (lock {lock!r})")

    def fill(self, key: str, value: Value, ttl: float | None, lock: str) -> bool:
        """Store ``key`` and release lock ``lock``, as one step, only if this session
        still holds the lock; False (nothing written) if it does not."""
        key = _check_key(key)
        value = _check_value(key, value)
        ttl = _check_ttl(ttl)
        if self.space.locks.get(lock) is not self:
            return False
        self._writable((key,))
        self._store(key, value, ttl)
        self.release(lock)
        return True

    # -- atomic blocks ---------------------------------------------------------

    def _begin(self, timeout: float) -> None:
        space = self.space
        if space.txn_owner is self:
            return
        self._wait(lambda: space.txn_owner is not None, timeout, "an atomic block")
        space.txn_owner = self
        space.txn_keys = set()

    def _end(self) -> None:
        space = self.space
        if space.txn_owner is self:
            space.txn_owner = None
            space.txn_keys = set()
            self.store.released += 1
            self.store.cond.notify_all()

    def _check_block(self, session_id: int | None) -> None:
        if session_id is not None and (session_id != self.id or self.space.txn_owner is not self):
            raise AtomicBlockLost(
                "the atomic block lost its connection to the state server, and with it"
                " its claim on the keys it read; nothing of it was written. Run the block"
                " again."
            )

    def txn_read(
        self, keys: list[str], timeout: float, session_id: int | None = None
    ) -> tuple[int, list[Value | None]]:
        """Begin (or continue) this session's atomic block and claim ``keys``.

        Returns this session's id, which the block passes back on every later
        read and on commit, so that a block whose connection was replaced fails
        instead of committing without its claims.
        """
        keys = [_check_key(k) for k in keys]
        self._check_block(session_id)
        self._begin(timeout)
        self.space.txn_keys.update(keys)
        return self.id, [self.get(key) for key in keys]

    def txn_commit(
        self,
        writes: list[tuple[str, Value | None, float | None | str]],
        timeout: float,
        session_id: int | None = None,
    ) -> None:
        """Apply an atomic block's writes together and end the block.

        Each write is ``(key, value, ttl)``; a value of ``None`` deletes the key.
        A block that read nothing (``session_id`` None) takes the transaction
        slot here.
        """
        try:
            self._check_block(session_id)
            checked = []
            for key, value, ttl in writes:
                key = _check_key(key)
                if value is not None:
                    value = _check_value(key, value)
                if ttl != KEEP_TTL:
                    ttl = _check_ttl(ttl)
                checked.append((key, value, ttl))
            self._begin(timeout)
            for key, value, ttl in checked:
                if value is None:
                    self._remove(key)
                else:
                    self._store(key, value, ttl)
        finally:
            self._end()

    def txn_abort(self) -> None:
        self._end()

    def close(self) -> None:
        """Release every lock and the atomic block this session holds."""
        with self.store.cond:
            if self.closed:
                return
            self.closed = True
            self.store.sessions -= 1
            locks = self.space.locks
            if self.held:
                for name in [n for n, owner in locks.items() if owner is self]:
                    del locks[name]
                self.held = 0
                self.store.released += 1
            self._end()
            self.store.cond.notify_all()


#: The wire operations: every entry of the catalogue, as a method of Session.
OPERATIONS: dict[str, Callable[..., Any]] = {name: getattr(Session, name) for name in CATALOGUE}
