"""The one interface between the extension and a backend, and the value codec.

A backend runs the operations of :class:`~flask_sharedstate.server.store.Session`
(``get``, ``set``, ``incr``, ``acquire``, ``txn_read``, ``txn_commit`` ...) on
*packed* values, with their semantics, each as one atomic step:
:meth:`Backend.call`. Packing is the same for every backend: ``int`` and
``float`` travel as themselves, so the store can increment them, and any
other value as a pickle the store never opens. Every value read is unpickled
anew, which is what makes values copies.

A backend never imports the extension.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from ..server.protocol import MAX_MESSAGE

if TYPE_CHECKING:
    from .client_cache import ReadCache

Packed = int | float | bytes

#: A value may use at most this much of a message.
MAX_VALUE = MAX_MESSAGE - 64 * 1024

#: A request's keys and values together may use at most this much of a message; the
#: rest is room for the operation's name and its other arguments (a few dozen bytes).
MAX_REQUEST = MAX_MESSAGE - 4096

#: More than pickle adds around one key, value, ttl or tuple of them (opcodes, lengths).
_OVERHEAD = 32


def check_key(key: object) -> str:
    if type(key) is not str:
        raise TypeError(
            f"shared state keys must be str, not {type(key).__name__} ({key!r});"
            " convert the key with str() or an f-string."
        )
    return key


def pack(key: str, value: object) -> Packed:
    """Turn ``value`` into what the store holds, or raise naming ``key``."""
    if type(value) is int or type(value) is float:
        return value
    try:
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"the value for key {key!r} cannot be stored: it is not picklable"
            f" ({type(exc).__name__}: {exc}). Store plain data (numbers, str, lists,"
            " dicts) or make the type picklable. Nothing was written."
        ) from exc
    if len(blob) > MAX_VALUE:
        raise ValueError(
            f"the value for key {key!r} is {len(blob)} bytes pickled, more than the"
            f" {MAX_VALUE} a value may take. Nothing was written."
        )
    return blob


def _size_bound(payload: Any) -> int:
    """At least the size of ``payload`` pickled: keys, packed values, ttls and lists of them."""
    kind = type(payload)
    if kind is bytes:
        return len(payload) + _OVERHEAD
    if kind is str:
        return 4 * len(payload) + _OVERHEAD  # UTF-8 takes at most 4 bytes a character
    if kind is int:
        return int(payload.bit_length()) // 8 + _OVERHEAD
    if kind is not list and kind is not tuple:
        return _OVERHEAD  # float, None, KEEP_TTL
    # Runs on every call: count the common shapes (keys, values, (key, value, ttl)
    # tuples) without a call per item.
    total = _OVERHEAD * (len(payload) + 1)
    for item in payload:
        kind = type(item)
        if kind is tuple:
            for part in item:
                kind = type(part)
                if kind is bytes:
                    total += len(part) + _OVERHEAD
                elif kind is str:
                    total += 4 * len(part) + _OVERHEAD
                elif kind is not float and part is not None:
                    total += _size_bound(part)
        elif kind is bytes:
            total += len(item)
        elif kind is str:
            total += 4 * len(item)
        elif kind is not float and item is not None:
            total += _size_bound(item)
    return total


def check_request(what: str, payload: Any) -> None:
    """Refuse, before anything is sent, a request whose keys and values are over the limit.

    The state server closes the connection on a message over
    :data:`~flask_sharedstate.server.protocol.MAX_MESSAGE` (and with it the
    thread's locks), so every backend refuses such a request alike. The bound
    is cheap; only a request near the limit is pickled to measure it exactly.
    """
    if _size_bound(payload) <= MAX_REQUEST:
        return
    size = len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    if size > MAX_REQUEST:
        raise ValueError(
            f"{what}: its keys and values are {size} bytes pickled, more than one request"
            f" may carry ({MAX_REQUEST} bytes: messages are at most {MAX_MESSAGE // 2**20}"
            " MiB). Split it into smaller calls (or atomic blocks). Nothing was written."
        )


def unpack(packed: Packed) -> Any:
    if type(packed) is bytes:
        return pickle.loads(packed)
    return packed


class Backend(ABC):
    """A shared store, as the extension sees it."""

    #: the ``SHAREDSTATE_BACKEND`` name
    name: str

    #: the address, for messages
    address: str

    #: this process's read cache (``client_cache.py``), or None: every read is a call
    read_cache: ReadCache | None = None

    @abstractmethod
    def call(self, op: str, *args: Any) -> Any:
        """Run store operation ``op`` as one atomic step and return its result.

        Raises :exc:`~flask_sharedstate.LockTimeout` where the operation waited
        too long, :exc:`~flask_sharedstate.SharedStateUnavailable` when the
        store cannot be reached, and ``KeyError``/``TypeError``/``ValueError``
        as the operation does.
        """

    @abstractmethod
    def set_defaults(self, defaults: list[tuple[str, Packed]]) -> None:
        """Set these keys if absent, now and on every new store (never a reset)."""

    def close(self) -> None:  # noqa: B027 - most backends have nothing to close
        """Drop this thread's connection, if any. The next call opens a new one."""
