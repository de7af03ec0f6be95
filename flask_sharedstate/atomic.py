"""The transaction behind ``shared.atomic``; it works on any backend.

A block's first read takes the namespace's transaction slot in the store and
claims the keys read; later reads claim more. Values read are the block's own
objects: nested edits to them, plain writes, deletes and ``incr`` stay local.
On a normal exit every changed key is sent in one ``txn_commit``, which the
store applies in one step; on an exception ``txn_abort`` drops them all.
While the block runs, other sessions' writes to the claimed keys wait, so
nothing written between our read and our commit can be lost, and the user's
block never has to run twice.

The store's session id, returned by the first read, goes with every later
read and the commit: a block whose connection was replaced in between (the
server restarted, say) fails instead of committing without its claims.

A nested block is a *savepoint* of the outer one: if it raises, the block's
values and ttls go back to what they were when it began (its reads and
claims stay), and the outer block goes on from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .backends.base import Backend, check_key, check_request, pack
from .backends.base import unpack as _unpack
from .operations import MISSING, Operations, check_delta, check_ttl
from .server.protocol import KEEP_TTL


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


#: What a savepoint keeps: key -> (the value object, its pickle or MISSING), and the ttls.
Savepoint = tuple[dict[str, tuple[Any, Any]], dict[str, Any]]


def _pickled(key: str, value: Any) -> Any:
    """The value's pickle now, or None if it has become one that cannot be stored."""
    try:
        return pack(key, value)
    except (TypeError, ValueError):
        return None


class Transaction(Operations):
    """One atomic block, bound to one thread (or task) and one backend."""

    def __init__(self, backend: Backend, timeout: float) -> None:
        self.backend = backend
        self.timeout = timeout
        self.session_id: int | None = None
        #: key -> the packed value as read (None: absent), for keys read
        self._original: dict[str, Any] = {}
        #: key -> the block's current value (MISSING: absent), for keys read or written
        self._values: dict[str, Any] = {}
        #: key -> ttl to commit with (KEEP_TTL, None or seconds), for keys written
        self._ttls: dict[str, Any] = {}

    # -- reading -----------------------------------------------------------------

    def _load(self, keys: Iterable[str]) -> None:
        wanted = [check_key(k) for k in keys if k not in self._values]
        if not wanted:
            return
        check_request("an atomic block's read", wanted)
        session_id, packed = self.backend.call("txn_read", wanted, self.timeout, self.session_id)
        self.session_id = session_id
        for key, value in zip(wanted, packed, strict=True):
            self._original[key] = value
            self._values[key] = MISSING if value is None else _unpack(value)

    def get(self, key: str) -> Any:
        self._load((key,))
        return self._values[key]

    def get_many(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        self._load(keys)
        return [self._values[k] for k in keys]

    def contains(self, key: str) -> bool:
        return self.get(key) is not MISSING

    def ttl(self, key: str) -> float | None:
        if self.get(key) is MISSING:
            raise KeyError(key)
        spec = self._ttls.get(key, KEEP_TTL)
        if spec == KEEP_TTL:
            if self._original.get(key) is None:
                return None  # created in this block
            return self.backend.call("ttl", key)  # type: ignore[no-any-return]
        return spec  # type: ignore[no-any-return]

    def keys(self) -> list[str]:
        present = [k for k in self.backend.call("keys") if self._values.get(k) is not MISSING]
        seen = set(present)
        present += [k for k, v in self._values.items() if v is not MISSING and k not in seen]
        return present

    def length(self) -> int:
        return len(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        keys = self.keys()
        return list(zip(keys, self.get_many(keys), strict=True))

    # -- writing -------------------------------------------------------------------

    def _write(self, key: str, value: Any, ttl: Any) -> None:
        self._values[key] = value
        self._ttls[key] = ttl

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        pack(check_key(key), value)  # refuse a bad value now, not at commit
        self._write(key, value, check_ttl(ttl))

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> None:
        ttl = check_ttl(ttl)
        for key, value in items.items():
            pack(check_key(key), value)
        for key, value in items.items():
            self._write(key, value, ttl)

    def delete(self, key: str) -> bool:
        existed = self.get(key) is not MISSING
        self._write(key, MISSING, None)
        return existed

    def pop(self, key: str) -> Any:
        value = self.get(key)
        if value is not MISSING:
            self._write(key, MISSING, None)
        return value

    def setdefault(self, key: str, value: Any, ttl: float | None = None) -> Any:
        current = self.get(key)
        if current is not MISSING:
            return current
        self.set(key, value, ttl)
        return value

    def incr(self, key: str, delta: int | float = 1, ttl: float | None = None) -> int | float:
        check_delta(delta)
        ttl = check_ttl(ttl)
        current = self.get(key)
        if current is MISSING:
            self._write(key, delta, ttl)
            return delta
        if type(current) not in (int, float):
            raise TypeError(f"cannot incr key {key!r}: its value is not an int or float")
        new = current + delta
        self._write(key, new, self._ttls.get(key, KEEP_TTL))
        return new  # type: ignore[no-any-return]

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        current = self.get(key)
        if current is MISSING or not current == expected:
            return False
        pack(key, new)
        self._write(key, new, self._ttls.get(key, KEEP_TTL))
        return True

    def expire(self, key: str, seconds: float | None) -> bool:
        seconds = check_ttl(seconds)
        if self.get(key) is MISSING:
            return False
        self._ttls[key] = seconds
        return True

    def clear(self) -> None:
        keys = self.keys()
        self._load(keys)
        for key in keys:
            self._write(key, MISSING, None)

    # -- savepoints ----------------------------------------------------------------

    def savepoint(self) -> Savepoint:
        """What the block holds now, for :meth:`rollback` (a nested block begins).

        Raises TypeError or ValueError, naming the key, for a value the block
        could not commit anyway.
        """
        values = {
            key: (value, MISSING if value is MISSING else pack(key, value))
            for key, value in self._values.items()
        }
        return values, dict(self._ttls)

    def rollback(self, savepoint: Savepoint) -> None:
        """Go back to ``savepoint`` (a nested block raised); keys read since stay claimed.

        A list, dict or set the block held then is restored in place, so the
        outer block's own references to it stay good; another value changed
        in place is replaced by a copy of what it was.
        """
        values, ttls = savepoint
        for key in list(self._values):
            if key not in values:  # first read or written in the nested block
                if key in self._original:
                    original = self._original[key]
                    self._values[key] = MISSING if original is None else _unpack(original)
                else:
                    del self._values[key]
                continue
            value, packed = values[key]
            if packed is not MISSING and _pickled(key, value) != packed:
                before = _unpack(packed)
                if type(value) is list:
                    value[:] = before
                elif type(value) in (dict, set):
                    value.clear()
                    value.update(before)
                else:
                    value = before
            self._values[key] = value
        self._ttls = ttls

    # -- ending ----------------------------------------------------------------------

    def _writes(self) -> list[tuple[str, Any, Any]]:
        writes: list[tuple[str, Any, Any]] = []
        for key, value in self._values.items():
            original = self._original.get(key)
            ttl = self._ttls.get(key, KEEP_TTL)
            if value is MISSING:
                if original is not None or key not in self._original:
                    writes.append((key, None, None))
                continue
            packed = pack(key, value)
            if key in self._ttls or original is None or not _same(packed, original):
                writes.append((key, packed, ttl))
        return writes

    def commit(self) -> None:
        """Write every change in one step and end the block."""
        try:
            writes = self._writes()
            check_request("the atomic block", writes)
        except BaseException:
            self.abort()
            raise
        if writes or self.session_id is not None:
            self.backend.call("txn_commit", writes, self.timeout, self.session_id)

    def abort(self) -> None:
        """Drop every change and end the block."""
        if self.session_id is not None:
            self.backend.call("txn_abort")
