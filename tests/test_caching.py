"""The cachelib cache (Flask-Caching, Flask-Session) from many processes: atomic inc and
add, timeouts as cachelib defines them, clear() of this cache's keys only."""

# The process fixtures come from test_processes (imported, so pytest sees them here).
# ruff: noqa: F401, F811

from __future__ import annotations

import os
import signal
import time
from typing import Any

import cacheworkers
import pytest
from flask import Flask
from test_processes import any_backend, ctx, here, run_all, socket_path

from flask_sharedstate import SharedState
from flask_sharedstate.caching import SharedStateCache

from conftest import wait_for


# The cluster's code path is raced in test_processes; these two add nothing there but minutes.
@pytest.mark.parametrize("any_backend", ["manager", "redis"], indirect=True)
def test_inc_from_8_processes_is_exact(
    any_backend: str,
    socket_path: str,
    procs: list[Any],
    here: SharedState,
) -> None:
    """8 processes x 1,000 cache.inc end at exactly 8,000 (cachelib's default inc is a
    racy get-then-set)."""
    barrier = ctx.Barrier(8)
    run_all(procs, cacheworkers.cache_inc_many, [(socket_path, 1000, barrier)] * 8)
    with here._app.app_context():  # type: ignore[union-attr]
        assert SharedStateCache().get("hits") == 8000


# The cluster's code path is raced in test_processes; these two add nothing there but minutes.
@pytest.mark.parametrize("any_backend", ["manager", "redis"], indirect=True)
def test_add_from_16_racing_processes_succeeds_once(
    any_backend: str,
    socket_path: str,
    procs: list[Any],
    here: SharedState,
) -> None:
    """16 processes racing cache.add on one key: exactly one succeeds, and its value stays."""
    barrier = ctx.Barrier(16)
    results = ctx.Queue()
    run_all(
        procs,
        cacheworkers.cache_add_once,
        [(socket_path, worker, barrier, results) for worker in range(16)],
    )
    outcomes = dict(results.get(timeout=10) for _ in range(16))
    winners = [w for w, ok in outcomes.items() if ok]
    assert len(winners) == 1, outcomes
    with here._app.app_context():  # type: ignore[union-attr]
        assert SharedStateCache().get("winner") == winners[0]


@pytest.fixture
def cache(app: Flask, shared: SharedState) -> Any:
    with app.app_context():
        yield SharedStateCache(default_timeout=300, key_prefix="c1:")


def test_cachelib_interface(cache: SharedStateCache, backend: str) -> None:
    """get/set/add/delete/get_many/set_many/delete_many/has/inc/dec as cachelib defines
    them, on every backend."""
    assert cache.get("a") is None
    assert cache.set("a", {"x": [1, 2]}) is True
    assert cache.get("a") == {"x": [1, 2]}
    assert cache.add("a", "other") is False
    assert cache.add("b", 2) is True
    assert cache.has("a") and cache.has("b") and not cache.has("c")
    assert cache.get_many("a", "b", "c") == [{"x": [1, 2]}, 2, None]
    assert cache.get_dict("a", "c") == {"a": {"x": [1, 2]}, "c": None}
    assert cache.set_many({"d": 4, "e": 5}) == ["d", "e"]
    assert cache.inc("d") == 5 and cache.dec("e", 2) == 3 and cache.inc("new", 3) == 3
    assert cache.inc("a") is None  # not a number
    assert cache.delete("d") is True and cache.delete("d") is False
    assert cache.delete_many("e", "missing") == ["e", "missing"]
    assert cache.get("e") is None


def test_timeouts_as_cachelib_defines_them(cache: SharedStateCache, shared: SharedState) -> None:
    """0 never expires, None uses the default, a number is seconds."""
    cache.set("forever", 1, timeout=0)
    cache.set("default", 1)
    cache.set("short", 1, timeout=60)
    assert shared.ttl("cache:3:c1:forever") is None
    assert 299 < (shared.ttl("cache:3:c1:default") or 0) <= 300
    assert 59 < (shared.ttl("cache:3:c1:short") or 0) <= 60
    cache.set("gone", 1, timeout=-1)  # already expired
    assert cache.get("gone") is None


def test_clear_removes_this_caches_keys_only(cache: SharedStateCache, shared: SharedState) -> None:
    """clear() empties this cache; another cache's entries and the app's own keys stay."""
    other = SharedStateCache(key_prefix="c2:")
    cache.set("a", 1)
    other.set("a", 2)
    shared.set("plain", 3)
    assert cache.clear() is True
    assert cache.get("a") is None
    assert other.get("a") == 2
    assert shared.get("plain") == 3


def test_flask_caching_factory(app: Flask, shared: SharedState) -> None:
    """CACHE_TYPE = 'flask_sharedstate.caching.SharedStateCache' builds one through
    Flask-Caching's factory, with CACHE_DEFAULT_TIMEOUT and CACHE_KEY_PREFIX."""
    from flask_caching import Cache

    app.config.update(
        CACHE_TYPE="flask_sharedstate.caching.SharedStateCache",
        CACHE_DEFAULT_TIMEOUT=42,
        CACHE_KEY_PREFIX="fc:",
    )
    cache = Cache(app)
    with app.app_context():
        cache.set("k", "v")
        assert cache.get("k") == "v"
        assert 41 < (shared.ttl("cache:3:fc:k") or 0) <= 42
        backend = app.extensions["cache"][cache]
        assert isinstance(backend, SharedStateCache)


def test_get_or_set_waiter_takes_over_from_a_runner_that_raises(
    shared: SharedState, app: Flask
) -> None:
    """The runner's error is its own; a waiter then computes the value itself."""
    import threading

    started = threading.Event()
    outcomes: dict[str, Any] = {}

    def failing() -> str:
        started.set()
        time.sleep(0.5)
        raise RuntimeError("the runner failed")

    def runner() -> None:
        with app.app_context():
            try:
                shared.get_or_set("cold", failing, ttl=60)
            except RuntimeError as exc:
                outcomes["runner"] = exc

    thread = threading.Thread(target=runner)
    thread.start()
    try:
        assert started.wait(30)
        with app.app_context():
            outcomes["waiter"] = shared.get_or_set("cold", lambda: "from the waiter", ttl=60)
    finally:
        thread.join(30)
    assert str(outcomes["runner"]) == "the runner failed"
    assert outcomes["waiter"] == "from the waiter"


def test_get_or_set_waiter_takes_over_from_a_runner_that_dies(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """A runner SIGKILLed mid-computation never hangs the others: its lock is freed (at
    once on the embedded server, after the lease on Redis) and a waiter computes."""
    runner = ctx.Process(target=cacheworkers.get_or_set_and_hang, args=(socket_path,))
    runner.start()
    procs.append(runner)
    wait_for(lambda: here.get("runner_started"), timeout=30, interval=0.05)
    os.kill(runner.pid, signal.SIGKILL)
    runner.join(10)
    started = time.monotonic()
    with here._app.app_context():  # type: ignore[union-attr]
        value = here.get_or_set("cold", lambda: "from the waiter", ttl=60, timeout=30)
    assert value == "from the waiter"
    assert time.monotonic() - started < 30


def test_clear_spares_a_cache_whose_prefix_starts_with_this_ones(
    app: Flask, shared: SharedState
) -> None:
    """clear() of the cache with key_prefix "a" leaves the entries of the cache "ab"
    (and of the cache with no prefix) alone."""
    with app.app_context():
        a, ab, bare = (SharedStateCache(key_prefix=p) for p in ("a", "ab", ""))
        a.set("x", 1)
        ab.set("x", 2)
        ab.set("cd", 3)
        bare.set("ax", 4)
        assert a.clear() is True
        assert a.get("x") is None
        assert (ab.get("x"), ab.get("cd"), bare.get("ax")) == (2, 3, 4)
        assert bare.clear() is True
        assert (ab.get("x"), bare.get("ax")) == (2, None)


def test_inc_returns_what_it_stores_as_cachelib_does(cache: SharedStateCache) -> None:
    """inc on a stored float returns the float it stores, as cachelib's SimpleCache does."""
    from cachelib import SimpleCache

    theirs = SimpleCache()
    for one in (cache, theirs):
        one.set("f", 1.5)
    assert cache.inc("f") == theirs.inc("f") == 2.5
    assert cache.get("f") == theirs.get("f") == 2.5
    assert cache.dec("f", 2) == theirs.dec("f", 2) == 0.5


def test_session_entry_is_stored_under_the_key_the_docs_give(run_dir: str) -> None:
    """A Flask-Session login set up as docs/integrations/session.md says is stored under
    the key that page gives, Flask-Session's own prefix included."""
    import re

    from flask import session
    from flask_session import Session

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "integrations", "session.md")) as f:
        page = f.read()
    documented = re.search(r"Each session is one entry \(`([^`]+)`", page)
    assert documented, "session.md no longer gives the stored key"
    pattern = re.escape(documented.group(1)).replace(re.escape("<sid>"), r"[\w-]+")

    app = Flask("session_app")
    app.config.update(
        SECRET_KEY="x" * 32,
        SESSION_TYPE="cachelib",
        SESSION_CACHELIB=SharedStateCache(key_prefix="session:"),
        SHAREDSTATE_BACKEND="memory",
    )
    shared = SharedState(app)
    Session(app)

    @app.post("/login")
    def login() -> str:
        session["user"] = "alice"
        return "ok"

    assert app.test_client().post("/login").status_code == 200
    with app.app_context():
        keys = list(shared.dict)
    assert len(keys) == 1 and re.fullmatch(pattern, keys[0]), (keys, pattern)
