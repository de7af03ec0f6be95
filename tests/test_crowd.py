"""get_or_set's single flight and fencing, and the Redis pool: crowds of gevent greenlets
and threads in real processes on a real state server and redis-server, runners stopped
(SIGSTOP) past their lease or cut off by a server restart, and the contract on every backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from flask_sharedstate import LockTimeout

import workers
from conftest import make_app, sigstop, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "crowdworkers.py")


def _backend_env(backend: str, run_dir: str) -> dict[str, str]:
    """The environment that makes ``workers.make_shared`` use ``backend``."""
    env = dict(os.environ)
    if backend == "redis":
        app = make_app("redis", run_dir, name="crowd")
        config = {k: v for k, v in app.config.items() if k.startswith("SHAREDSTATE_")}
        env["FSS_TEST_BACKEND"] = json.dumps(config)
    else:
        env.pop("FSS_TEST_BACKEND", None)
    return env


def run_crowd(backend: str, run_dir: str, job: str, mode: str, count: int, *extra: int) -> Any:
    """4 client processes running ``job`` with ``count`` greenlets or threads each, from
    one instant; returns the processes' counts added up, and this test's SharedState."""
    env = _backend_env(backend, run_dir)
    path = os.path.join(run_dir, "crowd.sock")
    old = os.environ.get("FSS_TEST_BACKEND")
    os.environ.update({"FSS_TEST_BACKEND": env.get("FSS_TEST_BACKEND", "{}")})
    try:
        shared = workers.make_shared(path)  # this process starts (and owns) the server
    finally:
        if old is None:
            os.environ.pop("FSS_TEST_BACKEND", None)
        else:
            os.environ["FSS_TEST_BACKEND"] = old
    shared.incr("warm")
    start = time.time() + 4  # every process imported and connected by then
    args = [job, mode, path, str(count), repr(start), *map(str, extra)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    total: Counter[str] = Counter()
    for (out, err), p in zip(outputs, procs, strict=True):
        assert p.returncode == 0, err[-3000:]
        total.update(json.loads(out.strip().splitlines()[-1]))
    return total, shared


@pytest.mark.parametrize("backend", ["manager", "redis"])
@pytest.mark.parametrize(("mode", "count"), [("gevent", 500), ("threads", 150)])
def test_get_or_set_crowd_on_a_cold_key(
    backend: str, mode: str, count: int, run_dir: str, request: pytest.FixtureRequest
) -> None:
    """4 processes x many callers on a cold key: fn runs once, every caller gets its value."""
    if backend == "redis":
        request.getfixturevalue("redis_url")
    total, shared = run_crowd(backend, run_dir, "get_or_set", mode, count)
    assert shared.get("runs") == 1, total
    values = [k for k in total if k.startswith("value:")]
    assert len(values) == 1, total  # one value, and nothing else (no LockTimeout)
    assert total[values[0]] == 4 * count, total


@pytest.mark.parametrize("backend", ["redis"])
def test_redis_crowd_waits_for_a_pooled_connection(
    backend: str, run_dir: str, request: pytest.FixtureRequest
) -> None:
    """4 processes x 300 greenlets calling incr on Redis, default options: 0 errors, exact count."""
    request.getfixturevalue("redis_url")
    total, shared = run_crowd(backend, run_dir, "incr", "gevent", 300, 20)
    assert total == {"ok": 4 * 300 * 20}, total
    assert shared.get("n") == 4 * 300 * 20


def _start_runner(backend: str, run_dir: str) -> tuple[subprocess.Popen[str], str]:
    go = os.path.join(run_dir, "go")
    path = os.path.join(run_dir, "crowd.sock")
    proc = subprocess.Popen(
        [sys.executable, WORKER, "runner", "-", path, go],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_backend_env(backend, run_dir),
    )
    return proc, go


def _runner_result(proc: subprocess.Popen[str]) -> dict[str, str]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _shared_for(backend: str, run_dir: str) -> Any:
    env = _backend_env(backend, run_dir)
    config = json.loads(env.get("FSS_TEST_BACKEND", "{}"))
    return workers.make_shared(os.path.join(run_dir, "crowd.sock"), **config)


def test_redis_runner_stopped_past_its_lease_does_not_overwrite(
    run_dir: str, redis_url: str
) -> None:
    """On Redis, a get_or_set runner SIGSTOPped past its lease writes nothing on waking:
    it returns the value another caller stored meanwhile, and that value stays."""
    shared = _shared_for("redis", run_dir)
    proc, go = _start_runner("redis", run_dir)
    try:
        wait_for(lambda: shared.get("started") == 1, 30)
        sigstop(proc.pid)
        lock = shared.lock("get_or_set:k")
        wait_for(lambda: not lock.locked(), 30, interval=0.1)  # its lease ran out
        assert shared.get_or_set("k", lambda: "second") == "second"
        open(go, "w").close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        if proc.poll() is None and not os.path.exists(go):
            open(go, "w").close()
    assert _runner_result(proc) == {"result": "second"}
    assert shared.get("k") == "second"
    assert not shared.lock("get_or_set:k").locked()


def test_manager_restart_under_a_runner_gives_one_value(run_dir: str) -> None:
    """A state server that restarts while a get_or_set runner computes: the runner's
    late value is not written over the new server's, and it returns that one."""
    shared = _shared_for("manager", run_dir)
    assert shared.incr("warm") == 1  # this process starts (and owns) the server
    proc, go = _start_runner("manager", run_dir)
    try:
        wait_for(lambda: shared.get("started") == 1, 30)
        os.kill(workers.server_pid(shared), signal.SIGKILL)
        assert shared.get_or_set("k", lambda: "second") == "second"  # on a new server
        open(go, "w").close()
    finally:
        if not os.path.exists(go):
            open(go, "w").close()
    assert _runner_result(proc) == {"result": "second"}
    assert shared.get("k") == "second"


# -- get_or_set on every backend, one process ------------------------------------------------


def test_get_or_set_stores_once_with_its_ttl(shared: Any, app: Any) -> None:
    """A cold key runs fn and stores its value with the ttl; a warm one does not run fn."""
    with app.app_context():
        assert shared.get_or_set("k", lambda: {"a": 1}, ttl=60) == {"a": 1}
        assert shared.get_or_set("k", lambda: {"a": 2}) == {"a": 1}
        assert 0 < shared.ttl("k") <= 60
        assert not shared.lock("get_or_set:k").locked()


def test_get_or_set_error_or_unstorable_value_leaves_nothing(shared: Any, app: Any) -> None:
    """fn's error, or a value that cannot be stored, reaches the caller; nothing is
    stored, the lock is free, and the next caller runs fn."""
    with app.app_context():
        with pytest.raises(ZeroDivisionError):
            shared.get_or_set("k", lambda: 1 / 0)
        assert not shared.lock("get_or_set:k").locked()
        with pytest.raises(TypeError, match="'k'"):
            shared.get_or_set("k", threading.Lock)
        assert not shared.lock("get_or_set:k").locked()
        assert "k" not in shared.dict
        assert shared.get_or_set("k", lambda: 5) == 5


def test_get_or_set_waiter_times_out_naming_the_key(shared: Any, app: Any) -> None:
    """While another thread holds the key's lock and stores nothing, a caller gets
    LockTimeout after its timeout, naming the key; the holder keeps its lock."""
    with app.app_context():
        lock = shared.lock("get_or_set:slow")
        lock.acquire()
        errors: list[BaseException] = []

        def waiter() -> None:
            with app.app_context():
                try:
                    shared.get_or_set("slow", lambda: "never", timeout=1.0)
                except BaseException as exc:  # noqa: BLE001 - the test reads it
                    errors.append(exc)

        thread = threading.Thread(target=waiter)
        try:
            thread.start()
            thread.join(30)
        finally:
            lock.release()
        assert len(errors) == 1 and isinstance(errors[0], LockTimeout), errors
        assert "'slow'" in str(errors[0]) and "1s" in str(errors[0]), errors[0]
        assert "slow" not in shared.dict


def test_get_or_set_waiters_get_the_runners_value(shared: Any, app: Any) -> None:
    """Threads of one process waiting for a runner all return the runner's value; fn ran once."""
    runs: list[int] = []
    release = threading.Event()

    def fn() -> str:
        runs.append(1)
        release.wait(30)
        return "v"

    results: list[Any] = []

    def caller() -> None:
        with app.app_context():
            results.append(shared.get_or_set("k", fn, timeout=30))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    with app.app_context():
        wait_for(lambda: runs and shared.lock("get_or_set:k").locked(), 30)
    release.set()
    for thread in threads:
        thread.join(60)
    assert results == ["v"] * 8
    assert runs == [1]


def test_get_or_set_in_an_atomic_block(shared: Any, app: Any) -> None:
    """Inside an atomic block get_or_set reads and writes in the block."""
    with app.app_context():
        with shared.atomic():
            assert shared.get_or_set("k", lambda: [1]) == [1]
            assert shared.get_or_set("k", lambda: [2]) == [1]
        assert shared.get("k") == [1]
