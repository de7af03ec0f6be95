"""Probes of the read cache: every write path, restarts, namespaces, threads, signals.

Each probe caches a value in one worker (its own backend and read cache), changes it
from another, and reads it in the first right after the change was acknowledged.
"""

# The fixtures socket_path and clients come from test_client_cache (imported, so pytest sees them).
# ruff: noqa: F811

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import historyworkers
import pytest
from flask import Flask
from test_client_cache import cache_of, client, clients, socket_path  # noqa: F401 - fixtures
from test_disk_full import fill, fill_last_page, mounted
from test_read_history import run_history, violations

from flask_sharedstate import NotPersisted, SharedState, SharedStateUnavailable
from flask_sharedstate.cli import sharedstate
from flask_sharedstate.server import versions

import workers
from conftest import pid_alive, server_pids, sigstop, wait_for
from servers import start_gunicorn


def cached(shared: SharedState, key: str, expected: Any) -> None:
    """Read ``key`` twice: the second read is a cache hit that returns ``expected``."""
    assert shared.get(key) == expected
    hits = cache_of(shared).hits
    assert shared.get(key) == expected
    assert cache_of(shared).hits == hits + 1, "the value was not cached"


def _call(op: str, *args: Any) -> Callable[[SharedState], Any]:
    return lambda s: s.state().backend.call(op, *args)


def _atomic(s: SharedState) -> None:
    with s.atomic():
        s.dict["k"] = s.dict["k"] + ["atomic"]


# (name, value before, change made by the other worker, value after)
WRITES: list[tuple[str, Any, Callable[[SharedState], Any], Any]] = [
    ("set", ["a"], lambda s: s.set("k", ["b"]), ["b"]),
    ("set_many", ["a"], lambda s: s.set_many({"k": ["b"], "z": 1}), ["b"]),
    ("delete", ["a"], lambda s: s.delete("k"), None),
    ("pop", ["a"], lambda s: s.pop("k"), None),
    ("dict_del", ["a"], lambda s: s.dict.__delitem__("k"), None),
    ("setdefault_absent", None, lambda s: s.setdefault("k", ["b"]), ["b"]),
    ("incr", 1, lambda s: s.incr("k", 5), 6),
    ("incr_float", 1.5, lambda s: s.incr("k", 1), 2.5),
    ("compare_and_set", ["a"], lambda s: s.compare_and_set("k", ["a"], ["b"]), ["b"]),
    ("dict_clear", ["a"], lambda s: s.dict.clear(), None),
    ("atomic", ["a"], _atomic, ["a", "atomic"]),
    (
        "window_acquire",
        None,
        _call("window_acquire", "k", 5, 60.0, 1, 1000.0),
        [1000.0],
    ),
    ("sliding_acquire", None, _call("sliding_acquire", "p", "k", 5, 1, 0.5, 60.0), 1),
]


@pytest.mark.parametrize("name,before,change,after", WRITES, ids=[w[0] for w in WRITES])
def test_every_write_path_invalidates_a_cached_value(
    socket_path: str,
    clients: list[SharedState],
    name: str,
    before: Any,
    change: Callable[[SharedState], Any],
    after: Any,
) -> None:
    """A value (or an absence) cached by one worker is not served after another worker's
    acknowledged change, whatever operation made it."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    if before is not None:
        other.set("k", before)
    cached(here, "k", before)
    change(other)
    assert here.get("k") == after
    assert ("k" in here.dict) == (after is not None)
    assert here.get_many(["k", "never"]) == {"k": after, "never": None}


def test_expire_shorter_longer_and_without_ttl_is_honoured(
    socket_path: str, clients: list[SharedState]
) -> None:
    """expire() from another worker moves the cached deadline: a value made to expire
    sooner is absent from cached reads once that deadline passes, and one given a longer
    ttl (or a ttl where it had none) is still served past its old deadline."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    other.set("short", "v", ttl=30)
    other.set("long", "v", ttl=0.5)
    other.set("none", "v")
    for key in ("short", "long", "none"):
        cached(here, key, "v")
    assert other.expire("short", 0.5)
    assert other.expire("long", 30)
    assert other.expire("none", 0.5)
    cached(here, "short", "v")
    cached(here, "none", "v")
    time.sleep(1.0)
    assert here.get("short") is None
    assert here.get("none") is None
    assert here.get("long") == "v"
    assert other.expire("long", None)
    cached(here, "long", "v")


def test_defaults_applied_by_a_new_server_are_not_hidden_by_a_cached_absence(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A worker that cached "absent" for a default key deleted on the old server sees the
    default again once a new (empty) server applied it."""
    here = client(clients, socket_path)
    app = Flask("worker_app")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    other = SharedState(app, defaults={"d": "default"})
    clients.append(other)
    assert other.get("d") == "default"
    other.delete("d")
    cached(here, "d", None)
    [old] = server_pids(run_dir)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old))
    assert other.get("x") is None  # starts the successor, which applies the default
    assert here.get("d") == "default"


def test_threads_filling_and_evicting_a_tiny_cache_never_read_stale(run_dir: str) -> None:
    """2 writer processes and 2 reader processes of 8 threads each, whose shared read cache
    holds about two entries (every miss evicts): no exception, and every read keeps to
    the acknowledged history."""

    roles = [historyworkers.writer] * 2 + [historyworkers.threaded_reader] * 2
    writes, reads, runs = run_history(run_dir, roles, 2.0)
    errors: list[str] = []
    hits = evictions = 0
    for data in runs:
        errors += data.get("errors", [])
        stats = data.get("stats", {})
        hits += stats.get("hits", 0)
        if "entries" in stats and "errors" in data:
            evictions += stats["entries"] <= 3
    assert errors == []
    assert len(writes) > 100 and len(reads) > 1000, f"{len(writes)} writes, {len(reads)} reads"
    assert hits > 100, f"only {hits} cache hits: the cache was not exercised"
    assert evictions == 2, "a threaded reader's cache held more than three entries"
    found = violations(writes, reads)
    assert not found, f"{len(found)} of {len(reads)} reads broke the history:\n" + "\n".join(
        found[:5]
    )


@pytest.mark.parametrize("master_reads", ["0", "1"], ids=["plain", "master-cached"])
def test_preloaded_recycled_gunicorn_workers_never_read_stale(
    servers: list[Any], run_dir: str, master_reads: str
) -> None:
    """gunicorn --preload (the master imports the app, and may read through its own read
    cache before forking) with --max-requests recycling: after each acknowledged write,
    concurrent reads that land on every worker, old or new, return it."""

    server = start_gunicorn(
        run_dir,
        "--preload",
        "-w",
        "3",
        "--max-requests",
        "15",
        "--max-requests-jitter",
        "5",
        app="cacheapp:app",
        env={"FSS_MASTER_READS": master_reads},
    )
    servers.append(server)
    stale = []
    workers_seen = set()
    hits = 0
    with ThreadPoolExecutor(6) as pool:
        for i in range(60):
            assert server.request("POST", f"/set/{i}").status == 200
            for r in pool.map(lambda _: server.get("/get"), range(6)):
                assert r.status == 200, r.error
                workers_seen.add(r.worker)
                value, worker_hits = r.body.decode().split()
                hits = max(hits, int(worker_hits))
                if value != str(i):
                    stale.append((i, value, r.worker))
    assert stale == []
    assert hits > 0, "no read was a cache hit"
    assert len(workers_seen) > 3, "no worker was recycled"
    assert server.log().count("Autorestarting worker") >= 3


def test_writes_lost_by_a_restart_from_the_journal_are_not_served(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """A server restarted from a journal that lacks the last writes (a power cut under
    everysec, made here by putting back an older copy of the file): a worker that cached
    a lost value reads what the new server holds."""

    journal = os.path.join(run_dir, "state.journal")
    here = client(clients, socket_path, SHAREDSTATE_PERSIST_PATH=journal)
    other = client(clients, socket_path, SHAREDSTATE_PERSIST_PATH=journal)
    other.set("k", "kept")
    other.set("gone", "kept")
    [old] = server_pids(run_dir)
    wait_for(lambda: os.path.getsize(journal) > 0)
    shutil.copyfile(journal, journal + ".before")
    other.set("k", "lost")
    other.delete("gone")
    cached(here, "k", "lost")
    cached(here, "gone", None)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old))
    os.replace(journal + ".before", journal)
    assert other.get("x") is None  # the successor, restored from the older file
    assert server_pids(run_dir) != [old]
    assert here.get("k") == "kept"
    assert here.get("gone") == "kept"
    assert here.get_many(["k", "gone"]) == {"k": "kept", "gone": "kept"}


def test_namespaces_and_servers_sharing_a_folder_never_mix(
    run_dir: str, clients: list[SharedState]
) -> None:
    """Two apps (namespaces) on one server share its table, and a second server in the
    same folder has its own: the same key cached in each is never answered from another."""
    one = os.path.join(run_dir, "one.sock")
    two = os.path.join(run_dir, "two.sock")
    a = client(clients, one, SHAREDSTATE_NAMESPACE="a")
    a2 = client(clients, one, SHAREDSTATE_NAMESPACE="a")
    b = client(clients, one, SHAREDSTATE_NAMESPACE="b")
    c = client(clients, two, SHAREDSTATE_NAMESPACE="a")
    for shared, value in ((a, "a"), (b, "b"), (c, "c")):
        shared.set("k", value)
    for shared, value in ((a, "a"), (b, "b"), (c, "c")):
        cached(shared, "k", value)
    a2.set("k", "a2")
    assert (a.get("k"), b.get("k"), c.get("k")) == ("a2", "b", "c")
    b.dict.clear()
    assert (a.get("k"), b.get("k"), c.get("k")) == ("a2", None, "c")
    c.set("k", "c2")
    assert (a.get("k"), b.get("k"), c.get("k")) == ("a2", None, "c2")
    assert len(server_pids(run_dir)) == 2


def test_a_stopped_and_continued_server_keeps_reads_right(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """SIGSTOP the server past the heartbeat bound (its heartbeat thread starved), write
    while it is stopped (the write waits), SIGCONT: the write's value is read at once."""

    here = client(clients, socket_path)
    other = client(clients, socket_path)
    other.set("k", "before")
    cached(here, "k", "before")
    [pid] = server_pids(run_dir)
    acked = threading.Event()
    sigstop(pid)
    try:
        writer = threading.Thread(target=lambda: (other.set("k", "after"), acked.set()))
        writer.start()
        time.sleep(1.5)
        assert not acked.is_set()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert acked.wait(30)
    writer.join(30)
    assert here.get("k") == "after"
    cached(here, "k", "after")


def test_large_numbers_count_their_size_against_the_bounds(
    socket_path: str, clients: list[SharedState]
) -> None:
    """An int stored as itself (not pickled) of 4 KB is over a 500-byte value bound: never
    kept, and never lets the cache hold more than SHAREDSTATE_CLIENT_CACHE bytes."""
    here = client(
        clients,
        socket_path,
        SHAREDSTATE_CLIENT_CACHE_MAX_VALUE=500,
        SHAREDSTATE_CLIENT_CACHE=2000,
    )
    cache = cache_of(here)
    big = 1 << (8 * 4096)
    for i in range(5):
        here.set(f"big{i}", big + i)
    for _ in range(2):
        for i in range(5):
            assert here.get(f"big{i}") == big + i
    assert cache.hits == 0, "a 4 KB number was kept under a 500-byte value bound"
    assert cache.stats()["entries"] == 0


def test_writes_rolled_back_on_a_full_disk_are_never_read(run_dir: str) -> None:
    """SHAREDSTATE_FSYNC=always on a full disk: each refused write (set, delete, atomic,
    clear) is rolled back after its bump; the other worker reads the old value, caches it
    again, and then sees the next write that succeeds."""

    with mounted(run_dir, 2 * 1024 * 1024) as disk:
        socket_path = os.path.join(run_dir, "app.sock")
        config = {
            "SHAREDSTATE_PERSIST_PATH": os.path.join(disk, "state.db"),
            "SHAREDSTATE_FSYNC": "always",
        }
        here = workers.make_shared(socket_path, **config)
        other = workers.make_shared(socket_path, **config)
        try:
            other.set("k", "v1")
            cached(here, "k", "v1")
            filler = fill(disk)
            fill_last_page(other)

            def atomic_write() -> None:
                with other.atomic():
                    other.dict["k"] = "in a block"

            refused = 0
            for write in (
                lambda: other.set("k", "v2"),
                lambda: other.delete("k"),
                atomic_write,
                lambda: other.dict.clear(),
            ):
                with pytest.raises(NotPersisted):
                    write()
                refused += 1
                assert here.get("k") == "v1"
                cached(here, "k", "v1")
            assert refused == 4
            os.unlink(filler)
            other.set("k", "v3")
            assert here.get("k") == "v3"
        finally:
            for shared in (here, other):
                shared.state().backend.close()


def test_cli_load_and_clear_reach_cached_values(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """`flask sharedstate load` and `clear` change what a worker cached: its next reads
    return the loaded value, then nothing."""

    here = client(clients, socket_path)
    other = client(clients, socket_path)
    app = Flask("worker_app")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    SharedState(app)
    dump = os.path.join(run_dir, "dump.json")
    other.set("k", "from the dump")
    other.set("t", "from the dump", ttl=60)
    result = app.test_cli_runner().invoke(sharedstate, ["dump", dump])
    assert result.exit_code == 0, result.output
    other.set("k", "before")
    other.set("t", "before")
    cached(here, "k", "before")
    cached(here, "t", "before")
    result = app.test_cli_runner().invoke(sharedstate, ["load", dump])
    assert result.exit_code == 0, result.output
    assert here.get_many(["k", "t"]) == {"k": "from the dump", "t": "from the dump"}
    cached(here, "k", "from the dump")
    result = app.test_cli_runner().invoke(sharedstate, ["clear", "--yes"])
    assert result.exit_code == 0, result.output
    assert here.get("k") is None and here.get("t") is None


def test_successor_of_a_killed_server_whose_table_was_deleted_waits_out_its_heartbeat(
    run_dir: str, socket_path: str, clients: list[SharedState]
) -> None:
    """The table deleted, then the server SIGKILLed before its heartbeat thread noticed,
    and a successor started at once (it must make a new file, which old workers never
    map): a worker still trusting its mapping of the old file is not served the old value
    after the successor acknowledged a new one."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    other.set("k", "old")
    cached(here, "k", "old")
    [old] = server_pids(run_dir)
    os.unlink(socket_path + ".versions")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old))
    for _ in range(3):  # elects and starts the successor at once, on a new table file
        try:
            other.set("k", "new")
            break
        except SharedStateUnavailable:  # the reply was lost to the dying server: again
            pass
    acked = time.monotonic()
    last_beat = cache_of(here)._floats[versions.HEARTBEAT_WORD]  # in the dead file
    assert server_pids(run_dir) != [old]
    assert here.get("k") == "new"
    # The stale read above needs a successor quicker than the bound; this does not.
    assert acked - last_beat >= versions.HEARTBEAT_BOUND, "acknowledged within the bound"


def test_get_many_mixing_cached_uncached_and_expiring_keys(
    socket_path: str, clients: list[SharedState]
) -> None:
    """get_many over keys some cached, some never read, some at their ttl's deadline:
    each answer is the server's, and a key past its deadline is absent, round after round."""
    here = client(clients, socket_path)
    other = client(clients, socket_path)
    late = []
    for round_ in range(8):
        other.set_many({"a": round_, "b": [round_]})
        other.set("t", [round_], ttl=0.15)
        acked = time.monotonic()
        assert here.get_many(["a", "t"]) == {"a": round_, "t": [round_]} or (
            time.monotonic() > acked + 0.15
        )
        other.set("c", round_)  # never read before: uncached
        time.sleep(max(0.0, acked + 0.15 - time.monotonic()) + 0.001)
        got = here.get_many(["a", "b", "c", "t", "never"])
        if got["t"] is not None:
            late.append(round_)
        assert (got["a"], got["b"], got["c"], got["never"]) == (round_, [round_], round_, None)
    assert late == []
    assert cache_of(here).hits > 0
