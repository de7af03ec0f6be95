"""Locks whose holder lost them: a lease that ran out, a connection that dropped.

A holder must never believe it still holds a lock that another process may have
taken: ``release()`` and ``extend()`` raise :exc:`LockNotOwned` then. On Redis a
live holder's lease is renewed while it holds the lock, so working past
``SHAREDSTATE_LEASE`` loses nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import lock_workers
import pytest
import redis as redis_client

from flask_sharedstate import LockNotOwned, SharedState, SharedStateUnavailable

from conftest import _redis, kill_servers, make_app, server_pids, sigstop, wait_for

ctx = multiprocessing.get_context("spawn")


def redis_config(run_dir: str, lease: float = 2.0) -> dict[str, Any]:
    return {
        "SHAREDSTATE_BACKEND": "redis",
        "SHAREDSTATE_REDIS_URL": _redis["url"],
        "SHAREDSTATE_NAMESPACE": "locks-" + os.path.basename(run_dir),
        "SHAREDSTATE_KEY": "test-key-for-signing-values",
        "SHAREDSTATE_LEASE": lease,
    }


def other_thread(func: Any) -> Any:
    """Run ``func`` in another thread (another session) and return its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(func()))
    thread.start()
    thread.join(60)
    return out[0]


# -- extend -----------------------------------------------------------------------------


def test_extend_checks_ownership(shared: SharedState) -> None:
    """extend() succeeds for the holder on every backend, and refuses a lock not held."""
    lock = shared.lock("ext")
    with lock:
        assert lock.extend() is True
        assert lock.extend(5) is True
        assert lock.extend(additional_time=0.5) is True
        with pytest.raises(ValueError, match="additional_time"):
            lock.extend(-1)
    with pytest.raises(RuntimeError, match="not held"):
        lock.extend()


def test_extend_adds_to_the_lease_on_redis(redis_url: str, run_dir: str) -> None:
    """On Redis, extend(t) adds t seconds to the lock's lease; extend() resets it."""
    config = redis_config(run_dir)
    shared = SharedState(make_app("redis", run_dir, name="ext", **config))
    client = redis_client.Redis.from_url(redis_url)
    key = "{" + config["SHAREDSTATE_NAMESPACE"] + "}:lock:ext"
    try:
        lock = shared.lock("ext")
        with lock:
            assert 0 < client.pttl(key) <= 2000
            lock.extend(60)
            assert client.pttl(key) > 50_000
            lock.extend()
            assert 0 < client.pttl(key) <= 2000
        assert client.exists(key) == 0
    finally:
        client.close()
        shared.state().backend.close()


# -- Redis: leases -------------------------------------------------------------------------


def test_redis_lock_held_past_its_lease_stays_held(
    redis_url: str, run_dir: str, procs: list[Any]
) -> None:
    """A live holder working for three leases keeps its lock (renewed), no one else
    gets it meanwhile, and its release succeeds."""
    config = redis_config(run_dir, lease=2.0)
    here = lock_workers.make_shared(config)
    results = ctx.Queue()
    holder = ctx.Process(target=lock_workers.hold_for, args=(config, "work", 6.0, results))
    holder.start()
    procs.append(holder)
    try:
        assert results.get(timeout=60) == "held"
        taken = 0
        deadline = time.monotonic() + 60
        while holder.is_alive() and results.empty() and time.monotonic() < deadline:
            if here.lock("work").acquire(blocking=False):
                taken += 1
                here.lock("work").release()
            time.sleep(0.2)
        assert results.get(timeout=60) == "released"
        assert taken == 0, "another process took a lock its live holder still held"
        assert here.lock("work").acquire(timeout=5)
        here.lock("work").release()
    finally:
        here.state().backend.close()


def test_redis_holder_that_lost_its_lease_gets_lock_not_owned(
    redis_url: str, run_dir: str, procs: list[Any]
) -> None:
    """A holder stopped (SIGSTOP) past its lease loses the lock to another process;
    when it resumes, its release raises LockNotOwned."""
    config = redis_config(run_dir, lease=1.0)
    here = lock_workers.make_shared(config)
    results = ctx.Queue()
    go = ctx.Event()
    holder = ctx.Process(target=lock_workers.hold_until, args=(config, "job", go, results))
    holder.start()
    procs.append(holder)
    try:
        assert results.get(timeout=60) == "held"
        os.kill(holder.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            assert here.lock("job").acquire(timeout=30)  # the lease runs out
        finally:
            os.kill(holder.pid, signal.SIGCONT)  # type: ignore[arg-type]
        go.set()
        result = results.get(timeout=60)
        assert result.startswith("LockNotOwned:"), result
        assert "lease" in result and "SHAREDSTATE_LEASE" in result
        assert here.lock("job").locked()  # the holder's release did not free ours
        here.lock("job").release()
    finally:
        here.state().backend.close()


def test_redis_lock_of_finished_thread_is_not_renewed(redis_url: str, run_dir: str) -> None:
    """A thread that ends holding a lock stops renewing it: the lease frees it."""
    shared = SharedState(make_app("redis", run_dir, name="gone", **redis_config(run_dir, 1.0)))
    try:
        other_thread(lambda: shared.lock("left").acquire())
        assert shared.lock("left").locked()
        wait_for(lambda: not shared.lock("left").locked(), timeout=30, interval=0.1)
    finally:
        shared.state().backend.close()


# -- the state server: connections ------------------------------------------------------------


def manager_shared(run_dir: str, timeout: float = 3.0) -> SharedState:
    return SharedState(make_app("manager", run_dir, name="lost", SHAREDSTATE_TIMEOUT=timeout))


def test_lock_lost_with_its_connection_raises_lock_not_owned(run_dir: str) -> None:
    """The state server dies while a thread holds a lock; the thread's next call
    reconnects to a new server, where another client takes the lock: the old
    holder's release() raises LockNotOwned, and does not free the new holder's lock."""
    shared = manager_shared(run_dir)
    other = manager_shared(run_dir)  # another client of the same server
    try:
        lock = shared.lock("cart")
        lock.acquire()
        kill_servers(run_dir)
        assert shared.get("anything") is None  # reconnected: a new server
        assert other.lock("cart").acquire(blocking=False) is True
        with pytest.raises(LockNotOwned):
            lock.extend()
        with pytest.raises(
            LockNotOwned, match="connection to the state server .* was lost while the lock was held"
        ):
            lock.release()
        assert other.lock("cart").locked()  # the old holder freed nothing
        other.lock("cart").release()
    finally:
        shared.state().backend.close()
        other.state().backend.close()


def test_error_on_one_call_makes_held_locks_not_owned(run_dir: str) -> None:
    """A call that times out (server stopped) drops the connection, which frees the
    thread's locks in the server: their release() raises LockNotOwned, not a plain
    error and not silence. Acquiring again works."""
    shared = manager_shared(run_dir, timeout=2.0)
    other = manager_shared(run_dir, timeout=10.0)  # patient: the machine may be loaded
    try:
        lock = shared.lock("job")
        lock.acquire()
        (pid,) = server_pids(run_dir)
        sigstop(pid)
        try:
            with pytest.raises(SharedStateUnavailable):
                shared.get("k")
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: not other.lock("job").locked(), 30, 0.1)
        assert other.lock("job").acquire(timeout=10)
        with pytest.raises(LockNotOwned, match="another process may have taken it"):
            lock.release()
        with pytest.raises(RuntimeError, match="not held"):
            lock.release()  # reported once; now it is simply not held
        other.lock("job").release()
        assert lock.acquire(timeout=10)
        lock.release()
    finally:
        shared.state().backend.close()
        other.state().backend.close()
