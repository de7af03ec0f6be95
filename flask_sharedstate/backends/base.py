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
from typing import Any

from ..server.protocol import MAX_MESSAGE

Packed = int | float | bytes

#: A value may use at most this much of a message.
MAX_VALUE = MAX_MESSAGE - 64 * 1024


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
