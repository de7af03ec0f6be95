"""A worker's read cache: values it read, answered again without a round trip.

Used by the ``manager`` backend on a unix socket (``SHAREDSTATE_CLIENT_CACHE``
bytes per process; 0 turns it off). Each entry is what the state server said
about one key, read under its lock: the value (or that the key was absent),
the key's slot in the version table with that slot's version, the server's
instance id, and the key's expiry deadline. A later read is answered from the
entry only while all of these hold:

* the table's instance id is the entry's (a restarted or replaced server, a
  stopped one, or a ``clear``, changes it);
* the table's heartbeat is younger than
  :data:`~flask_sharedstate.server.versions.HEARTBEAT_BOUND` (a dead or stopped
  server is noticed within it);
* the slot still holds the entry's version (the server bumps it, under its
  lock, before it acknowledges any change to the key);
* the deadline has not passed, on the same system-wide monotonic clock the
  server expires keys by.

So a read that starts after a change was acknowledged never gets the value from
before it. Anything else is a round trip (``read_versioned``), which refills
the entry. The table is only ever compared with: a damaged, foreign or missing
table costs round trips, never a wrong value. Every read is a fresh copy: immutable
values (str, bytes, numbers, None) are kept as themselves; a plain dict, list
or set of such values is kept and copied (shallow is enough); anything else is
kept as its pickle and unpickled on every read. Least recently used entries go first;
values over the size bound are never kept. Atomic blocks never read through
here (``atomic.py`` uses ``txn_read``).
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import time
from collections import OrderedDict
from functools import partial
from pickle import loads
from typing import Any

from ..errors import SharedStateError
from ..server import versions
from .base import Backend, check_request

monotonic = time.monotonic

#: Marks an absent key in an entry (and is what reads of one return).
ABSENT: Any = object()
#: Marks, in an entry, a value kept as its pickle.
_PICKLED: Any = object()

#: Kept as themselves (no copy needed): values of these types cannot be changed.
_IMMUTABLE = (str, bytes, int, float, bool, type(None))
_SCALARS = frozenset(_IMMUTABLE)
#: A flat container longer than this is kept as its pickle (checking it costs at each fill).
FLAT_ITEMS = 4096


def _flat_copy(obj: Any) -> Any:
    """``obj.copy`` when a shallow copy of ``obj`` is a fresh copy, else None.

    True of a plain dict, list or set whose keys and items are all of the immutable
    types: what a flag set, a settings dict or a list of ids usually is. Copying it
    costs a tenth of unpickling it.
    """
    kind = type(obj)
    if kind not in (dict, list, set) or len(obj) > FLAT_ITEMS:
        return None
    scalars = _SCALARS
    if kind is dict:
        if all(type(k) in scalars for k in obj) and all(type(v) in scalars for v in obj.values()):
            return obj.copy
    elif all(type(v) in scalars for v in obj):
        return obj.copy
    return None


#: What an entry costs beyond its key and value: the tuple, the list slot, the dict's.
ENTRY_OVERHEAD = 200

#: A process reports its counts (for ``flask sharedstate status``) at most once every
#: REPORT_INTERVAL seconds: with a miss, or by a call of its own at a hit.
REPORT_INTERVAL = 1.0

#: A table found missing or not matching the server is looked for again at most this often.
REOPEN_INTERVAL = 1.0

_INSTANCE = versions.INSTANCE_WORD
_HEARTBEAT = versions.HEARTBEAT_WORD
_BOUND = versions.HEARTBEAT_BOUND

# An entry: (value or ABSENT, what makes the caller's copy or None (the value is handed out
# itself), slot, version, instance, deadline or None, size). The maker is the pickle's loads,
# or a flat container's own copy method.


class _Table:
    """A worker's read-only mapping of the version table, checked once when opened."""

    __slots__ = ("words", "floats", "slots", "_map")

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.getuid()
                or info.st_mode & 0o077
                or info.st_size < versions.table_size(1)
            ):
                raise OSError(f"{path} is not a version table of this user's")
            header = os.pread(fd, versions.HEADER_WORDS * 8, 0)
            words = memoryview(header).cast("Q")
            slots = words[versions.SLOTS_WORD]
            if (
                words[versions.MAGIC_WORD] != versions.MAGIC
                or words[versions.LAYOUT_WORD] != versions.LAYOUT
                or slots < 1
                or slots & (slots - 1)
                or info.st_size < versions.table_size(slots)
            ):
                raise OSError(f"{path} is not a version table of this layout")
            self._map = mmap.mmap(fd, versions.table_size(slots), mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.slots = slots
        self.words = memoryview(self._map).cast("Q")
        self.floats = memoryview(self._map).cast("d")


class ReadCache:
    """One process's cache of one app's values (shared by its threads)."""

    def __init__(self, backend: Backend, path: str, capacity: int, max_value: int) -> None:
        self._backend = backend
        self.path = path
        self.capacity = capacity
        self.max_value = max_value
        self._entries: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        # Its methods a hit calls, bound once: looking them up cost a twentieth of a hit.
        self._entry = self._entries.get
        self._to_end = self._entries.move_to_end
        #: the key a hit moved to the end last, or None (an entry went in after it): a hit
        #: of it again moves nothing. Threads hitting at once may leave it wrong: then one
        #: key is a little less recent than it should be, which bounds nothing.
        self._recent: str | None = None
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._report_due = 0.0
        self._lock = threading.Lock()  # for filling and evicting; hits take no lock
        self._table: _Table | None = None
        self._words: Any = None
        self._floats: Any = None
        self._next_open = 0.0
        self._pid = os.getpid()

    # -- the hit path: as little as possible ------------------------------------------

    def get(self, key: str) -> Any:
        """The value of ``key`` (a fresh copy) or ABSENT; a round trip unless still valid."""
        # _valid, inlined: the call would cost a tenth of a hit. A local: an attribute
        # that is no method, called as one, costs a lookup of its class each time.
        lookup = self._entry
        entry = lookup(key)
        if entry is not None:
            value, make, slot, version, instance, deadline, _ = entry
            words = self._words
            if words[slot] == version and words[_INSTANCE] == instance:
                now = monotonic()
                if self._floats[_HEARTBEAT] > now - _BOUND and (deadline is None or deadline > now):
                    if key is not self._recent:  # else it is the most recent already
                        self._recent = key
                        try:
                            self._to_end(key)
                        except KeyError:  # evicted by another thread meanwhile: still valid
                            pass
                    self.hits += 1
                    if now >= self._report_due:
                        self._report()
                    return value if make is None else make()
        return self._fetch([key])[0]

    def contains(self, key: str) -> bool:
        """Whether ``key`` is present; a round trip unless still valid (never loads a value)."""
        entry = self._valid(key)
        if entry is not None:
            return entry[0] is not ABSENT
        return self._fetch([key], for_contains=True)[0] is not ABSENT

    def get_many(self, keys: list[str]) -> list[Any]:
        """The values of ``keys`` as of one instant, or ABSENT each."""
        if not keys:
            return []
        found = []
        for key in keys:
            entry = self._valid(key)
            if entry is None:
                return self._fetch(keys)
            found.append(entry)
        # Each was valid when checked; versions only grow, so one more look that finds
        # them all unchanged means they were all current together at ``now``, between
        # the looks (where none may have expired either).
        words = self._words
        now = monotonic()
        for entry in found:
            deadline = entry[5]
            if (
                words[entry[2]] != entry[3]
                or words[_INSTANCE] != entry[4]
                or (deadline is not None and deadline <= now)
            ):
                return self._fetch(keys)
        return [e[0] if e[1] is None else e[1]() for e in found]

    def _valid(self, key: str) -> tuple[Any, ...] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        words = self._words
        if words[entry[2]] != entry[3] or words[_INSTANCE] != entry[4]:
            return None
        now = monotonic()
        deadline = entry[5]
        if self._floats[_HEARTBEAT] <= now - _BOUND or (deadline is not None and deadline <= now):
            return None
        if key is not self._recent:
            self._recent = key
            try:
                self._to_end(key)
            except KeyError:
                pass
        self.hits += 1
        if now >= self._report_due:
            self._report()
        return entry

    # -- misses ------------------------------------------------------------------------

    def _fetch(self, keys: list[str], for_contains: bool = False) -> list[Any]:
        """Read ``keys`` from the server with their versions, keep what may be kept."""
        self.misses += len(keys)
        if self._pid != os.getpid():  # a forked child: its own counts, its own lock
            self._forked()
        limit = self.max_value if for_contains else versions.MAX_LIMIT
        report = None
        now = monotonic()
        if now >= self._report_due:  # at most once a second: it costs the server a little
            self._report_due = now + REPORT_INTERVAL
            report = (self._pid, self.hits, self.misses)
        if len(keys) > 1 or len(keys[0]) > 4096:  # a short key cannot be over the limit
            check_request("get_many()", (keys,))
        instance, entries = self._backend.call("read_versioned", keys, limit, report)
        values = []
        keep = []  # (key, entry) for the cache
        entry: tuple[Any, ...]
        for key, (kind, value, slot, version, deadline) in zip(keys, entries, strict=True):
            if kind == 1:
                if type(value) is bytes:
                    obj = loads(value)
                    if type(obj) in _IMMUTABLE:  # kept as itself (counted twice)
                        size = 2 * len(value)
                        entry = (obj, None, slot, version, instance, deadline, size)
                    elif (copy := _flat_copy(obj)) is not None:  # kept, handed out as copies
                        size = 2 * len(value)
                        entry = (obj, copy, slot, version, instance, deadline, size)
                        obj = copy()  # the caller's own: the kept one is never handed out
                    else:
                        size = len(value)
                        make = partial(loads, value)
                        entry = (_PICKLED, make, slot, version, instance, deadline, size)
                else:  # a number, stored as itself: an int may be any length
                    obj = value
                    size = 8 if type(value) is float else 8 + value.bit_length() // 8
                    entry = (obj, None, slot, version, instance, deadline, size)
                values.append(obj)
            elif kind == 0:
                values.append(ABSENT)
                size = 0
                entry = (ABSENT, None, slot, version, instance, deadline, size)
            else:  # present, too large to be kept: the caller only asked whether it is there
                values.append(True)
                continue
            keep.append((key, entry))
        if instance and keep:
            self._fill(instance, keep)
        return values

    def _fill(self, instance: int, keep: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            words = self._words
            if words is None or words[_INSTANCE] != instance:
                self._reopen()
                words = self._words
                if words is None or words[_INSTANCE] != instance:
                    return  # no table of that server's here: nothing may be kept
            end = versions.HEADER_WORDS + self._table.slots  # type: ignore[union-attr]
            entries, max_value = self._entries, self.max_value
            self._recent = None  # what goes in goes after it
            for key, entry in keep:
                old = entries.pop(key, None)
                if old is not None:
                    self.size -= old[6]
                size = entry[6]
                if size > max_value or not versions.HEADER_WORDS <= entry[2] < end:
                    continue  # never kept (and a slot outside the table is not believed)
                size += len(key) + ENTRY_OVERHEAD
                entries[key] = entry[:6] + (size,)
                self.size += size
            while self.size > self.capacity and entries:
                _, old = entries.popitem(last=False)
                self.size -= old[6]

    def _reopen(self) -> None:
        """Map the table (again): at most once every REOPEN_INTERVAL."""
        now = monotonic()
        if now < self._next_open:
            return
        self._next_open = now + REOPEN_INTERVAL
        try:
            table = _Table(self.path)
        except (OSError, ValueError):
            return  # round trips until it is there and sound
        self._entries.clear()  # they were checked against the old table
        self.size = 0
        self._recent = None
        self._table, self._words, self._floats = table, table.words, table.floats

    def _report(self) -> None:
        """Tell the server this process's counts (for ``status``); never fails a read."""
        if self._pid != os.getpid():  # a forked child's first hit: not the parent's counts
            self._forked()
        self._report_due = monotonic() + REPORT_INTERVAL
        try:
            self._backend.call("read_versioned", [], 0, (os.getpid(), self.hits, self.misses))
        except (SharedStateError, OSError):
            pass

    def _forked(self) -> None:
        # The entries stay valid (the table is the same file); the counts are the parent's.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self._report_due = 0.0

    def clear(self) -> None:
        """Drop every entry (the counts stay)."""
        with self._lock:
            self._entries.clear()
            self.size = 0
            self._recent = None

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self._entries),
            "size": self.size,
        }
