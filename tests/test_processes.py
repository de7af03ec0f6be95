"""The embedded state server with real processes: races, election, kills, fork."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flask_sharedstate import SharedState

import workers
from conftest import free_port, kill_servers, pid_alive, server_pids, wait_for

ctx = multiprocessing.get_context("spawn")


@pytest.fixture
def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, "app.sock")


@pytest.fixture(params=["manager", "redis", "redis-cluster"])
def any_backend(
    request: pytest.FixtureRequest, run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Run the test's processes on the state server, then on Redis, then on Redis Cluster."""
    if request.param in ("redis", "redis-cluster"):
        url = request.getfixturevalue(request.param.replace("-", "_") + "_url")
        config = {
            "SHAREDSTATE_BACKEND": "redis",
            "SHAREDSTATE_REDIS_URL": url,
            "SHAREDSTATE_NAMESPACE": os.path.basename(run_dir),
            "SHAREDSTATE_LEASE": 2.0,
            "SHAREDSTATE_KEY": "test-key-for-signing-values",
        }
        monkeypatch.setenv("FSS_TEST_BACKEND", json.dumps(config))
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def here(socket_path: str) -> Iterator[SharedState]:
    """The test process's own client of the server at ``socket_path``."""
    shared = workers.make_shared(socket_path)
    yield shared
    shared.state().backend.close()


def run_all(procs: list[Any], target: Any, arg_sets: list[tuple[Any, ...]]) -> None:
    for args in arg_sets:
        p = ctx.Process(target=target, args=args)
        p.start()
        procs.append(p)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


def test_incr_from_8_processes_is_exact(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """8 processes x 1,000 incr end at exactly 8,000."""
    barrier = ctx.Barrier(8)
    run_all(procs, workers.incr_many, [(socket_path, 1000, barrier)] * 8)
    assert here.get("n") == 8000
    if any_backend == "manager":
        assert len(server_pids(os.path.dirname(socket_path))) == 1


def test_atomic_appends_from_8_processes(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """8 processes x 200 atomic appends to a nested list end with 1,600 distinct items."""
    barrier = ctx.Barrier(8)
    run_all(
        procs,
        workers.atomic_append_many,
        [(socket_path, w, 200, barrier) for w in range(8)],
    )
    items = here.get("items")
    assert len(items) == 1600
    assert len(set(items)) == 1600


def test_atomic_racing_incr_and_set_loses_nothing(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """Atomic read-modify-writes racing plain incr and set on the same keys lose nothing."""
    here.set("n", 0)
    here.set("doc", {"v": 0, "marks": []})
    barrier = ctx.Barrier(7)
    arg_sets: list[tuple[Any, ...]] = []
    for _ in range(3):
        procs.append(ctx.Process(target=workers.atomic_add_many, args=(socket_path, 300, barrier)))
    for _ in range(3):
        procs.append(ctx.Process(target=workers.incr_many, args=(socket_path, 300, barrier)))
    procs.append(ctx.Process(target=workers.set_many_versions, args=(socket_path, 300, barrier)))
    del arg_sets
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert here.get("n") == 1800
    # An atomic block that read an older version must not have written it back
    # over a newer plain set: the last version set is the one that stands.
    assert here.get("doc")["v"] == 300


def test_election_of_32_racing_processes(socket_path: str, procs: list[Any]) -> None:
    """32 processes using an empty address at once: one server, one state, no error."""
    barrier = ctx.Barrier(32)
    results = ctx.Queue()
    for i in range(32):
        delay = 0 if i < 16 else (i - 16) * 0.01
        p = ctx.Process(target=workers.elect, args=(socket_path, barrier, results, delay))
        p.start()
        procs.append(p)
    reports = [results.get(timeout=120) for _ in range(32)]
    for p in procs:
        p.join(60)
    errors = [r[2] for r in reports if r[2] is not None]
    assert errors == []
    assert len({r[0] for r in reports}) == 1
    assert server_pids(os.path.dirname(socket_path)) == [reports[0][0]]
    assert max(r[1] for r in reports) == 32


@pytest.mark.parametrize("how", ["exits", "sigkilled"])
def test_server_outlives_its_starter(
    how: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """The process that started the server exits or is SIGKILLed; the state lives on."""
    results = ctx.Queue()
    starter = ctx.Process(
        target=workers.start_and_report, args=(socket_path, results, how == "sigkilled")
    )
    starter.start()
    procs.append(starter)
    pid = results.get(timeout=60)
    if how == "sigkilled":
        os.kill(starter.pid, signal.SIGKILL)  # type: ignore[arg-type]
    starter.join(30)
    assert not starter.is_alive()
    # Its owner is this test process (the starter's parent), not the starter...
    assert here.state().backend.call("info")["owner_pid"] == os.getpid()
    # ...so it does not stop: the owner watch (pidfd) would have acted at once.
    time.sleep(1.5)
    assert pid_alive(pid)
    assert here.get("written_by_starter") == starter.pid
    assert workers.server_pid(here) == pid


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_server_sigkilled_clients_recover(
    transport: str, socket_path: str, procs: list[Any]
) -> None:
    """SIGKILL the server while 4 processes use it: each op succeeds or raises
    SharedStateUnavailable within its bound (none hangs), and every process goes
    on working on one new server."""
    timeout = 3.0  # ops_through_server_death's SHAREDSTATE_TIMEOUT
    config = {"SHAREDSTATE_PORT": free_port()} if transport == "tcp" else {}
    here = workers.make_shared(socket_path, **config)
    try:
        here.set("n", 0)
        old = workers.server_pid(here)
    finally:
        here.state().backend.close()
    results, started, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    for _ in range(4):
        p = ctx.Process(
            target=workers.ops_through_server_death,
            args=(socket_path, results, started, stop, config),
        )
        p.start()
        procs.append(p)
    for _ in range(4):  # every process is working on the old server
        started.get(timeout=60)
    kill_sent = time.monotonic()  # before the kill: an op may start between it and the next line
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    stop.set()  # each goes on until it has worked on a new server
    reports = [results.get(timeout=120) for _ in range(4)]
    new_pids = set()
    for outcomes in reports:
        kinds = {o[0] for o in outcomes}
        assert kinds <= {"ok", "unavailable"}, kinds
        # The kill came while it worked: ops on the old server before, a new one after.
        assert any(o[2] == old and o[3] < killed_at for o in outcomes)
        assert outcomes[-1][0] == "ok" and outcomes[-1][2] not in (None, old)
        # (It may have started just before the kill and sent nothing until after it: the
        # client then connects anew, safely. It ended after the kill.)
        assert outcomes[-1][3] + outcomes[-1][1] > kill_sent
        # An op waits at most for a connection (1 x timeout) and a reply (2 x).
        assert max(o[1] for o in outcomes) < 3 * timeout + 2
        new_pids.add(outcomes[-1][2])
    assert len(new_pids) == 1
    assert server_pids(os.path.dirname(socket_path)) == list(new_pids)
    assert not pid_alive(old)


#: How soon a SIGKILLed holder's lock or atomic block is free again: at once on the
#: state server (the connection closes), after the lease (2 s here) on Redis. The
#: slack (3 s) is for a loaded machine; it stays below the clients' 5 s timeout,
#: so a lock that waited for a timeout instead of the disconnect would fail.
RELEASED_WITHIN = {"manager": 3.0, "redis": 2.0 + 3.0, "redis-cluster": 2.0 + 3.0}


def test_lock_of_sigkilled_holder_is_released(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """SIGKILL a process holding the lock: another acquires it at once (on Redis,
    once the lease has run out)."""
    results = ctx.Queue()
    holder = ctx.Process(target=workers.hold_lock, args=(socket_path, "cart:1", results))
    holder.start()
    procs.append(holder)
    assert results.get(timeout=60) == "held"
    assert here.lock("cart:1").locked()
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    start = time.monotonic()
    bound = RELEASED_WITHIN[any_backend]
    assert here.lock("cart:1").acquire(timeout=bound)
    assert time.monotonic() - start < bound
    here.lock("cart:1").release()


def test_atomic_of_sigkilled_process_writes_nothing(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """A process killed inside an atomic block: none of its writes, and the keys are free."""
    here.set_many({"a": 1, "b": "whole"})
    results = ctx.Queue()
    holder = ctx.Process(target=workers.hold_atomic, args=(socket_path, results))
    holder.start()
    procs.append(holder)
    assert results.get(timeout=60) == "inside"
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    start = time.monotonic()
    bound = RELEASED_WITHIN[any_backend]
    assert here.get("b") == "whole"  # its half-written change is not visible
    assert here.incr("a") == 2
    with here.atomic(timeout=bound):
        assert here.dict["b"] == "whole"
    assert time.monotonic() - start < bound


def test_fork_parent_and_child_keep_working(
    any_backend: str, socket_path: str, procs: list[Any], here: SharedState
) -> None:
    """A process that used the state forks; parent and child both keep working."""
    results = ctx.Queue()
    run_all(procs, workers.fork_and_use, [(socket_path, results)])
    child_exit, n, child = results.get(timeout=10)
    assert child_exit == 0
    assert child == "ok"
    assert n == 201


def test_threads_of_one_process_share_safely(any_backend: str, here: SharedState) -> None:
    """Threads of one process (gthread workers) each get a safe connection."""
    import threading

    def work() -> None:
        for _ in range(300):
            here.incr("t")
        with here.lock("x"):
            here.incr("locked")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert here.get("t") == 2400
    assert here.get("locked") == 8


def test_server_stops_with_its_owner(run_dir: str, socket_path: str) -> None:
    """The server a process starts for itself stops (and cleans up) when that process dies."""
    import subprocess
    import sys

    code = (
        f"import sys, time; sys.path.insert(0, {os.path.dirname(__file__)!r}); import workers;"
        f"s = workers.make_shared({socket_path!r}); s.set('k', 1);"
        "print(workers.server_pid(s), flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        assert pid_alive(pid)
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not pid_alive(pid), timeout=5)
        assert not os.path.exists(socket_path)
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
        kill_servers(run_dir)


def test_block_exception_survives_a_lost_server(run_dir: str) -> None:
    """An atomic block that raises while the server cannot be reached raises its own
    exception, not the failed abort's; nothing of it is written."""
    socket_path = os.path.join(run_dir, "app.sock")
    shared = workers.make_shared(socket_path, timeout=1.0)
    shared.set("k", 1)
    pid = workers.server_pid(shared)
    try:
        with pytest.raises(ZeroDivisionError):
            with shared.atomic():
                shared.dict["k"] = shared.dict["k"] + 1
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not pid_alive(pid), timeout=10)
                os.unlink(socket_path)
                os.mkdir(socket_path)  # no new server can listen there now
                raise ZeroDivisionError
    finally:
        os.rmdir(socket_path)
        shared.state().backend.close()
