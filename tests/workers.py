"""Code that test processes run: importable, so that ``spawn`` children find it.

Every function takes the socket path of the state server and builds its own
app, as a gunicorn worker would.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from flask import Flask

from flask_sharedstate import SharedState, SharedStateUnavailable


def make_shared(socket_path: str, timeout: float = 5.0, **config: Any) -> SharedState:
    """An app's SharedState on the server at ``socket_path``, or on the backend that
    ``FSS_TEST_BACKEND`` (JSON config, set by a test for all its processes) names."""
    app = Flask("worker_app")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    app.config["SHAREDSTATE_TIMEOUT"] = timeout
    app.config.update(json.loads(os.environ.get("FSS_TEST_BACKEND", "{}")))
    app.config.update(config)
    return SharedState(app)


def server_pid(shared: SharedState) -> int:
    return shared.state().backend.server_pid()  # type: ignore[attr-defined,no-any-return]


def incr_many(socket_path: str, count: int, barrier: Any) -> None:
    shared = make_shared(socket_path)
    barrier.wait(30)
    for _ in range(count):
        shared.incr("n")


def atomic_append_many(socket_path: str, worker: int, count: int, barrier: Any) -> None:
    shared = make_shared(socket_path)
    barrier.wait(30)
    for i in range(count):
        with shared.atomic():
            shared.dict.setdefault("items", []).append(f"{worker}-{i}")


def atomic_add_many(socket_path: str, count: int, barrier: Any) -> None:
    """Read-modify-write of "n" in atomic blocks, and nested edits of "doc"."""
    shared = make_shared(socket_path)
    barrier.wait(30)
    for i in range(count):
        with shared.atomic():
            shared.dict["n"] = shared.dict["n"] + 1
            doc = shared.dict["doc"]
            doc["marks"] = doc["marks"][-5:] + [i]
            shared.dict["doc"] = doc


def set_many_versions(socket_path: str, count: int, barrier: Any) -> None:
    """Plain single-step sets of "doc", with increasing versions."""
    shared = make_shared(socket_path)
    barrier.wait(30)
    for version in range(1, count + 1):
        shared.set("doc", {"v": version, "marks": []})


def elect(socket_path: str, barrier: Any, results: Any, delay: float) -> None:
    """Race to first use after ``delay``; report (server pid, value seen, error)."""
    shared = make_shared(socket_path, timeout=20.0)
    barrier.wait(60)
    time.sleep(delay)  # spread arrivals over the new server's start-up, too
    try:
        shared.incr("racers")
        results.put((server_pid(shared), shared.get("racers"), None))
    except Exception as exc:  # reported, so the test can show it
        results.put((None, None, repr(exc)))


def start_and_report(socket_path: str, results: Any, linger: bool) -> None:
    """Start the server by using the state, report, then exit or wait to be killed."""
    shared = make_shared(socket_path)
    shared.set("written_by_starter", os.getpid())
    results.put(server_pid(shared))
    if linger:
        time.sleep(60)


def hold_lock(socket_path: str, name: str, results: Any) -> None:
    shared = make_shared(socket_path)
    shared.lock(name).acquire()
    results.put("held")
    time.sleep(60)


def hold_atomic(socket_path: str, results: Any) -> None:
    """Open a block, write half of a change, and wait to be killed inside it."""
    shared = make_shared(socket_path)
    with shared.atomic():
        shared.dict["a"] = shared.dict["a"] + 1
        shared.dict["b"] = "half"
        results.put("inside")
        time.sleep(60)


def ops_through_server_death(
    socket_path: str, results: Any, started: Any, stop: Any, config: dict[str, Any]
) -> None:
    """incr in a loop; report each op's outcome, duration, server pid and start time.

    Says ``started`` after its first successful op; after ``stop`` it keeps going
    until an op succeeds on a server other than its first (60 s at most).
    """
    shared = make_shared(socket_path, timeout=3.0, **config)
    outcomes: list[tuple[str, float, int | None, float]] = []
    first_pid = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            shared.incr("n")
            outcome = "ok"
        except SharedStateUnavailable:
            outcome = "unavailable"
        except Exception as exc:
            outcome = repr(exc)
        pid = server_pid_or_none(shared) if outcome == "ok" else None
        outcomes.append((outcome, time.monotonic() - start, pid, start))
        if first_pid is None and pid is not None:
            first_pid = pid
            started.put(os.getpid())
        if stop.is_set() and pid is not None and pid != first_pid:
            break
        time.sleep(0.005)
    results.put(outcomes)


def server_pid_or_none(shared: SharedState) -> int | None:
    try:
        return server_pid(shared)
    except SharedStateUnavailable:
        return None


def fork_and_use(socket_path: str, results: Any) -> None:
    """Use the state, fork, and have parent and child both keep using it."""
    shared = make_shared(socket_path)
    shared.incr("n")
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(100):
                shared.incr("n")
            shared.set("child", "ok")
            os._exit(0)
        except BaseException:
            os._exit(1)
    for _ in range(100):
        shared.incr("n")
    _, status = os.waitpid(pid, 0)
    results.put((os.waitstatus_to_exitcode(status), shared.get("n"), shared.get("child")))


def start_with_listener(socket_path: str, results: Any) -> None:
    """Hold an inheritable listening TCP socket, as a gunicorn worker does; start the server."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    os.set_inheritable(listener.fileno(), True)
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    shared = make_shared(socket_path)
    shared.set("k", 1)
    own = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            own[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    results.put((server_pid(shared), own, listener.fileno()))
    time.sleep(60)


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hold_in_namespace(config: dict[str, Any], results: Any, leave: Any) -> None:
    """An app on ``config``: set "k" and "n", take lock "L", open an atomic block that
    read (claimed) both, report, and wait for ``leave``; then commit and report what
    this app sees."""
    app = Flask("holder_app")
    app.config.update(config)
    shared = SharedState(app)
    shared.set_many({"k": "mine", "n": 0})
    server = server_pid(shared) if config["SHAREDSTATE_BACKEND"] == "manager" else None
    with shared.lock("L"), shared.atomic():
        shared.dict["k"] = shared.dict["k"] + "!"
        shared.dict["n"] = shared.dict["n"] + 1
        results.put(("inside", server))
        leave.wait(60)
    results.put(("after", dict(shared.dict.items())))
