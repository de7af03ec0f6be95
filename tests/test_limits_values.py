"""Limits on what one call may carry (message size, timeouts, ttls), large results,
savepoints of nested atomic blocks, and the shape of lost-block errors and the repr."""

from __future__ import annotations

import math
import os
import pickle
import signal
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from flask_sharedstate import AtomicBlockLost, SharedState
from flask_sharedstate.cli import sharedstate
from flask_sharedstate.operations import MAX_TIMEOUT, MAX_TTL, check_ttl
from flask_sharedstate.server import store
from flask_sharedstate.server.protocol import MAX_MESSAGE

from conftest import make_app, pid_alive, wait_for

MiB = 1024 * 1024

BAD_SECONDS = [math.inf, 1e300, math.nan, -1.0, "5", True]


def test_request_over_the_message_limit_is_refused(shared: SharedState) -> None:
    """set_many of two 40 MB values raises a ValueError naming the limit; nothing is written."""
    big = b"x" * (40 * 1000 * 1000)
    shared.set("a", b"before")
    with pytest.raises(ValueError, match="64 MiB"):
        shared.set_many({"a": big, "b": big})
    assert shared.get("a") == b"before"
    assert "b" not in shared.dict
    with pytest.raises(ValueError, match="64 MiB"):
        with shared.atomic():
            shared.dict["a"] = big
            shared.dict["b"] = big
    assert shared.get("a") == b"before" and "b" not in shared.dict


def test_results_over_the_message_limit_are_read_whole(
    app: Flask, shared: SharedState, tmp_path: Any
) -> None:
    """With ~80 MiB stored, items(), copy(), get_many() and the CLI dump return all of it."""
    values = {f"v{i}": bytes([i]) * (10 * MiB) for i in range(8)}
    for key, value in values.items():
        shared.set(key, value)
    shared.set("small", 1)
    expected = {**values, "small": 1}
    assert sum(len(v) for v in values.values()) > MAX_MESSAGE
    assert dict(shared.dict.items()) == expected
    assert shared.dict.copy() == expected
    assert shared.get_many(list(expected)) == expected
    if app.config["SHAREDSTATE_BACKEND"] == "memory":
        return  # the CLI needs a server that other processes can reach
    path = str(tmp_path / "dump.pickle")
    runner: FlaskCliRunner = app.test_cli_runner()
    result = runner.invoke(sharedstate, ["dump", path, "--format", "pickle"])
    assert result.exit_code == 0, result.output
    with open(path, "rb") as f:
        assert pickle.load(f)["data"] == expected


@pytest.mark.parametrize("timeout", BAD_SECONDS + [MAX_TIMEOUT * 2])
def test_bad_atomic_timeout_is_refused(shared: SharedState, timeout: Any) -> None:
    """atomic(timeout=...) must be finite seconds from 0 to the maximum: ValueError says so."""
    with pytest.raises(ValueError, match=r"atomic\(timeout=\.\.\.\).*0 to 1e\+09"):
        with shared.atomic(timeout=timeout):
            shared.dict.get("a")


@pytest.mark.parametrize("timeout", BAD_SECONDS + [MAX_TIMEOUT * 2])
def test_bad_acquire_timeout_is_refused(shared: SharedState, timeout: Any) -> None:
    """acquire(timeout=...) must be finite seconds from 0 to the maximum: ValueError says so."""
    with pytest.raises(ValueError, match=r"acquire\(timeout=\.\.\.\).*0 to 1e\+09"):
        shared.lock("x").acquire(timeout=timeout)


@pytest.mark.parametrize("ttl", BAD_SECONDS + [0, MAX_TTL * 2])
def test_bad_ttl_is_refused_by_every_operation(shared: SharedState, ttl: Any) -> None:
    """Every operation that takes a ttl refuses a bad one with ValueError, writing nothing."""
    shared.set("n", 1)
    calls = [
        lambda: shared.set("k", 1, ttl=ttl),
        lambda: shared.set_many({"k": 1}, ttl=ttl),
        lambda: shared.incr("k", ttl=ttl),
        lambda: shared.setdefault("k", 1, ttl=ttl),
        lambda: shared.expire("n", ttl),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"ttl must be .*1e\+09"):
            call()
        with pytest.raises(ValueError, match=r"ttl must be .*1e\+09"):
            with shared.atomic():
                call()
    assert shared.dict.copy() == {"n": 1}
    assert shared.ttl("n") is None


def test_longest_ttl_is_accepted(shared: SharedState) -> None:
    """The longest ttl allowed works on every backend, and the key then has that ttl."""
    shared.set("k", 1, ttl=MAX_TTL)
    remaining = shared.ttl("k")
    assert remaining is not None and MAX_TTL - 60 < remaining <= MAX_TTL
    assert shared.expire("k", MAX_TTL) is True


@pytest.mark.parametrize("ttl", [*BAD_SECONDS, 0, MAX_TTL * 2, None, 0.001, 5, MAX_TTL])
def test_store_checks_ttl_as_the_faces_do(ttl: Any) -> None:
    """The store's ttl check accepts and refuses exactly what operations.check_ttl does."""
    try:
        expected: Any = check_ttl(ttl)
    except ValueError:
        expected = ValueError
    try:
        got: Any = store._check_ttl(ttl)
    except ValueError:
        got = ValueError
    assert got == expected


@pytest.mark.parametrize("backend_name", ["manager", "manager-tcp"])
def test_bad_call_keeps_the_locks_held(run_dir: str, backend_name: str) -> None:
    """A refused argument never drops the connection: the thread still holds its lock."""
    app = make_app(backend_name, run_dir, SHAREDSTATE_TIMEOUT=3.0)
    shared = SharedState(app)
    big = b"x" * (40 * 1000 * 1000)
    bad_calls = [
        lambda: shared.set_many({"a": big, "b": big}),
        lambda: shared.set("a", 1, ttl=1e300),
        lambda: shared.set("a", 1, ttl=math.inf),
        lambda: shared.lock("other").acquire(timeout=math.inf),
        lambda: shared.lock("other").acquire(timeout=1e300),
    ]
    with app.app_context():
        lock = shared.lock("held")
        lock.acquire()
        try:
            for call in bad_calls:
                with pytest.raises(ValueError):
                    call()
            for timeout in (math.inf, 1e300):
                with pytest.raises(ValueError):
                    with shared.atomic(timeout=timeout):
                        shared.dict.get("a")
            assert lock.locked()
        finally:
            lock.release()  # raises if the connection (and the lock with it) was dropped
        app.extensions["sharedstate"].backend.close()


# -- savepoints -----------------------------------------------------------------------


def test_inner_block_that_raises_rolls_back_to_its_start(shared: SharedState) -> None:
    """An inner atomic block that raises drops its own writes; the outer block goes on."""
    shared.dict.update(cart=["apple"], n=1, keep="me", doc={"a": [1]})
    with shared.atomic():
        cart = shared.dict["cart"]
        cart.append("pear")
        shared.dict["outer"] = 1
        with pytest.raises(ZeroDivisionError):
            with shared.atomic():
                cart.append("plum")
                shared.dict["doc"]["a"].append(2)
                shared.dict["inner"] = 1
                del shared.dict["keep"]
                shared.incr("n", 5)
                shared.dict["outer"] = 2
                shared.expire("cart", 60)
                raise ZeroDivisionError
        assert shared.dict["cart"] == ["apple", "pear"]
        assert cart == ["apple", "pear"]  # restored in place: the outer's own list
        assert shared.dict["doc"] == {"a": [1]}
        assert "inner" not in shared.dict and shared.dict["keep"] == "me"
        assert shared.dict["n"] == 1 and shared.dict["outer"] == 1
        cart.append("fig")
        shared.incr("n")
    assert shared.dict.copy() == {
        "cart": ["apple", "pear", "fig"],
        "n": 2,
        "keep": "me",
        "doc": {"a": [1]},
        "outer": 1,
    }
    assert shared.ttl("cart") is None


def test_inner_block_that_succeeds_keeps_its_writes(shared: SharedState) -> None:
    """An inner block that exits normally keeps its writes, even if a later one raises."""
    with shared.atomic():
        with shared.atomic():
            shared.dict["first"] = 1
        with pytest.raises(KeyError):
            with shared.atomic():
                shared.dict["second"] = 2
                with shared.atomic():
                    shared.dict["third"] = 3
                raise KeyError("x")
    assert shared.dict.copy() == {"first": 1}


# -- shape ------------------------------------------------------------------------------


def test_lost_block_raises_atomic_block_lost_on_the_manager(run_dir: str) -> None:
    """A block whose state server was replaced mid-block raises AtomicBlockLost."""
    app = make_app("manager", run_dir, SHAREDSTATE_TIMEOUT=3.0)
    shared = SharedState(app)
    backend = app.extensions["sharedstate"].backend
    with app.app_context():
        shared.dict["a"] = 1
        try:
            with pytest.raises(AtomicBlockLost, match="nothing of it was written"):
                with shared.atomic():
                    shared.dict["a"] += 1
                    pid = backend.server_pid()
                    os.kill(pid, signal.SIGKILL)
                    wait_for(lambda: not pid_alive(pid), timeout=10)
                    # A read (sent again after a lost reply) moves this thread to a new
                    # server; the block's next read finds its claim gone.
                    assert backend.call("get", "c") is None
                    assert backend.server_pid() != pid
                    shared.dict.get("b")
        finally:
            backend.close()


def test_lost_block_raises_atomic_block_lost_on_redis(redis_url: str, run_dir: str) -> None:
    """A block whose lease ran out raises AtomicBlockLost at commit, writing nothing."""
    import time

    app = make_app("redis", run_dir, SHAREDSTATE_TIMEOUT=3.0, SHAREDSTATE_LEASE=1.0)
    shared = SharedState(app)
    with app.app_context():
        shared.dict["a"] = 1
        with pytest.raises(AtomicBlockLost, match="nothing of it was written"):
            with shared.atomic():
                shared.dict["a"] += 1
                time.sleep(2.5)  # past the 1 s lease: the claim expires in Redis
        assert shared.dict["a"] == 1


def test_repr_says_what_it_is_bound_to(run_dir: str) -> None:
    """repr(SharedState) names the app, backend and address, and never the key."""
    key = "k" * 32
    app = make_app("manager", run_dir, name="repr_app", SHAREDSTATE_KEY=key)
    shared = SharedState(app)
    text = repr(shared)
    assert text.startswith("<SharedState app='repr_app' backend=manager address=")
    assert os.path.join(run_dir, "repr_app.sock") in text
    assert key not in text
    assert repr(SharedState()) == "<SharedState (no app)>"
