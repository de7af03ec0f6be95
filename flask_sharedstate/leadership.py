"""One worker at a time: ``shared.leader(name)``.

Each process that asks runs one small thread per name that tries to hold the
lock ``leader:NAME``. The thread that holds it makes its process the leader;
the others wait in ``acquire`` and take over as soon as the lock is free:

* on the embedded server, at once when the leader's process dies (its
  connection closes and the server releases its locks);
* on Redis, when the leader's lease (``SHAREDSTATE_LEASE``) runs out.

The holder checks that it still holds the lock every :data:`CHECK_INTERVAL`
seconds (on Redis this also renews the lease); if it lost it (the server
restarted, or the lease ran out while the process was stopped), the process
stops leading at once and competes again. So two processes can both believe
they lead only for at most one check interval after such a loss, never
because of a dead leader.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from .errors import LockNotOwned, LockTimeout, SharedStateError

if TYPE_CHECKING:
    from flask import Flask

    from .extension import SharedState

#: Seconds between the holder's checks that it still holds the lock.
CHECK_INTERVAL = 0.25
#: Seconds a waiting process waits in one acquire before it looks again.
WAIT_SLICE = 1.0


class Leadership:
    """The leadership of one name, in this process, for one app."""

    def __init__(self, shared: SharedState, app: Flask, name: str) -> None:
        self.name = name
        self._shared = shared
        self._app = app
        self._pid = os.getpid()
        self._leading = threading.Event()
        self._first_try = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"sharedstate-leader-{name}", daemon=True
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False in a forked child (threads do not survive a fork) or once stopped."""
        return self._pid == os.getpid() and self._thread.is_alive()

    def leads(self, wait: float) -> bool:
        """Whether this process leads; waits up to ``wait`` for the first attempt."""
        self._first_try.wait(wait)
        return self._leading.is_set()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        lock = self._shared.lock(f"leader:{self.name}")
        with self._app.app_context():
            while not self._stop.is_set():
                # The first try answers leader() at once; later ones wait in the
                # server, which hands the lock over the moment it is free.
                try:
                    taken = lock.acquire(timeout=WAIT_SLICE if self._first_try.is_set() else 0)
                except LockTimeout:
                    taken = False
                except SharedStateError:
                    taken = False
                    self._stop.wait(WAIT_SLICE)  # unreachable server: try again soon
                self._first_try.set()
                if not taken:
                    continue
                self._leading.set()
                try:
                    self._hold(lock)
                finally:
                    self._leading.clear()

    def _hold(self, lock: Any) -> None:
        """Keep holding until the lock is lost or we are stopped."""
        while not self._stop.wait(CHECK_INTERVAL):
            try:
                lock.extend()  # on Redis this also renews the lease
            except (LockNotOwned, SharedStateError):
                return  # lost it: stop leading, compete again
        try:
            lock.release()
        except SharedStateError:
            pass
