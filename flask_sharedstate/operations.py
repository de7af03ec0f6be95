"""The data operations the faces (``shared.dict``, ``shared.incr`` ...) call.

Two classes implement :class:`Operations`: :class:`Direct`, where every call
is one atomic step on the backend, and :class:`~.atomic.Transaction`, where
calls go into the current atomic block. The faces pick one per call, so the
same code reads and writes correctly inside and outside ``shared.atomic``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from .backends.base import Backend, check_key, check_request, pack, unpack
from .backends.client_cache import ABSENT
from .errors import LockTimeout
from .server.protocol import MAX_SECONDS

#: The longest ``ttl`` a key may be given, in seconds.
MAX_TTL = MAX_SECONDS

#: The longest ``timeout`` a lock or atomic block may wait, in seconds.
MAX_TIMEOUT = MAX_SECONDS


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: Returned by :meth:`Operations.get` for an absent (or expired) key.
MISSING: Any = _Missing()


def check_ttl(ttl: object) -> float | None:
    """A ttl every backend can hold: None (no expiry), or seconds above 0, at most MAX_TTL.

    Every face applies it before any backend call (the store applies the same
    rule), so ``inf`` or ``1e300`` fail alike everywhere, before anything is sent.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
        raise ValueError(
            f"ttl must be a number of seconds above 0 and at most {MAX_TTL:g} (about"
            f" 31 years), or None for no expiry; not {ttl!r}"
        )
    return float(ttl)


def check_timeout(what: str, timeout: object) -> float:
    """A wait every backend can bound: seconds from 0 to MAX_TIMEOUT; ValueError naming ``what``.

    Checked before anything is sent: a timeout the client cannot turn into a
    socket bound (``inf``, ``1e300``) would otherwise fail mid-request and drop
    the connection, and with it every lock the thread holds.
    """
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 <= timeout <= MAX_TIMEOUT
    ):
        raise ValueError(
            f"{what} must be a number of seconds from 0 to {MAX_TIMEOUT:g} (about 31"
            f" years), not {timeout!r}"
        )
    return float(timeout)


def check_delta(delta: object) -> int | float:
    if type(delta) not in (int, float):
        raise TypeError(f"incr() delta must be an int or float, not {type(delta).__name__}")
    return delta  # type: ignore[return-value]


class Operations(ABC):
    """Everything the faces need; each method is atomic on its own."""

    @abstractmethod
    def get(self, key: str) -> Any: ...
    @abstractmethod
    def get_many(self, keys: list[str]) -> list[Any]: ...
    @abstractmethod
    def contains(self, key: str) -> bool: ...
    @abstractmethod
    def set(self, key: str, value: Any, ttl: float | None = None) -> None: ...
    @abstractmethod
    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> None: ...
    @abstractmethod
    def delete(self, key: str) -> bool: ...
    @abstractmethod
    def pop(self, key: str) -> Any: ...
    @abstractmethod
    def setdefault(self, key: str, value: Any, ttl: float | None = None) -> Any: ...
    @abstractmethod
    def incr(self, key: str, delta: int | float, ttl: float | None = None) -> int | float: ...
    @abstractmethod
    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool: ...
    @abstractmethod
    def expire(self, key: str, seconds: float | None) -> bool: ...
    @abstractmethod
    def ttl(self, key: str) -> float | None: ...
    @abstractmethod
    def length(self) -> int: ...
    @abstractmethod
    def keys(self) -> list[str]: ...
    @abstractmethod
    def items(self) -> list[tuple[str, Any]]: ...
    @abstractmethod
    def clear(self) -> None: ...


def _unpack_or_missing(packed: Any) -> Any:
    return MISSING if packed is None else unpack(packed)


class Direct(Operations):
    """Each operation is one round trip to the backend: one atomic step."""

    def __init__(self, backend: Backend, timeout: float = 5.0) -> None:
        self.backend = backend
        #: SHAREDSTATE_TIMEOUT: how long compare_and_set chases a value that keeps changing
        self.timeout = timeout
        #: the backend's read cache, if any: reads outside atomic blocks go through it
        self.cache = backend.read_cache

    def _call(self, op: str, *args: Any) -> Any:
        check_request(f"{op}()", args)
        return self.backend.call(op, *args)

    def get(self, key: str) -> Any:
        cache = self.cache
        if cache is not None:
            value = cache.get(key) if key.__class__ is str else cache.get(check_key(key))
            return MISSING if value is ABSENT else value
        return _unpack_or_missing(self._call("get", check_key(key)))

    def get_many(self, keys: Iterable[str]) -> list[Any]:
        keys = [check_key(k) for k in keys]
        if self.cache is not None:
            check_request("get_many()", (keys,))
            return [MISSING if v is ABSENT else v for v in self.cache.get_many(keys)]
        return [_unpack_or_missing(p) for p in self._call("get_many", keys)]

    def contains(self, key: str) -> bool:
        if self.cache is not None:
            return self.cache.contains(check_key(key))
        return bool(self._call("contains", check_key(key)))

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        packed = pack(check_key(key), value)
        self._call("set", key, packed, check_ttl(ttl))

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> None:
        packed = [(check_key(k), pack(k, v)) for k, v in items.items()]
        self._call("set_many", packed, check_ttl(ttl))

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", check_key(key)))

    def pop(self, key: str) -> Any:
        return _unpack_or_missing(self._call("pop", check_key(key)))

    def setdefault(self, key: str, value: Any, ttl: float | None = None) -> Any:
        packed = pack(check_key(key), value)
        return unpack(self._call("setdefault", key, packed, check_ttl(ttl)))

    def incr(self, key: str, delta: int | float = 1, ttl: float | None = None) -> int | float:
        return self._call(  # type: ignore[no-any-return]
            "incr", check_key(key), check_delta(delta), check_ttl(ttl)
        )

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        check_key(key)
        packed_new = pack(key, new)
        if self._call("compare_and_set", key, pack(key, expected), packed_new):
            return True  # equal pickles (or numbers): the common case, one round trip
        # Equal values may pickle differently ({"b": 2, "a": 1} and {"a": 1, "b": 2}),
        # and the store compares pickles: read the value, and if it is == expected, set
        # it against its own exact pickle. Each answer is true at one instant: False at
        # a read that found the key absent or unequal, True at a swap that matched.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                current = self.backend.call("get", key)
            except ValueError:  # not this app's to read (on Redis: signed with another key)
                return False
            if current is None or not unpack(current) == expected:
                return False
            if self.backend.call("compare_and_set", key, current, packed_new):
                return True
            if time.monotonic() >= deadline:  # replaced by equal values, again and again
                raise LockTimeout(
                    f"compare_and_set({key!r}): its value kept being replaced by equal values"
                    f" for longer than SHAREDSTATE_TIMEOUT ({self.timeout:g} s); nothing was"
                    " written. Retry, or use shared.atomic() for this read-modify-write."
                )

    def expire(self, key: str, seconds: float | None) -> bool:
        return bool(self._call("expire", check_key(key), check_ttl(seconds)))

    def ttl(self, key: str) -> float | None:
        return self._call("ttl", check_key(key))  # type: ignore[no-any-return]

    def length(self) -> int:
        return int(self._call("length"))

    def keys(self) -> list[str]:
        return list(self._call("keys"))

    def items(self) -> list[tuple[str, Any]]:
        return [(k, unpack(v)) for k, v in self._call("items")]

    def clear(self) -> None:
        self._call("clear")
