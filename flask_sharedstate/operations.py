"""The data operations the faces (``shared.dict``, ``shared.incr`` ...) call.

Two classes implement :class:`Operations`: :class:`Direct`, where every call
is one atomic step on the backend, and :class:`~.atomic.Transaction`, where
calls go into the current atomic block. The faces pick one per call, so the
same code reads and writes correctly inside and outside ``shared.atomic``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from .backends.base import Backend, check_key, pack, unpack


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: Returned by :meth:`Operations.get` for an absent (or expired) key.
MISSING: Any = _Missing()


def check_ttl(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
    return float(ttl)


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

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def get(self, key: str) -> Any:
        return _unpack_or_missing(self.backend.call("get", check_key(key)))

    def get_many(self, keys: Iterable[str]) -> list[Any]:
        keys = [check_key(k) for k in keys]
        return [_unpack_or_missing(p) for p in self.backend.call("get_many", keys)]

    def contains(self, key: str) -> bool:
        return bool(self.backend.call("contains", check_key(key)))

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        packed = pack(check_key(key), value)
        self.backend.call("set", key, packed, check_ttl(ttl))

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> None:
        packed = [(check_key(k), pack(k, v)) for k, v in items.items()]
        self.backend.call("set_many", packed, check_ttl(ttl))

    def delete(self, key: str) -> bool:
        return bool(self.backend.call("delete", check_key(key)))

    def pop(self, key: str) -> Any:
        return _unpack_or_missing(self.backend.call("pop", check_key(key)))

    def setdefault(self, key: str, value: Any, ttl: float | None = None) -> Any:
        packed = pack(check_key(key), value)
        return unpack(self.backend.call("setdefault", key, packed, check_ttl(ttl)))

    def incr(self, key: str, delta: int | float = 1, ttl: float | None = None) -> int | float:
        return self.backend.call(  # type: ignore[no-any-return]
            "incr", check_key(key), check_delta(delta), check_ttl(ttl)
        )

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        check_key(key)
        return bool(self.backend.call("compare_and_set", key, pack(key, expected), pack(key, new)))

    def expire(self, key: str, seconds: float | None) -> bool:
        return bool(self.backend.call("expire", check_key(key), check_ttl(seconds)))

    def ttl(self, key: str) -> float | None:
        return self.backend.call("ttl", check_key(key))  # type: ignore[no-any-return]

    def length(self) -> int:
        return int(self.backend.call("length"))

    def keys(self) -> list[str]:
        return list(self.backend.call("keys"))

    def items(self) -> list[tuple[str, Any]]:
        return [(k, unpack(v)) for k, v in self.backend.call("items")]

    def clear(self) -> None:
        self.backend.call("clear")
