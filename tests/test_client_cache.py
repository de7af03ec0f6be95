"""The read cache of the manager backend: restarts, bounds, a damaged table, status."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.backends.client_cache import ReadCache
from flask_sharedstate.cli import sharedstate
from flask_sharedstate.server import versions

import workers
from conftest import make_app, pid_alive, server_pids, sigstop, wait_for


@pytest.fixture
def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, "app.sock")


@pytest.fixture
def clients(socket_path: str) -> Iterator[list[SharedState]]:
    """SharedStates a test makes (each its own backend, as separate workers have); closed after."""
    made: list[SharedState] = []
    yield made
    for shared in made:
        shared.state().backend.close()


def client(clients: list[SharedState], socket_path: str, **config: Any) -> SharedState:
    shared = workers.make_shared(socket_path, **config)
    clients.append(shared)
    return shared


def cache_of(shared: SharedState) -> ReadCache:
    cache = shared.state().backend.read_cache
    assert cache is not None
    return cache


def the_server(run_dir: str) -> int:
    pids = server_pids(run_dir)
    assert len(pids) == 1, pids
    return pids[0]


# -- a new server never lets a worker serve an old server's values ---------------------


def test_killed_server_values_are_never_served_by_its_successor(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """After SIGKILL and a new server (empty: no persistence), a worker's cached value of
    the dead server is not served, though nobody wrote that key on the new server."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    here.set("k", "old")
    assert here.get("k") == "old"
    hits = cache_of(here).hits
    assert here.get("k") == "old"
    assert cache_of(here).hits == hits + 1  # the value is cached
    old = the_server(run_dir)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old))
    other.set("x", 1)  # elects and starts the successor; it never hears of "k"
    assert the_server(run_dir) != old
    assert here.get("k") is None
    assert "k" not in here.dict
    assert here.get_many(["k", "x"]) == {"k": None, "x": 1}


def test_stopped_and_replaced_server_invalidates_at_once(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A server stopped by SIGTERM leaves the table untrusted at once: the next read is a
    round trip, which starts a new server, and finds the key absent there."""
    here = client(clients, socket_path)
    here.set("k", [1, 2])
    assert here.get("k") == [1, 2]
    old = the_server(run_dir)
    table = versions.table_path(socket_path)
    inode = os.stat(table).st_ino
    os.kill(old, signal.SIGTERM)
    wait_for(lambda: not pid_alive(old))
    misses = cache_of(here).misses
    assert here.get("k") is None
    assert cache_of(here).misses == misses + 1
    assert the_server(run_dir) != old
    assert os.stat(table).st_ino == inode  # reused in place: old mappings see the new server


def test_stopped_server_is_noticed_within_the_heartbeat_bound(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A server that stops beating (SIGSTOP) is noticed: once the heartbeat is older than
    the bound, reads go to the server, and fail as any read of a stopped server does."""
    here = client(clients, socket_path, SHAREDSTATE_TIMEOUT=1.0)
    here.set("k", "v")
    assert here.get("k") == "v"
    pid = the_server(run_dir)
    sigstop(pid)
    try:
        time.sleep(versions.HEARTBEAT_BOUND + 1.0)  # generous: the bound is 1 s
        with pytest.raises(SharedStateUnavailable):
            here.get("k")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert here.get("k") == "v"  # a new connection to the same server, which beats again


def test_clear_invalidates_every_cached_value(socket_path: str, clients: list[SharedState]) -> None:
    """clear() in one worker: no other worker serves any value it cached before."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    other.set_many({"a": 1, "b": "two"})
    assert here.get_many(["a", "b"]) == {"a": 1, "b": "two"}
    assert here.get("a") == 1 and here.get("b") == "two"
    other.dict.clear()
    assert here.get("a") is None and "b" not in here.dict


def test_get_many_sees_a_change_to_any_of_its_keys(
    socket_path: str, clients: list[SharedState]
) -> None:
    """get_many of cached keys answers from the cache only if none changed or expired."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    other.set_many({"a": [1], "b": [2]})
    other.set("c", [3], ttl=0.3)
    assert here.get_many(["a", "b", "c"]) == {"a": [1], "b": [2], "c": [3]}
    hits = cache_of(here).hits
    assert here.get_many(["a", "b"]) == {"a": [1], "b": [2]}
    assert cache_of(here).hits == hits + 2
    other.set("b", [20])
    assert here.get_many(["a", "b"]) == {"a": [1], "b": [20]}
    wait_for(lambda: here.get_many(["a", "c"]) == {"a": [1], "c": None}, timeout=10)


def test_expired_key_is_absent_from_cached_reads(
    socket_path: str, clients: list[SharedState]
) -> None:
    """Keys read (and cached) before their ttl ran out are absent from the first read after
    their deadline, with no write between (and before the server's sweep could bump them)."""
    here = client(clients, socket_path)
    ttls = [0.3, 0.5, 0.7, 0.9, 1.1]
    acked = {}
    for i, ttl in enumerate(ttls):
        here.set(f"t{i}", "soon gone", ttl=ttl)
        acked[i] = time.monotonic()
    for i in range(len(ttls)):
        assert here.get(f"t{i}") == "soon gone"
        assert here.get(f"t{i}") == "soon gone"
    hits = cache_of(here).hits
    assert hits >= len(ttls)
    late = []
    for i, ttl in enumerate(ttls):
        time.sleep(max(0.0, acked[i] + ttl - time.monotonic()) + 0.001)
        if here.get(f"t{i}") is not None:
            late.append(i)
    assert late == []
    assert all(here.state().backend.call("get", f"t{i}") is None for i in range(len(ttls)))


def test_forked_child_keeps_a_correct_cache(socket_path: str, clients: list[SharedState]) -> None:
    """A forked child reads the parent's cached values, and sees a change made after the fork."""
    here = client(clients, socket_path)
    here.set("k", "before")
    assert here.get("k") == "before"
    read_r, read_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            first = here.get("k")
            os.read(go_r, 1)
            second = here.get("k")
            os.write(read_w, repr((first, second)).encode())
        finally:
            os._exit(0)
    os.close(read_w)
    os.close(go_r)
    time.sleep(0.2)
    other = client(clients, socket_path)
    other.set("k", "after")
    os.write(go_w, b"x")
    result = os.read(read_r, 200).decode()
    os.waitpid(pid, 0)
    os.close(read_r)
    os.close(go_w)
    assert result == repr(("before", "after"))


# -- bounded memory ----------------------------------------------------------------------


def test_least_recently_used_go_first_within_the_bound(
    socket_path: str, clients: list[SharedState]
) -> None:
    """With room for about three values, reading a fourth evicts the least recently used."""
    here = client(clients, socket_path, SHAREDSTATE_CLIENT_CACHE=4000)
    cache = cache_of(here)
    for name in "abcd":
        here.set(name, [[name.encode() * 1000]])  # a nested list (kept pickled): ~1,020 bytes
    for name in "abc":
        here.get(name)
    here.get("a")  # now b is the least recently used
    here.get("d")
    assert cache.size <= 4000
    hits, misses = cache.hits, cache.misses
    assert here.get("a") == [[b"a" * 1000]] and here.get("d") == [[b"d" * 1000]]
    assert (cache.hits, cache.misses) == (hits + 2, misses)
    assert here.get("b") == [[b"b" * 1000]]
    assert cache.misses == misses + 1  # b was evicted


def test_a_key_hit_again_after_a_fill_is_the_most_recent_again(
    socket_path: str, clients: list[SharedState]
) -> None:
    """A hit of the key hit last, after another key went in behind it, moves it to the end."""
    here = client(clients, socket_path, SHAREDSTATE_CLIENT_CACHE=4000)
    cache = cache_of(here)
    for name in "abcd":
        here.set(name, [[name.encode() * 1000]])  # a nested list (kept pickled): ~1,020 bytes
    here.get("a")
    here.get("a")  # a hit: a is the key last moved to the end
    here.get("b")  # b goes in after a
    here.get("c")
    hits = cache.hits
    here.get("a")  # a hit again: a must become the most recent, though a hit of it was last
    assert cache.hits == hits + 1
    here.get("d")  # evicts the least recently used: b, not a
    misses = cache.misses
    assert here.get("a") == [[b"a" * 1000]]
    assert cache.misses == misses  # a was kept
    assert here.get("b") == [[b"b" * 1000]]
    assert cache.misses == misses + 1  # b was evicted


def test_values_over_the_bound_are_never_cached(
    socket_path: str, clients: list[SharedState]
) -> None:
    """A value larger than SHAREDSTATE_CLIENT_CACHE_MAX_VALUE is read from the server each time."""
    here = client(clients, socket_path, SHAREDSTATE_CLIENT_CACHE_MAX_VALUE=500)
    cache = cache_of(here)
    here.set("big", "x" * 1000)
    here.set("small", "x" * 10)
    for _ in range(3):
        assert here.get("big") == "x" * 1000
        assert here.get("small") == "x" * 10
        assert "big" in here.dict
    assert cache.misses == 3 + 1 + 3  # every read of big (get and in), the first of small
    assert cache.hits == 2
    assert cache.stats()["entries"] == 1


def test_zero_turns_the_cache_off(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """SHAREDSTATE_CLIENT_CACHE = 0: no cache, every read a round trip, nothing reported."""
    here = client(clients, socket_path, SHAREDSTATE_CLIENT_CACHE=0)
    assert here.state().backend.read_cache is None
    here.set("k", 1)
    assert [here.get("k") for _ in range(3)] == [1, 1, 1]
    assert here.state().backend.call("info")["read_cache"]["workers"] == {}


def test_tcp_has_no_read_cache(run_dir: str, clients: list[SharedState]) -> None:
    """Over TCP the table cannot be mapped: the cache is off, reads go to the server."""
    app = make_app("manager-tcp", run_dir, "tcp_app", SECRET_KEY="x" * 32)
    shared = SharedState(app)
    clients.append(shared)
    assert shared.state().backend.read_cache is None
    shared.set("k", 1)
    assert shared.get("k") == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SHAREDSTATE_CLIENT_CACHE", -1),
        ("SHAREDSTATE_CLIENT_CACHE", "lots"),
        ("SHAREDSTATE_CLIENT_CACHE", 1.5),
        ("SHAREDSTATE_CLIENT_CACHE_MAX_VALUE", True),
    ],
)
def test_bad_sizes_are_config_errors(run_dir: str, key: str, value: object) -> None:
    """A size that is not a whole number of bytes >= 0 is refused at init_app, naming the key."""
    app = make_app("manager", run_dir, **{key: value})
    with pytest.raises(ConfigError, match=key):
        SharedState(app)


def test_sizes_as_text_are_read(run_dir: str) -> None:
    """Sizes from the environment (text) are read as numbers."""
    app = make_app("manager", run_dir, SHAREDSTATE_CLIENT_CACHE="1000")
    assert SharedState(app).state().settings.client_cache == 1000


# -- the table is never trusted beyond version numbers ------------------------------------


def test_table_is_private_beside_the_socket(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """The version table is a 0600 file of this user's, in the socket's private folder."""
    here = client(clients, socket_path)
    here.set("k", 1)
    info = os.lstat(versions.table_path(socket_path))
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    assert info.st_size == versions.table_size()


def _overwrite(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_corrupt_table_costs_round_trips_never_wrong_values(
    socket_path: str, clients: list[SharedState]
) -> None:
    """A table whose header is garbage is refused: reads are round trips, and right."""
    writer = client(clients, socket_path)
    writer.set("k", "one")
    _overwrite(versions.table_path(socket_path), 0, os.urandom(24))  # magic, layout, slots
    here = client(clients, socket_path)
    cache = cache_of(here)
    for value in ("one", "two", "three"):
        writer.set("k", value)
        assert here.get("k") == value
        assert here.get("k") == value
    assert cache.hits == 0 and cache.misses == 6


def test_scribbled_versions_cost_round_trips_never_wrong_values(
    socket_path: str, clients: list[SharedState]
) -> None:
    """Slots overwritten with random numbers (even a lower version) only cost misses."""
    here = client(clients, socket_path)
    writer = client(clients, socket_path)
    writer.set("k", "one")
    assert here.get("k") == "one"
    table = versions.table_path(socket_path)
    words = versions.table_size() // 8
    _overwrite(table, versions.HEADER_WORDS * 8, os.urandom((words - versions.HEADER_WORDS) * 8))
    writer.set("k", "two")
    assert here.get("k") == "two"
    _overwrite(table, versions.HEADER_WORDS * 8, bytes((words - versions.HEADER_WORDS) * 8))
    writer.set("k", "three")
    assert here.get("k") == "three"


def test_foreign_table_is_not_trusted(socket_path: str, clients: list[SharedState]) -> None:
    """A table replaced by another file (a new inode, a well-formed header, another
    instance id) never validates the server's values: right values throughout; the server
    notices and takes the new file over, after which reads hit again."""
    writer = client(clients, socket_path)
    writer.set("k", "one")
    table = versions.table_path(socket_path)
    with open(table, "rb") as f:
        content = bytearray(f.read())
    content[versions.INSTANCE_WORD * 8 : versions.INSTANCE_WORD * 8 + 8] = os.urandom(8)
    aside = table + ".new"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, bytes(content))
    os.close(fd)
    os.rename(aside, table)
    here = client(clients, socket_path)
    for value in ("one", "two"):
        writer.set("k", value)
        assert here.get("k") == value
        assert here.get("k") == value

    hits = cache_of(here).hits

    def hits_again() -> bool:
        writer.set("k", "three")
        assert here.get("k") == "three" and here.get("k") == "three"
        return cache_of(here).hits > hits

    wait_for(hits_again, timeout=15, interval=0.2)


def test_deleted_table_is_retired_and_replaced(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A table deleted under a running server: the server retires the old file (workers
    that mapped it stop trusting it) and makes a new one, which workers then use."""
    here = client(clients, socket_path)
    writer = client(clients, socket_path)
    writer.set("k", "one")
    assert here.get("k") == "one" and here.get("k") == "one"
    table = versions.table_path(socket_path)
    inode = os.stat(table).st_ino
    os.unlink(table)
    wait_for(lambda: os.path.exists(table), timeout=15)
    assert os.stat(table).st_ino != inode
    misses = cache_of(here).misses
    assert here.get("k") == "one"  # the old table is retired: a round trip
    assert cache_of(here).misses == misses + 1

    hits = cache_of(here).hits

    def hits_again() -> bool:
        writer.set("k", "two")
        assert here.get("k") == "two" and here.get("k") == "two"
        return cache_of(here).hits > hits

    wait_for(hits_again, timeout=15, interval=0.2)


def test_truncated_table_is_grown_in_place_by_the_next_server(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A short table file left behind is taken over (grown, same inode) by a new server,
    and a worker that finds a short one before that refuses it."""
    table = versions.table_path(socket_path)
    fd = os.open(table, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    inode = os.stat(table).st_ino
    with pytest.raises(OSError):
        from flask_sharedstate.backends.client_cache import _Table

        _Table(table)
    here = client(clients, socket_path)
    here.set("k", "v")
    assert here.get("k") == "v" and here.get("k") == "v"
    assert cache_of(here).hits == 1
    assert os.stat(table).st_ino == inode
    assert os.stat(table).st_size == versions.table_size()


def test_planted_symlink_is_not_followed(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A symbolic link where the table goes is never followed (its target is untouched):
    the server runs without a table, workers read through, values are right."""
    victim = os.path.join(run_dir, "victim")
    with open(victim, "wb") as f:
        f.write(b"precious\n")
    os.symlink(victim, versions.table_path(socket_path))
    here = client(clients, socket_path)
    here.set("k", "v")
    assert here.get("k") == "v" and here.get("k") == "v"
    assert cache_of(here).hits == 0
    with open(victim, "rb") as f:
        assert f.read() == b"precious\n"
    assert here.state().backend.call("info")["read_cache"] is None
    with open(socket_path + ".log") as f:
        assert "symbolic link" in f.read()


# -- atomic blocks, status ---------------------------------------------------------------


def test_atomic_blocks_never_read_through_the_cache(
    socket_path: str, clients: list[SharedState]
) -> None:
    """Reads inside an atomic block claim the key on the server (txn_read), never hit."""
    here = client(clients, socket_path)
    here.set("n", 1)
    assert here.get("n") == 1
    cache = cache_of(here)
    counts = cache.hits, cache.misses
    with here.atomic():
        assert here.get("n") == 1
        assert here.dict["n"] == 1 and "n" in here.dict
        here.set("n", 2)
    assert (cache.hits, cache.misses) == counts
    assert here.get("n") == 2


def test_status_shows_the_hit_rate(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """flask sharedstate status shows the hit rate the workers reported, per process."""
    here = client(clients, socket_path)
    here.set("k", 1)
    for _ in range(9):
        here.get("k")
    time.sleep(1.1)  # misses report at most once a second
    here.get("other")  # a miss: reports the counts (8 hits, 2 misses)
    app = Flask("worker_app")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    SharedState(app)
    result = app.test_cli_runner().invoke(sharedstate, ["status"])
    assert result.exit_code == 0, result.output
    assert "read cache:  80.0% hits (8 hits, 2 misses, 1 processes)" in result.output
    assert f"pid {os.getpid()}: 80.0% hits" in result.output


def test_a_process_that_only_hits_reports_its_counts(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """Hits alone report the counts too, at most once a second: status is never long behind."""
    here = client(clients, socket_path)
    here.set("k", 1)
    for _ in range(6):  # a miss (which reports 0 hits, 1 miss), then 5 hits
        here.get("k")
    time.sleep(1.1)  # a report is due again
    here.get("k")  # a hit: reports 6 hits, 1 miss
    assert cache_of(here).stats()["hits"] == 6
    app = Flask("worker_app")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    SharedState(app)
    result = app.test_cli_runner().invoke(sharedstate, ["status"])
    assert result.exit_code == 0, result.output
    assert "read cache:  85.7% hits (6 hits, 1 misses, 1 processes)" in result.output


def test_one_shared_state_on_two_apps_reads_each_apps_own_values(
    run_dir: str, clients: list[SharedState]
) -> None:
    """The app factory pattern: cached reads of one SharedState in turn in two apps'
    contexts (and outside any) each read their own app's value."""
    shared = SharedState()
    one = make_app("manager", run_dir, name="one")
    two = make_app("manager", run_dir, name="two")
    shared.init_app(one)
    shared.init_app(two)
    try:
        for app, who in ((one, "one"), (two, "two")):
            with app.app_context():
                shared.set("who", who)
                assert shared.state().cache is not None
        for _ in range(3):  # the first of each a miss, then hits
            for app, who in ((one, "one"), (two, "two")):
                with app.app_context():
                    assert shared.get("who") == who
                    assert shared.dict["who"] == who
                    assert "who" in shared.dict
                    assert shared.get("only " + who) is None
        for app in (one, two):
            assert app.extensions["sharedstate"].cache.hits >= 6
        with pytest.raises(RuntimeError, match="outside of application context"):
            shared.get("who")  # the last app's state is never used outside its context
    finally:
        for app in (one, two):
            app.extensions["sharedstate"].backend.close()


class Box:
    """A value of a class of its own (a pickle the cache keeps as bytes)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.items == self.items


@pytest.mark.parametrize(
    "value",
    [
        {f"k{i}": i for i in range(10)},
        [1, "two", 3.0, None, b"five"],
        {1, 2, 3},
        {"nested": [1, 2]},
        [[1], [2]],
        Box([1, 2]),
    ],
    ids=["dict", "list", "set", "nested-dict", "nested-list", "object"],
)
def test_every_cached_read_is_a_fresh_copy(
    clients: list[SharedState], socket_path: str, value: Any
) -> None:
    """Changing what a cached read returned changes neither the cache nor the next read,
    however the cache keeps the value (as itself plus a copy, or as its pickle)."""
    here = client(clients, socket_path)
    here.set("v", value)
    first = here.get("v")  # a miss: the entry is filled
    hits = cache_of(here).hits
    second = here.get("v")
    assert cache_of(here).hits == hits + 1
    assert first == second == value
    assert first is not second
    for got in (first, second):
        if isinstance(got, dict):
            got.setdefault("nested", []).append(9)  # type: ignore[union-attr]
            got["new"] = 1
        elif isinstance(got, (list, set)):
            if isinstance(got, list) and got and isinstance(got[0], list):
                got[0].append(9)
            (got.append if isinstance(got, list) else got.add)(99)  # type: ignore[union-attr]
        else:
            got.items.append(9)
    assert here.get("v") == value
    assert cache_of(here).hits == hits + 2
