"""The manager backend's connection model: cost follows processes, not threads.

Every thread (and greenlet) of a process shares one connection; each is still its
own owner of locks and atomic blocks; a waiting operation is parked in the server
and starves no other operation of the process; the server needs no thread per
client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from flask_sharedstate import LockTimeout, SharedState

import workers
from conftest import make_app, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def manager(run_dir: str, **config: Any) -> SharedState:
    return SharedState(make_app("manager", run_dir, **config))


def server_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def run_threads(count: int, target: Any) -> list[BaseException]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=body) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "threads still running after 120 s"
    return errors


def test_threads_share_one_connection(run_dir: str) -> None:
    """128 threads of one process count exactly over one connection, and the server
    runs a handful of threads, not one per client thread."""
    shared = manager(run_dir)
    pid = workers.server_pid(shared)
    peak: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            peak.append(server_threads(pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        errors = run_threads(128, lambda: [shared.incr("n") for _ in range(50)])
    finally:
        stop.set()
        watcher.join(10)
    assert not errors, errors[:3]
    assert shared.get("n") == 128 * 50
    info = shared.state().backend.call("info")
    assert info["connections"]["open"] == 1
    assert max(peak, default=0) <= 8, peak


def test_locks_are_owned_per_thread(run_dir: str) -> None:
    """A lock taken by one thread is not owned by another thread of the same process:
    the other's release() raises RuntimeError and its acquire waits."""
    shared = manager(run_dir)
    lock = shared.lock("job")
    assert lock.acquire()
    outcome: dict[str, Any] = {}

    def other() -> None:
        try:
            lock.release()
        except RuntimeError as exc:
            outcome["release"] = exc
        outcome["acquire"] = lock.acquire(blocking=False)

    errors = run_threads(1, other)
    assert not errors
    assert isinstance(outcome["release"], RuntimeError)
    assert outcome["acquire"] is False
    lock.release()


def test_a_thread_that_ends_holding_a_lock_frees_it(run_dir: str) -> None:
    """A thread that ends without releasing its lock frees it (as its connection's end
    did when each thread had its own), while the process's connection lives on."""
    shared = manager(run_dir)
    assert not run_threads(1, lambda: shared.lock("left").acquire())
    other = manager(run_dir)  # another app of the process: its own connection
    # Freed when the server hears of the thread's end: with the process's next request
    # at the latest.
    wait_for(lambda: shared.incr("tick") and other.lock("left").acquire(blocking=False), 30, 0.1)
    other.lock("left").release()


def test_a_lock_wait_starves_no_other_operation(run_dir: str) -> None:
    """While one thread waits in the server for a held lock, the other threads of the
    same process go on: 200 increments finish before the wait ends."""
    shared = manager(run_dir, SHAREDSTATE_TIMEOUT=30.0)
    holder = manager(run_dir)  # another app of the process: its own connection
    assert holder.lock("busy").acquire()
    waited: dict[str, Any] = {}

    def wait_for_lock() -> None:
        started = time.monotonic()
        try:
            shared.lock("busy").acquire(timeout=20)
            shared.lock("busy").release()
        except LockTimeout as exc:
            waited["error"] = exc
        waited["seconds"] = time.monotonic() - started

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    try:
        wait_for(lambda: shared.lock("busy").locked(), 10)
        for _ in range(200):
            shared.incr("other")
        assert "seconds" not in waited, "the lock wait ended before the increments did"
    finally:
        holder.lock("busy").release()
        waiter.join(30)
    assert shared.get("other") == 200
    assert "error" not in waited


def test_a_lock_wait_times_out_in_the_server(run_dir: str) -> None:
    """A parked lock wait ends with LockTimeout at its own timeout, on a connection that
    stays usable."""
    shared = manager(run_dir)
    holder = manager(run_dir)  # another app of the process: its own connection
    assert holder.lock("busy").acquire()
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        shared.lock("busy").acquire(timeout=1.5)
    assert time.monotonic() - started >= 1.4
    assert shared.incr("n") == 1
    holder.lock("busy").release()


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import sys, gevent
    sys.path[:0] = [sys.argv[2], sys.argv[3]]
    import workers
    shared = workers.make_shared(sys.argv[1], timeout=20.0)
    lock = shared.lock("g")
    lock.acquire()
    waited = []
    def waiter():
        assert shared.lock("g").acquire(timeout=15)
        waited.append(shared.get("n"))
        shared.lock("g").release()
    def counter():
        for _ in range(20):
            shared.incr("n")
    w = gevent.spawn(waiter)
    gevent.sleep(0.2)
    gevent.joinall([gevent.spawn(counter) for _ in range(300)], timeout=60, raise_error=True)
    lock.release()
    w.join(30)
    info = shared.state().backend.call("info")
    print(shared.get("n"), waited, info["connections"]["open"])
    """
)


def test_greenlets_share_one_connection_and_wait_cooperatively(run_dir: str) -> None:
    """Under gevent, 300 greenlets count exactly over one connection while another
    greenlet waits for a lock held in the same process (its wait never blocks the hub)."""
    path = os.path.join(run_dir, "test_app.sock")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, path, tests, ROOT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["6000", "[6000]", "1"], result.stdout


def child_increments(path: str) -> None:
    shared = workers.make_shared(path)
    for _ in range(100):
        shared.incr("n")


def test_a_forked_child_opens_its_own_connection(run_dir: str) -> None:
    """A child forked from a connected process counts over its own connection, and
    the parent's connection is unharmed."""
    import multiprocessing

    path = os.path.join(run_dir, "test_app.sock")
    shared = workers.make_shared(path)
    assert shared.incr("n") == 1

    def in_child() -> None:
        for _ in range(100):
            shared.incr("n")

    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=in_child)
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert shared.incr("n") == 102
