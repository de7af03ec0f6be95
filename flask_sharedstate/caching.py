"""A cachelib cache on the shared state, for Flask-Caching and Flask-Session.

Flask-Caching::

    app.config["CACHE_TYPE"] = "flask_sharedstate.caching.SharedStateCache"
    shared = SharedState(app)
    cache = Cache(app)

Flask-Session (0.8+, through its ``cachelib`` session type)::

    app.config["SESSION_TYPE"] = "cachelib"
    app.config["SESSION_CACHELIB"] = SharedStateCache(key_prefix="session:")
    shared = SharedState(app)
    Session(app)

Every worker sees the same entries, on the embedded server as on Redis.
Entries live in the current app's namespace under ``cache:``, the length of
the cache's ``key_prefix``, ``:`` and the prefix (``cache:3:c1:`` for
``"c1:"``), so that :meth:`SharedStateCache.clear` removes this cache's entries
only, never those of a cache whose prefix merely starts with this one's.
``add``, ``inc`` and ``dec`` are atomic (cachelib's defaults are a racy
get-then-set); a timeout of ``0`` never expires and ``None`` uses the
default, as cachelib defines.

The cache finds the app's :class:`~flask_sharedstate.SharedState` through
:data:`flask.current_app`: use it inside a request or an app context.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachelib import BaseCache
else:
    try:
        # Flask-Caching calls factory(app, config, args, kwargs) only on subclasses of
        # its own BaseCache (itself a cachelib BaseCache); Flask-Session needs cachelib's.
        from flask_caching.backends.base import BaseCache
    except ImportError:
        from cachelib import BaseCache

from .extension import SharedState

#: Where cache entries live in the app's namespace (before the cache's own prefix).
PREFIX = "cache:"

_MISSING = object()


class SharedStateCache(BaseCache):
    """A :class:`cachelib.BaseCache` whose entries every worker shares.

    :param default_timeout: seconds an entry lives when ``set`` is given no
        timeout (``0``: forever).
    :param key_prefix: keeps this cache's entries apart from another's in the
        same app (Flask-Caching's ``CACHE_KEY_PREFIX``).
    :param ignore_delete_many_errors: as cachelib's.
    """

    def __init__(
        self,
        default_timeout: int | dt.timedelta = 300,
        key_prefix: str = "",
        ignore_delete_many_errors: bool = True,
    ) -> None:
        # Older Flask-Caching (2.4, the last on Python 3.10) takes default_timeout alone.
        super().__init__(default_timeout=default_timeout)
        self.ignore_delete_many_errors = ignore_delete_many_errors
        self.key_prefix = key_prefix
        self._shared = SharedState()  # bound to no app: works on the current one

    @classmethod
    def factory(
        cls, app: Any, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
    ) -> SharedStateCache:
        """Flask-Caching's constructor protocol (``CACHE_TYPE`` = this class's path)."""
        kwargs.setdefault("key_prefix", config.get("CACHE_KEY_PREFIX") or "")
        return cls(*args, **kwargs)

    def _space(self) -> str:
        """Where this cache's keys start. The prefix's length makes it a space of its own:
        with ``cache:`` and the prefix alone, clear() of the cache "a" would take "ab"'s."""
        return f"{PREFIX}{len(self.key_prefix)}:{self.key_prefix}"

    def _key(self, key: str) -> str:
        return self._space() + key

    def _ttl(self, timeout: int | dt.timedelta | None) -> float | None:
        seconds = self._normalize_timeout(timeout)
        # cachelib: 0 never expires; a negative timeout has already expired.
        return None if seconds == 0 else float(seconds)

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        return self._shared.get(self._key(key))

    def get_many(self, *keys: str) -> list[Any]:
        values = self._shared.get_many([self._key(k) for k in keys])
        return [values[self._key(k)] for k in keys]

    def has(self, key: str) -> bool:
        return self._key(key) in self._shared.dict

    # -- writes -----------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        ttl = self._ttl(timeout)
        if ttl is not None and ttl < 0:
            self._shared.delete(self._key(key))
            return True
        self._shared.set(self._key(key), value, ttl=ttl)
        return True

    def add(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        """Set ``key`` only if it is absent (atomic); return whether it did."""
        ttl = self._ttl(timeout)
        with self._shared.atomic():
            if self._key(key) in self._shared.dict:
                return False
            if ttl is None or ttl > 0:
                self._shared.set(self._key(key), value, ttl=ttl)
        return True

    def set_many(
        self, mapping: dict[str, Any], timeout: int | dt.timedelta | None = None
    ) -> list[Any]:
        ttl = self._ttl(timeout)
        if ttl is not None and ttl < 0:
            self.delete_many(*mapping)
            return list(mapping)
        self._shared.set_many({self._key(k): v for k, v in mapping.items()}, ttl=ttl)
        return list(mapping)

    def delete(self, key: str) -> bool:
        return self._shared.delete(self._key(key))

    def delete_many(self, *keys: str) -> list[Any]:
        with self._shared.atomic():
            for key in keys:
                self._shared.delete(self._key(key))
        return list(keys)

    def clear(self) -> bool:
        """Remove this cache's entries (and nothing else of the app's state)."""
        space = self._space()
        keys = [k for k in self._shared.dict.keys() if k.startswith(space)]
        with self._shared.atomic():
            for key in keys:
                self._shared.delete(key)
        return True

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` atomically (an absent key counts as 0); the new value, as stored
        (a float stays a float, as with cachelib's own caches)."""
        try:
            return self._shared.incr(self._key(key), delta)  # type: ignore[return-value]
        except TypeError:  # the entry is not a number: cachelib says None
            return None

    def dec(self, key: str, delta: int = 1) -> int | None:
        return self.inc(key, -delta)
