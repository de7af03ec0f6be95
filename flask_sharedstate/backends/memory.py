"""The ``memory`` backend: the state server's store, inside this one process.

For tests and the development server: every thread of the process shares the
state, nothing is shared with other processes. Locks and atomic blocks are
owned per thread, as on the state server they are owned per connection, and
released when their thread ends.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import LockTimeout
from ..server import store
from .base import Backend, Packed


class _ThreadSession:
    """Holds a thread's session; when the thread ends, its locks and block go too."""

    __slots__ = ("session",)

    def __init__(self, session: store.Session) -> None:
        self.session = session

    def __del__(self) -> None:
        self.session.close()


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, namespace: str, timeout: float) -> None:
        self.address = "memory"
        self._namespace = namespace
        self._timeout = timeout
        self._store = store.Store()
        self._local = threading.local()

    def _session(self) -> store.Session:
        holder: _ThreadSession | None = getattr(self._local, "holder", None)
        if holder is None:
            session = self._store.session(self._namespace, self._timeout)
            holder = self._local.holder = _ThreadSession(session)
        return holder.session

    def call(self, op: str, *args: Any) -> Any:
        try:
            return self._session().call(op, args)
        except store.LockTimeout as exc:
            raise LockTimeout(*exc.args) from None

    def set_defaults(self, defaults: list[tuple[str, Packed]]) -> None:
        self.call("apply_defaults", defaults)
