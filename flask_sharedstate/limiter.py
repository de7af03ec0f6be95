"""Rate-limit storage for `limits`_ and Flask-Limiter: the scheme ``sharedstate://``.

::

    app.config["RATELIMIT_STORAGE_URI"] = "sharedstate://"
    shared = SharedState(app)
    limiter = Limiter(get_remote_address, app=app)

Counters and windows live in the current app's shared state (its namespace,
under ``limits:``), so every worker counts against the same limits, on the
embedded server as on Redis. Each method is one atomic step, and one round trip
on the embedded server (the moving window is an atomic block of two on Redis,
whose scripts cannot sign a value), so every strategy is exact across workers
(``limits``' own in-memory sliding window may let fewer through under
concurrency; this one does not).

The storage finds the app's :class:`~flask_sharedstate.SharedState` through
:data:`flask.current_app`, so it works wherever Flask-Limiter calls it: in a
request, and in ``flask limiter ...`` commands.

The scheme is registered with ``limits`` when this module is imported, which
:mod:`flask_sharedstate.extension` does for you whenever ``limits`` is
installed (``from flask_sharedstate import SharedState`` imports it; a bare
``import flask_sharedstate`` stays cheap and imports neither Flask nor
``limits``); importing it yourself is harmless.

.. _limits: https://limits.readthedocs.io/
"""

from __future__ import annotations

import time
from typing import Any

from flask import current_app, has_app_context
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from .errors import SharedStateError
from .extension import AppState, SharedState

#: Where this storage's keys live in the app's namespace.
PREFIX = "limits:"


class _CurrentApp(SharedState):
    """A face bound to no app: it works on whichever app is current."""

    def state(self) -> AppState:
        try:
            return super().state()
        except RuntimeError:
            if not has_app_context() or "sharedstate" in current_app.extensions:
                raise
        raise RuntimeError(
            "RATELIMIT_STORAGE_URI = 'sharedstate://' keeps the rate limits in the app's"
            " shared state, and this app has none: add `SharedState(app)` (or"
            " `shared.init_app(app)` in an app factory), before or after Limiter(...)."
        )


_shared = _CurrentApp()


def _call(op: str, *args: Any) -> Any:
    """One operation on the current app's backend (a rate limit step is never part of
    the app's own atomic block)."""
    return _shared.state().backend.call(op, *args)


def _ttl(expiry: float) -> float:
    # limits passes whole seconds; the store wants a positive ttl.
    return max(float(expiry), 0.001)


class SharedStateStorage(
    Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    """A :class:`limits.storage.Storage` on the current app's shared state.

    :param uri: ``sharedstate://`` (nothing else is read from it).
    :param wrap_exceptions: wrap errors in :exc:`limits.errors.StorageError`,
        as every ``limits`` storage does.
    """

    STORAGE_SCHEME = ["sharedstate"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SharedStateError

    # -- fixed window ------------------------------------------------------------

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add ``amount``; a counter this call creates expires after ``expiry`` seconds."""
        return int(_shared.incr(PREFIX + key, amount, ttl=_ttl(expiry)))

    def get(self, key: str) -> int:
        value = _shared.get(PREFIX + key, 0)
        return int(value) if isinstance(value, (int, float)) else 0

    def get_expiry(self, key: str) -> float:
        """When the counter at ``key`` expires, as a time.time() timestamp (now if absent)."""
        now = time.time()
        try:
            remaining = _shared.ttl(PREFIX + key)
        except KeyError:
            return now
        return now + (remaining or 0.0)

    def check(self) -> bool:
        try:
            _shared.get(PREFIX + "check")
        except SharedStateError:
            return False
        return True

    def reset(self) -> int | None:
        """Remove every rate-limit key of this app; return how many there were."""
        keys = [k for k in _shared.dict.keys() if k.startswith(PREFIX)]
        with _shared.atomic():
            for key in keys:
                _shared.delete(key)
        return len(keys)

    def clear(self, key: str) -> None:
        _shared.delete(PREFIX + key)
        _shared.delete(PREFIX + "mw:" + key)

    # -- moving window --------------------------------------------------------------

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Record ``amount`` hits now if the last ``expiry`` seconds hold at most
        ``limit - amount``; one atomic step (one round trip on the embedded server)."""
        if amount > limit:
            return False
        return bool(
            _call("window_acquire", PREFIX + "mw:" + key, limit, _ttl(expiry), amount, time.time())
        )

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """The oldest hit within the last ``expiry`` seconds, and how many there are."""
        now = time.time()
        entries = [t for t in _shared.get(PREFIX + "mw:" + key, ()) if t > now - expiry]
        if not entries:
            return now, 0
        return entries[-1], len(entries)

    # -- sliding window counter -----------------------------------------------------

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Count ``amount`` hits if the weighted count of the previous and current
        windows leaves room; one atomic step (one round trip), so never more than
        ``limit``."""
        if amount > limit:
            return False
        now = time.time()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        # The previous window counts for the part of it still inside the last expiry.
        weight = 1 - ((now - expiry) / expiry) % 1
        return bool(
            _call(
                "sliding_acquire",
                PREFIX + previous_key,
                PREFIX + current_key,
                limit,
                amount,
                weight,
                _ttl(2 * expiry),  # a new current window is the next one's previous
            )
        )

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        now = time.time()
        previous, current = self._window(key, expiry, now)
        return previous[0], previous[1], current[0], current[1]

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        previous_key, current_key = self.sliding_window_keys(key, expiry, time.time())
        _shared.delete(PREFIX + previous_key)
        _shared.delete(PREFIX + current_key)

    def _window(
        self, key: str, expiry: int, now: float
    ) -> tuple[tuple[int, float], tuple[int, float]]:
        """((previous count, previous ttl), (current count, current ttl)), as limits
        computes them (the ttls from the window arithmetic, not the keys' own)."""
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        values = _shared.get_many([PREFIX + previous_key, PREFIX + current_key], 0)
        previous_count = int(values[PREFIX + previous_key])
        current_count = int(values[PREFIX + current_key])
        previous_ttl = 0.0 if previous_count == 0 else (1 - ((now - expiry) / expiry) % 1) * expiry
        current_ttl = (1 - (now / expiry) % 1) * expiry + expiry
        return (previous_count, previous_ttl), (current_count, current_ttl)
