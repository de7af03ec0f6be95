"""Crowds of greenlets and threads in real processes: get_or_set's single flight, and
the Redis pool, on the state server and on a real redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

import workers
from conftest import make_app, sigstop, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "crowdworkers.py")

pytest.importorskip("gevent")


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
