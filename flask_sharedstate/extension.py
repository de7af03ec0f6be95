"""The Flask extension: :class:`SharedState` and the faces it gives an app.

``shared.dict`` (a :class:`~collections.abc.MutableMapping`), the single-step
operations (``shared.incr`` ...), ``shared.lock`` and ``shared.atomic`` all
find the current app's :class:`AppState` and send each call either straight
to its backend or into the atomic block that is open in this context.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, TypeVar, overload

from flask import Flask, current_app, has_app_context

from .app_context import current_context as _app_context
from .atomic import Transaction
from .backends.base import Backend, check_key, check_request, pack, unpack
from .backends.client_cache import ABSENT
from .config import Settings, load_settings
from .errors import LockNotOwned, LockTimeout, SharedStateError
from .operations import MISSING, Direct, Operations, check_timeout, check_ttl

F = TypeVar("F", bound=Callable[..., Any])


_leaders_lock = threading.Lock()

#: The name of the global lock. Named locks cannot take it.
GLOBAL_LOCK = "__global__"


def _make_backend(settings: Settings) -> Backend:
    if settings.backend == "memory":
        from .backends.memory import MemoryBackend

        return MemoryBackend(settings.namespace, settings.timeout)
    if settings.backend == "redis":
        from .backends.redis import RedisBackend

        assert settings.redis_url is not None
        return RedisBackend(
            settings.redis_url,
            settings.namespace,
            settings.timeout,
            settings.lease,
            settings.key,
            settings.redis_options,
        )
    from .backends.manager import ManagerBackend

    return ManagerBackend(settings)


class AppState:
    """The per-app state, at ``app.extensions["sharedstate"]``.

    :ivar settings: the validated configuration
    :ivar backend: the backend; it connects on first use, not before
    """

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.direct = Direct(backend, settings.timeout)
        self.transaction: ContextVar[Transaction | None] = ContextVar(
            "sharedstate_transaction", default=None
        )
        #: shared.leader(name): this process's Leadership of each name
        self.leaders: dict[str, Any] = {}
        #: the backend's read cache (manager on a unix socket), or None
        self.cache = backend.read_cache

    def operations(self) -> Operations:
        return self.transaction.get() or self.direct


class SharedState:
    """One shared dict and lock for every worker process of a Flask app.

    :param app: the app, or None to call :meth:`init_app` later.
    :param defaults: initial values, set only where a key is absent.

    Reads these config keys (see the README for each): ``SHAREDSTATE_BACKEND``,
    ``SHAREDSTATE_HOST``, ``SHAREDSTATE_PORT``, ``SHAREDSTATE_SOCKET``,
    ``SHAREDSTATE_KEY``, ``SHAREDSTATE_PERSIST_PATH``, ``SHAREDSTATE_FSYNC``,
    ``SHAREDSTATE_REDIS_URL``, ``SHAREDSTATE_REDIS_OPTIONS``, ``SHAREDSTATE_NAMESPACE``,
    ``SHAREDSTATE_TIMEOUT``, ``SHAREDSTATE_LEASE``, ``SHAREDSTATE_MAX_CONNECTIONS``,
    ``SHAREDSTATE_MAX_CONNECTIONS_PER_PEER``, ``SHAREDSTATE_CLIENT_CACHE``,
    ``SHAREDSTATE_CLIENT_CACHE_MAX_VALUE``.
    """

    def __init__(self, app: Flask | None = None, *, defaults: Mapping[str, Any] | None = None):
        self._app: Flask | None = None
        #: (app, its AppState) that state() found last: the short paths' shortcut
        self._last: tuple[Flask | None, AppState | None] = (None, None)
        #: The current app's shared state as a :class:`~collections.abc.MutableMapping`
        #: (:class:`SharedDict`): ``shared.dict["cart"] = []``.
        self.dict: SharedDict = SharedDict(self)
        #: The global lock (:class:`GlobalLock`): ``with shared.lock:``; named locks
        #: are ``shared.lock("cart:42")``.
        self.lock: GlobalLock = GlobalLock(self)
        if app is not None:
            self.init_app(app, defaults=defaults)
            self._app = app

    def init_app(self, app: Flask, *, defaults: Mapping[str, Any] | None = None) -> None:
        """Register the extension on ``app``. Connects to nothing.

        :param defaults: keys and values to set where a key is absent: on the
            first use in each process, and on every new state server. Never a
            reset of live state.
        :raises ConfigError: a ``SHAREDSTATE_*`` key has a wrong value.
        :raises TypeError: a default value cannot be stored.
        """
        if "sharedstate" in app.extensions:
            raise RuntimeError(
                "A 'SharedState' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        settings = load_settings(app)
        packed = [(check_key(k), pack(k, v)) for k, v in (defaults or {}).items()]
        check_request("defaults=", packed)
        backend = _make_backend(settings)
        if packed:
            backend.set_defaults(packed)
        app.extensions["sharedstate"] = AppState(settings, backend)

    def __repr__(self) -> str:
        if has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        else:
            app = self._app
        state = None if app is None else app.extensions.get("sharedstate")
        if state is None:
            return f"<{type(self).__name__} (no app)>"
        backend = state.backend
        return (
            f"<{type(self).__name__} app={app.name!r} backend={backend.name}"
            f" address={backend.address} namespace={state.settings.namespace!r}>"
        )

    # -- finding the app's state ----------------------------------------------------

    def state(self) -> AppState:
        """The :class:`AppState` of the current app (or of the app given to the constructor)."""
        context = _app_context(None)
        if context is not None:
            app = context.app
        elif has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        elif self._app is not None:
            app = self._app
        else:
            raise RuntimeError(
                "Working outside of application context: use SharedState inside a request"
                " or an 'app.app_context()', or pass the app to SharedState(app)."
            )
        try:
            state: AppState = app.extensions["sharedstate"]
        except KeyError:
            raise RuntimeError(
                "The current Flask app is not registered with this 'SharedState' instance."
                " Did you forget to call 'init_app', or create multiple 'SharedState'"
                " instances?"
            ) from None
        self._last = (app, state)  # one tuple: a thread never sees one app with another's state
        return state

    def _ops(self) -> Operations:
        return self.state().operations()

    # -- single-step operations -----------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a copy), or ``default``."""
        # state(), its usual case inlined: the call and app.extensions would be a sixth
        # of a cached read.
        context = _app_context(None)
        app, state = self._last
        if context is None or context.app is not app or state is None:
            state = self.state()  # another app; outside an app context; or the app's error
        cache = state.cache
        if cache is not None and key.__class__ is str and state.transaction.get() is None:
            value = cache.get(key)  # the read cache's short way; the same answer
            return default if value is ABSENT else value
        value = state.operations().get(key)
        return default if value is MISSING else value

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` at ``key``; with ``ttl``, the key expires after that many seconds.

        :raises TypeError: the value cannot be pickled; nothing is written.
        """
        self._ops().set(key, value, ttl)

    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        return self._ops().delete(key)

    def incr(self, key: str, delta: int | float = 1, *, ttl: float | None = None) -> int | float:
        """Add ``delta`` to the number at ``key`` (absent counts as 0); return the new value.

        One round trip, atomic in the server: no lock needed. An existing key
        keeps its ttl; a key this call creates expires after ``ttl`` seconds,
        if given, which makes a fixed-window rate limit one call::

            if shared.incr(f"rate:{ip}", ttl=60) > 100:
                abort(429)
        """
        return self._ops().incr(key, delta, ttl)

    def setdefault(self, key: str, default: Any = None, *, ttl: float | None = None) -> Any:
        """The value of ``key``; if absent, set it to ``default`` first (one step)."""
        return self._ops().setdefault(key, default, ttl)

    def pop(self, key: str, *default: Any) -> Any:
        """Remove ``key`` and return its value, or ``default``, or raise KeyError."""
        value = self._ops().pop(key)
        if value is MISSING:
            if default:
                return default[0]
            raise KeyError(key)
        return value

    def get_many(self, keys: list[str], default: Any = None) -> dict[str, Any]:
        """The values of ``keys`` as a dict, read in one step; absent ones are ``default``."""
        values = self._ops().get_many(list(keys))
        return {k: default if v is MISSING else v for k, v in zip(keys, values, strict=True)}

    def set_many(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None:
        """Store every item of ``mapping`` in one step: all or (on a bad value) none."""
        self._ops().set_many(mapping, ttl)

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        """Set ``key`` to ``new`` only if its value ``== expected``; return whether it did.

        Values are compared as Python compares them, whatever their pickles:
        ``{"b": 2, "a": 1}`` matches ``{"a": 1, "b": 2}``. Values whose pickles are
        equal count as equal without being unpickled.
        """
        return self._ops().compare_and_set(key, expected, new)

    def expire(self, key: str, seconds: float | None) -> bool:
        """Make ``key`` expire after ``seconds`` (None: never); return whether it exists."""
        return self._ops().expire(key, seconds)

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if it never does.

        :raises KeyError: the key is absent.
        """
        return self._ops().ttl(key)

    # -- one computation, one leader --------------------------------------------------

    def get_or_set(
        self,
        key: str,
        func: Callable[[], Any],
        *,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The value of ``key``; if absent, ``func()`` computes it once across all workers.

        Single flight: of the callers that find the key absent at the same time
        (threads, greenlets, processes), one takes the lock ``get_or_set:KEY``
        and runs ``func``; the others wait for the value, and each gets it as
        soon as it is stored (the state server answers them all at once; on
        Redis they poll, at most 50 ms apart).

        The runner's value is *fenced*: it is stored, with ``ttl``, only while
        the runner still holds the lock, in one step with the lock's release.
        A runner that lost the lock meanwhile (on Redis, its lease ran out
        while its process was stopped or cut off; on the state server, its
        connection was lost or the server restarted) writes nothing: it
        returns the value another runner stored, or, if there is none yet,
        takes the lock again and stores its own. So every caller returns the
        value that is stored for ``key`` (not a second one computed beside it),
        though ``func`` may have run more than once when a lock was lost.

        If ``func`` raises, the error is its caller's, nothing is stored, and a
        waiter runs ``func`` in turn; if the runner's process dies, the lock is
        freed (at once on the embedded server, after the lease on Redis) and a
        waiter takes over. Inside an atomic block the lock is taken and the
        value read and written in the block.

        :param timeout: seconds a caller waits for the value (default
            ``SHAREDSTATE_TIMEOUT``); a runner that lost its lock waits that
            long again once ``func`` has returned.
        :raises LockTimeout: the value did not come within ``timeout``.
        :raises TypeError: ``func``'s value cannot be stored (nothing is).
        """
        state = self.state()
        transaction = state.transaction.get()
        name = f"get_or_set:{check_key(key)}"
        if timeout is None:
            timeout = state.settings.timeout
        timeout = check_timeout("get_or_set(timeout=...)", timeout)
        ttl = check_ttl(ttl)
        if transaction is not None:
            return self._get_or_set_in_block(transaction, key, name, func, ttl, timeout)
        value = state.direct.get(key)  # (the read cache's hit, where there is one)
        if value is not MISSING:
            return value
        backend = state.backend
        deadline = time.monotonic() + timeout
        packed: Any = MISSING
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise LockTimeout("timed out")
                found, stored = backend.call("get_or_claim", key, name, left)
            except LockTimeout:
                raise LockTimeout(
                    f"the value of {key!r} did not come within {timeout:g}s: another"
                    f" caller holds lock {name!r} and is computing it"
                ) from None
            if found:
                return unpack(stored)
            if packed is MISSING:
                try:
                    value = func()
                    packed = pack(key, value)
                    check_request("get_or_set()", (key, packed, ttl, name))
                except BaseException:
                    self._let_go(backend, name)
                    raise
                deadline = time.monotonic() + timeout
            if backend.call("fill", key, packed, ttl, name):
                return value
            # The lock was lost while func ran: another caller may have stored a
            # value meanwhile, which is then everyone's; else claim again and store ours.

    @staticmethod
    def _let_go(backend: Backend, name: str) -> None:
        """Release a claim whose func failed; a lock already lost needs nothing."""
        try:
            backend.call("release", name)
        except (LockNotOwned, RuntimeError):
            pass

    def _get_or_set_in_block(
        self,
        transaction: Transaction,
        key: str,
        name: str,
        func: Callable[[], Any],
        ttl: float | None,
        timeout: float,
    ) -> Any:
        value = transaction.get(key)
        if value is not MISSING:
            return value
        lock = self.lock(name)
        lock.acquire(timeout=timeout)
        try:
            value = transaction.get(key)
            if value is MISSING:
                value = func()
                transaction.set(key, value, ttl)
            return value
        finally:
            lock.release()

    def cached(
        self, ttl: float | None = None, *, key: Callable[[], str] | None = None
    ) -> Callable[[F], F]:
        """A view decorator on :meth:`get_or_set`: the view runs once per key across workers.

        The view's return value must be picklable (a str, dict, list ... not a
        Response object)::

            @app.get("/report")
            @shared.cached(ttl=60)
            def report():
                return {"rows": slow_query()}

            @app.get("/user/<int:uid>/card")
            @shared.cached(ttl=60, key=lambda: f"card:{request.view_args['uid']}")
            def card(uid):
                ...

        Every request for one key gets the value stored for it: the view runs
        once while the key is cold, the other requests wait for its value (up
        to ``SHAREDSTATE_TIMEOUT``, then :exc:`~flask_sharedstate.LockTimeout`),
        and a runner that lost its lock meanwhile writes nothing and answers
        with the stored value (see :meth:`get_or_set`). An error of the view is
        its own request's; the next request runs it again.

        :param ttl: seconds the value is kept (None: until deleted).
        :param key: a function of no arguments, called in the request, that
            returns the key to cache under; by default ``view:`` plus the view's
            name and the request's full path (query string included).
        """

        def decorator(view: F) -> F:
            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                from flask import request

                name = key() if key is not None else f"view:{view.__qualname__}:{request.full_path}"
                return self.get_or_set(name, lambda: view(*args, **kwargs), ttl=ttl)

            return wrapper  # type: ignore[return-value]

        return decorator

    def leader(self, name: str = "default", *, wait: float = 1.0) -> bool:
        """Whether this process leads ``name``: true in exactly one process at a time.

        The first call starts a small thread in this process that competes for
        the lock ``leader:NAME`` and holds it while the process lives; when the
        leader dies, another process leads (at once on the embedded server,
        after ``SHAREDSTATE_LEASE`` on Redis). Cheap to call often: after the
        first call it reads a flag. For a job that must run in one worker::

            @scheduler.task("interval", seconds=10)
            def job():
                with app.app_context():
                    if shared.leader("cleanup"):
                        cleanup()

        :param wait: on the first call, seconds to wait for the first attempt.
        """
        from .leadership import Leadership

        state = self.state()
        with _leaders_lock:
            leadership = state.leaders.get(name)
            if leadership is None or not leadership.alive:
                app = self._app
                if has_app_context():
                    app = current_app._get_current_object()  # type: ignore[attr-defined]
                assert app is not None  # state() has raised otherwise
                leadership = state.leaders[name] = Leadership(self, app, name)
        return leadership.leads(wait)

    # -- atomic blocks ------------------------------------------------------------------

    @overload
    def atomic(self, func: F) -> F: ...
    @overload
    def atomic(self, func: None = None, *, timeout: float | None = None) -> _Atomic: ...

    def atomic(
        self, func: Callable[..., Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """A locked read-modify-write block, as a decorator or a context manager::

            @shared.atomic
            def view(): ...

            @shared.atomic(timeout=2)
            def view(): ...

            with shared.atomic():
                shared.dict["cart"].append(item)

        Values read inside are the block's own; their nested edits, writes,
        deletes and ``incr`` are written together when the block exits, and
        dropped when it raises. Nested blocks join the outer one as
        savepoints: a nested block that raises undoes its own changes (the
        keys it read stay claimed), and the outer block goes on with what it
        had before the nested one began.

        :param timeout: seconds to wait for other blocks (default ``SHAREDSTATE_TIMEOUT``),
            from 0 to :data:`~flask_sharedstate.operations.MAX_TIMEOUT`.
        :raises LockTimeout: waited longer than ``timeout``.
        :raises ValueError: ``timeout`` is not such a number; nothing was sent.
        :raises AtomicBlockLost: the block lost its claims (connection or lease
            lost); nothing of it was written.
        """
        block = _Atomic(self, timeout)
        if func is not None:
            return block(func)
        return block


class _Atomic:
    """``shared.atomic(...)``: a reusable decorator and context manager."""

    def __init__(self, shared: SharedState, timeout: float | None) -> None:
        self._shared = shared
        self._timeout = timeout
        self._opened = threading.local()

    def __call__(self, func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _Atomic(self._shared, self._timeout):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __enter__(self) -> _Atomic:
        state = self._shared.state()
        stack: list[Any] = self._opened.__dict__.setdefault("stack", [])
        timeout = self._timeout if self._timeout is not None else state.settings.timeout
        timeout = check_timeout("atomic(timeout=...)", timeout)
        outer = state.transaction.get()
        if outer is not None:
            # Joins the outer block, as a savepoint it goes back to if this one raises.
            stack.append((None, outer, outer.savepoint()))
            return self
        txn = Transaction(state.backend, timeout)
        stack.append((state, txn, state.transaction.set(txn)))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        entry = self._opened.stack.pop()
        if entry[0] is None:
            _, outer, savepoint = entry
            if exc_type is not None:
                outer.rollback(savepoint)
            return
        state, txn, token = entry
        state.transaction.reset(token)
        if exc_type is None:
            txn.commit()
            return
        try:
            txn.abort()
        except SharedStateError:
            # Nothing of the block was sent, and a lost connection drops its claims
            # anyway: let the block's own exception be the one the caller sees.
            pass


class SharedDict(MutableMapping[str, Any]):
    """``shared.dict``: the current app's shared state as a mapping.

    Every call is one atomic step. Values are copies: outside ``atomic``,
    ``shared.dict["cart"].append(x)`` changes only the copy, so use
    ``shared.atomic`` for nested edits.
    """

    def __init__(self, shared: SharedState) -> None:
        self._shared = shared

    def __getitem__(self, key: str) -> Any:
        shared = self._shared
        context = _app_context(None)  # shared.state(), inlined as in SharedState.get
        app, state = shared._last
        if context is None or context.app is not app or state is None:
            state = shared.state()
        cache = state.cache
        if cache is not None and key.__class__ is str and state.transaction.get() is None:
            value = cache.get(key)  # the read cache's short way; the same answer
            if value is ABSENT:
                raise KeyError(key)
            return value
        value = state.operations().get(key)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._shared._ops().set(key, value)

    def __delitem__(self, key: str) -> None:
        if not self._shared._ops().delete(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        shared = self._shared
        context = _app_context(None)  # shared.state(), inlined as in SharedState.get
        app, state = shared._last
        if context is None or context.app is not app or state is None:
            state = shared.state()
        cache = state.cache
        if cache is not None and key.__class__ is str and state.transaction.get() is None:
            return cache.contains(key)
        return state.operations().contains(key)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shared._ops().keys())

    def __len__(self) -> int:
        return self._shared._ops().length()

    def get(self, key: str, default: Any = None) -> Any:
        return self._shared.get(key, default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        return self._shared._ops().setdefault(key, default)

    _marker: Any = object()

    def pop(self, key: str, default: Any = _marker) -> Any:
        value = self._shared._ops().pop(key)
        if value is MISSING:
            if default is self._marker:
                raise KeyError(key)
            return default
        return value

    def popitem(self) -> tuple[str, Any]:
        for key in self:
            value = self._shared._ops().pop(key)
            if value is not MISSING:
                return key, value
        raise KeyError("popitem(): shared dict is empty")

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        items = dict(other, **kwargs)
        self._shared._ops().set_many(items)

    def clear(self) -> None:
        self._shared._ops().clear()

    def items(self) -> Any:
        return self._shared._ops().items()

    def values(self) -> Any:
        return [v for _, v in self._shared._ops().items()]

    def keys(self) -> Any:
        return self._shared._ops().keys()

    def copy(self) -> dict[str, Any]:
        """A plain dict of every key and value, read in one step."""
        return dict(self._shared._ops().items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.copy() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<SharedDict of {self._shared!r}>"


class Lock:
    """A lock shared by every process of the app.

    Held by one thread at a time and not reentrant. If the process holding it
    dies, the state server releases it at once; on Redis, its lease
    (``SHAREDSTATE_LEASE``) runs out, and while the holder lives a thread of
    its process renews the lease, so a long critical section keeps its lock.

    A holder that lost its lock without releasing it (on Redis: its lease ran
    out while the process was stopped or cut off; on the state server: its
    connection was lost) gets :exc:`~flask_sharedstate.LockNotOwned` from
    :meth:`release` and :meth:`extend`: another process may have held the lock
    meanwhile.
    """

    def __init__(self, shared: SharedState, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"lock names must be non-empty str, not {name!r}")
        self._shared = shared
        self.name = name

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock.

        :param blocking: if False, return at once: True if taken, else False.
        :param timeout: seconds to wait (default ``SHAREDSTATE_TIMEOUT``).
        :raises LockTimeout: it was not free within ``timeout``.
        """
        state = self._shared.state()
        if not blocking:
            return bool(state.backend.call("acquire", self.name, 0.0))
        if timeout is None:
            timeout = state.settings.timeout
        timeout = check_timeout("acquire(timeout=...)", timeout)
        if not state.backend.call("acquire", self.name, timeout):
            raise LockTimeout(f"lock {self.name!r} was not free within {timeout:g}s")
        return True

    def release(self) -> None:
        """Release the lock.

        :raises LockNotOwned: this thread took the lock but lost it since (see
            the class); another process may have taken it.
        :raises RuntimeError: this thread does not hold the lock.
        """
        self._shared.state().backend.call("release", self.name)

    def extend(self, additional_time: float | None = None) -> bool:
        """Check that this thread still holds the lock, and lengthen its lease.

        On Redis, ``additional_time`` seconds are added to the time left (None:
        the lease starts again at ``SHAREDSTATE_LEASE``). The lease is renewed
        while the lock is held anyway; call this to make sure you still hold it
        before doing what the lock protects. Locks of the state server and of
        ``memory`` have no lease: there it only checks. Returns True.

        :raises LockNotOwned: the lock was lost (see the class).
        :raises RuntimeError: this thread does not hold the lock.
        """
        if additional_time is not None and (
            isinstance(additional_time, bool)
            or not isinstance(additional_time, (int, float))
            or not additional_time >= 0
        ):
            raise ValueError(
                f"extend(additional_time=...) must be seconds >= 0 or None, not {additional_time!r}"
            )
        extra = None if additional_time is None else float(additional_time)
        return bool(self._shared.state().backend.call("extend", self.name, extra))

    def locked(self) -> bool:
        """Whether any process holds the lock now."""
        return bool(self._shared.state().backend.call("locked", self.name))

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Lock {self.name!r}>"


class GlobalLock(Lock):
    """``shared.lock``: the global lock; ``shared.lock("name")`` gives a named one."""

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, GLOBAL_LOCK)

    def __call__(self, name: str) -> Lock:
        if name == GLOBAL_LOCK:
            raise ValueError(f"{GLOBAL_LOCK!r} is the global lock's name: use shared.lock")
        return Lock(self._shared, name)


# Register the sharedstate:// scheme with limits (Flask-Limiter) when it is installed,
# so that RATELIMIT_STORAGE_URI = "sharedstate://" works whatever the import order.
if importlib.util.find_spec("limits") is not None:  # pragma: no branch
    from . import limiter as _limiter  # noqa: F401,E402
