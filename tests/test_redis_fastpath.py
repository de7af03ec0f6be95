"""The redis backend's direct path (commands sent on a pooled connection, past
redis-py's ``execute_command``): what it must keep of redis-py's own handling.

A reply that was not read never answers a later command (after a timeout, after
an exception in the middle of a read, or left on an idle connection); a forked
child opens its own connections; a connection Redis closed (a restart) is
replaced before a write is sent on it; commands are packed as the installed
redis-py packs them, and both ways of packing run. NOSCRIPT after SCRIPT FLUSH and
Sentinel failover are in test_redis.py and test_redis_production.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_client

from flask_sharedstate import SharedState, SharedStateUnavailable
from flask_sharedstate.backends.redis_client import redis_version

from conftest import free_port, make_app, sigstop, start_redis, stop_process, wait_for


@pytest.fixture
def own_redis(tmp_path: Any) -> Iterator[dict[str, Any]]:
    """A redis-server of this test's own, which the test may stop, kill and start again."""
    port = free_port()
    state: dict[str, Any] = {"port": port, "url": f"redis://127.0.0.1:{port}/0"}
    state["proc"] = start_redis(port, str(tmp_path))
    try:
        yield state
    finally:
        proc = state["proc"]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        stop_process(proc)


def _shared(run_dir: str, url: str, name: str, timeout: float) -> SharedState:
    """An app on the Redis at ``url`` (make_app needs the redis_url fixture, for a default)."""
    app = make_app("redis", run_dir, name=name, SHAREDSTATE_TIMEOUT=timeout)
    app.config["SHAREDSTATE_REDIS_URL"] = url
    return SharedState(app)


def _answered(url: str) -> bool:
    """Whether the Redis at ``url`` answers a PING on a new connection (so it runs again,
    and has answered what was queued before on the other connections too)."""
    client = redis_client.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis_client.RedisError:
        return False
    finally:
        client.close()


def test_after_a_timeout_each_operation_reads_its_own_reply(
    run_dir: str, redis_url: str, own_redis: dict[str, Any]
) -> None:
    """A write, then (another time) a read, time out on an open connection to a
    SIGSTOPped Redis, which answers late: the next write and read get their own replies."""
    shared = _shared(run_dir, own_redis["url"], "timeout", 1.0)
    proc = own_redis["proc"]
    late = [
        ("write", lambda: shared.incr("n"), lambda: shared.incr("m") == 1),
        ("read", lambda: shared.get("a"), lambda: shared.get("b") == "value of b"),
    ]
    try:
        shared.set("a", "value of a")
        shared.set("b", "value of b")
        shared.set("n", 100)
        for what, timed_out, own_reply in late:
            assert shared.get("b") == "value of b"  # the connection is open
            sigstop(proc.pid)
            try:
                with pytest.raises(SharedStateUnavailable, match="did not answer"):
                    timed_out()
            finally:
                proc.send_signal(signal.SIGCONT)
            wait_for(lambda: _answered(own_redis["url"]), timeout=20)
            assert own_reply(), what
    finally:
        shared.state().backend.close()


class _Interrupted(Exception):
    """Raised by a signal handler in the middle of a read."""


def test_an_exception_in_the_middle_of_a_read_does_not_leave_its_reply_behind(
    run_dir: str, redis_url: str, own_redis: dict[str, Any]
) -> None:
    """An exception raised (by a signal handler) while an incr waits for its reply: the
    connection is dropped, so after Redis answers late, the next incr reads its own."""
    shared = _shared(run_dir, own_redis["url"], "interrupted", 30.0)
    proc = own_redis["proc"]

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        shared.set("n", 100)
        sigstop(proc.pid)
        try:
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            with pytest.raises(_Interrupted):
                shared.incr("n")  # waits (up to 30 s) for the stopped Redis
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            proc.send_signal(signal.SIGCONT)
        wait_for(lambda: _answered(own_redis["url"]), timeout=20)
        assert shared.incr("m") == 1  # (the interrupted incr of n answers 101)
    finally:
        signal.signal(signal.SIGALRM, previous)
        shared.state().backend.close()


def test_an_idle_connection_with_an_unread_reply_is_not_used(
    run_dir: str, redis_url: str, own_redis: dict[str, Any]
) -> None:
    """A pooled connection that holds a reply nobody read (as after a caller's crash
    between send and read): the pool's check finds it, and the write gets its own reply."""
    shared = _shared(run_dir, own_redis["url"], "unread", 5.0)
    try:
        assert shared.incr("n") == 1  # one connection, now idle in the pool
        backend = shared.state().backend
        pool = backend.client.connection_pool
        # The pool lends its most recently returned connection first: this one, next.
        idle = pool.get_connection("GET") if redis_version() < (5, 3) else pool.get_connection()
        pool.release(idle)
        idle.send_command("INCRBY", backend._key("n"), 1000)  # its reply is left unread
        wait_for(lambda: idle.can_read(), timeout=20)
        assert shared.incr("n", 1) == 1002
        assert shared.get("n") == 1002
    finally:
        shared.state().backend.close()


def test_writes_after_a_redis_restart_go_on_a_new_connection(
    run_dir: str, redis_url: str, own_redis: dict[str, Any], tmp_path: Any
) -> None:
    """Redis restarted under an idle connection: the next write (never sent twice) is
    sent on a new connection and succeeds, rather than failing on the closed one."""
    shared = _shared(run_dir, own_redis["url"], "restart", 5.0)
    try:
        assert shared.incr("n") == 1
        for attempt in range(3):
            own_redis["proc"].send_signal(signal.SIGKILL)
            own_redis["proc"].wait(10)
            own_redis["proc"] = start_redis(own_redis["port"], str(tmp_path))
            assert shared.incr(f"w{attempt}") == 1  # a write, on a new connection
            shared.set(f"s{attempt}", [attempt])
            assert shared.get(f"s{attempt}") == [attempt]
    finally:
        shared.state().backend.close()


def test_a_forked_child_uses_connections_of_its_own(
    run_dir: str, redis_url: str, own_redis: dict[str, Any]
) -> None:
    """Parent and forked child (which inherits the parent's open, pooled connection)
    write and read at the same time, each many times: each reads its own replies."""
    shared = _shared(run_dir, own_redis["url"], "fork", 10.0)
    try:
        shared.set("parent", "p")
        shared.set("child", "c")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            code = 1
            try:
                os.close(read)
                ok = all(
                    shared.get("child") == "c" and shared.incr("child-n") == i + 1
                    for i in range(300)
                )
                os.write(write, b"ok" if ok else b"wrong reply")
                code = 0
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                os.write(write, repr(exc).encode()[:500])
            finally:
                os._exit(code)
        os.close(write)
        try:
            for i in range(300):
                assert shared.get("parent") == "p"
                assert shared.incr("parent-n") == i + 1
        finally:
            _, status = os.waitpid(pid, 0)
            with os.fdopen(read, "rb") as pipe:
                said = pipe.read().decode()
        assert said == "ok" and os.waitstatus_to_exitcode(status) == 0, said
        assert shared.get("child-n") == 300
        assert shared.incr("parent-n") == 301  # the parent's connection still works
    finally:
        shared.state().backend.close()


@pytest.mark.parametrize(
    "command",
    [
        ("GET", "{ns}:k:x"),
        ("EVALSHA", "0" * 40, 2, "{ns}:txn", "{ns}:k:é", b"\x80\x05N.", 1500),
        ("EVALSHA", "0" * 40, 1, "{ns}:txn", b"\x80" + b"\r\n" * 40_000, -1, 0),
        ("EVALSHA", "0" * 40, 0, *[str(i) for i in range(300)]),
    ],
    ids=["get", "evalsha", "large value", "many arguments"],
)
def test_the_backend_packs_commands_as_the_installed_redis_py_does(
    command: tuple[Any, ...],
) -> None:
    """redis_packing.pack writes each kind of command the backend sends byte for byte as
    the installed redis-py's own packer, and packs_like says so (the backend then packs)."""
    from redis.connection import Connection

    from flask_sharedstate.backends.redis_packing import pack, packs_like

    connection = Connection()  # (packs only: never connected)
    theirs = b"".join(bytes(part) for part in connection.pack_command(*command))
    assert pack(command) == theirs
    assert packs_like(connection)


@pytest.mark.parametrize("packed", [True, False], ids=["packed here", "packed by redis-py"])
def test_both_ways_of_packing_run_every_operation(
    redis_url: str, run_dir: str, packed: bool
) -> None:
    """The direct path runs every kind of operation, and loads its scripts again after
    SCRIPT FLUSH, whether it packs commands itself or leaves that to redis-py (its path
    where the two would differ)."""
    from test_redis_production import use_everything

    shared = _shared(run_dir, redis_url, f"packing-{packed}", 2.0)
    backend = shared.state().backend
    backend.packed = packed
    admin = redis_client.Redis.from_url(redis_url)
    try:
        use_everything(shared)
        admin.script_flush()
        assert shared.incr("after-flush", 2) == 2
        assert backend.packed is packed
    finally:
        admin.close()
        backend.close()
