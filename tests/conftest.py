from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import SharedState, SharedStateUnavailable


def _own_deprecations_are_errors() -> None:
    """Processes the tests start (state servers, gunicorn and its workers, scripts) turn a
    DeprecationWarning or PendingDeprecationWarning that this package's own call raised into
    an error, as pytest's ``filterwarnings = error`` does in this process: the next removal in
    Flask, Werkzeug or redis-py fails a test here first. ``PYTHONWARNINGS`` matches module
    names exactly, so every module of the package is named."""
    import pkgutil

    import flask_sharedstate

    modules = ["flask_sharedstate"] + [
        info.name
        for info in pkgutil.walk_packages(flask_sharedstate.__path__, "flask_sharedstate.")
    ]
    filters = [
        f"error::{category}:{module}"
        for module in modules
        for category in ("DeprecationWarning", "PendingDeprecationWarning")
    ]
    inherited = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(([inherited] if inherited else []) + filters)


_own_deprecations_are_errors()

#: Every backend, the manager over TCP and Redis Cluster: the conformance suite runs on each.
BACKENDS = ["memory", "manager", "manager-tcp", "redis", "redis-cluster"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_pids(folder: str) -> list[int]:
    """Pids of the state servers whose pid files lie in or below ``folder``, still running."""
    pids = []
    pid_files = [
        os.path.join(top, name)
        for top, _, names in os.walk(folder)
        for name in names
        if name.endswith(".pid")
    ]
    for pid_file in sorted(pid_files):
        try:
            with open(pid_file) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        # The pid may have been reused: only a server of this folder counts.
        if b"flask_sharedstate.server" in cmdline and folder.encode() in cmdline:
            pids.append(pid)
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def sigstop(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads has stopped.

    ``kill`` returns when the signal is queued, not when the process stops: one
    thread takes it and only then stops the others, so on a loaded machine another
    thread can still answer a request sent right after ``kill``.
    """
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        for thread in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{thread}/stat") as f:
                    state = f.read().rsplit(") ", 1)[1][0]
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
            if state not in "Tt":
                return False
        return True

    try:
        wait_for(all_stopped, timeout, interval=0.001)
    except BaseException:
        # Never leave it stopped: a stopped server cannot see its owner go, and would
        # outlive the run. (The caller's own SIGCONT is in a try it has not entered yet.)
        os.kill(pid, signal.SIGCONT)
        raise


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(interval)


def kill_servers(folder: str) -> None:
    for pid in server_pids(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=10)


_tcp_ports: dict[str, int] = {}


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private folder for sockets, key and pid files (the runtime folder too);
    every server started in it is killed after the test."""
    folder = tempfile.mkdtemp(prefix="fss-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)
    try:
        yield folder
    finally:
        kill_servers(folder)
        _tcp_ports.pop(folder, None)
        shutil.rmtree(folder, ignore_errors=True)


def make_app(backend: str, run_dir: str | None, name: str = "test_app", **config: Any) -> Flask:
    """An app on ``backend`` whose server files all live in ``run_dir``."""
    app = Flask(name)
    if backend in ("redis", "redis-cluster"):
        url = _redis["url" if backend == "redis" else "cluster_url"]
        assert url, f"use the {backend.replace('-', '_')}_url fixture (the backend fixture does)"
        backend = "redis"
        app.config["SHAREDSTATE_REDIS_URL"] = url
        # Each test's own namespace: tests never see each other's keys.
        app.config["SHAREDSTATE_NAMESPACE"] = f"{name}-{os.path.basename(run_dir or 'x')}"
        # Redis cannot see a holder go: its locks end with their lease. Keep it short.
        app.config["SHAREDSTATE_LEASE"] = 2.0
        app.config["SHAREDSTATE_KEY"] = "test-key-for-signing-values"  # Redis values are signed
    if backend == "manager-tcp":
        assert run_dir is not None
        backend = "manager"
        app.config["SHAREDSTATE_PORT"] = _tcp_ports.setdefault(run_dir, free_port())
    app.config["SHAREDSTATE_BACKEND"] = backend
    if run_dir is not None:
        app.config["SHAREDSTATE_SOCKET"] = os.path.join(run_dir, f"{name}.sock")
    app.config.update(config)
    return app


_redis: dict[str, str] = {"url": "", "cluster_url": ""}


def start_redis(port: int, folder: str, *options: str) -> Any:
    """Start a real redis-server on ``port`` (loopback, no persistence); wait until it answers."""
    import subprocess

    import redis

    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("the redis tests need redis-server: apt-get install redis-server")
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
            "--logfile",
            os.path.join(folder, f"redis-{port}.log"),
            *options,
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client) or proc.poll() is not None, timeout=20)
    finally:
        client.close()
    if proc.poll() is not None:
        raise RuntimeError(f"redis-server exited at start: see {folder}/redis-{port}.log")
    return proc


def stop_process(proc: Any) -> None:
    """Stop a process we started, by its pid: SIGTERM, then SIGKILL."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole session."""
    port = free_port()
    proc = start_redis(port, str(tmp_path_factory.mktemp("redis")))
    _redis["url"] = f"redis://127.0.0.1:{port}/0"
    try:
        yield _redis["url"]
    finally:
        _redis["url"] = ""
        stop_process(proc)


def start_redis_cluster(folder: str, masters: int = 3) -> tuple[list[Any], list[int]]:
    """Start ``masters`` cluster-enabled redis-servers on loopback, join them with
    ``redis-cli --cluster create`` (no replicas), and wait until every node says
    ``cluster_state:ok`` and knows every other. Stops what it started if that fails."""
    import subprocess

    import redis

    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("the cluster tests need redis-cli: apt-get install redis-tools")
    procs: list[Any] = []
    ports: list[int] = []
    try:
        for _ in range(masters):
            port = free_port()
            options = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            # The cluster bus: a free port of its own (port + 10000 may be taken, or > 65535).
            options += ["--cluster-port", str(free_port())]
            procs.append(start_redis(port, folder, *options))
            ports.append(port)
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports]]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        wait_for_cluster([redis.Redis(port=p) for p in ports])
    except BaseException:
        for proc in procs:
            stop_process(proc)
        raise
    return procs, ports


def wait_for_cluster(clients: list[Any]) -> None:
    """Wait until every node (one client each; closed after) says the cluster is ok
    and knows all the others."""
    try:

        def ready() -> bool:
            for client in clients:
                info = client.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
                nodes = client.execute_command("CLUSTER", "NODES")
                if len(nodes.decode().splitlines()) != len(clients):
                    return False
            return True

        wait_for(ready, timeout=60, interval=0.1)
    finally:
        for client in clients:
            client.close()


#: the cluster's node ports, for tests that move slots
cluster_ports: list[int] = []
#: the cluster's redis-server processes, by port (for tests that stop one for a moment)
cluster_procs: dict[int, Any] = {}


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-master Redis Cluster on free loopback ports, for the whole session."""
    procs, ports = start_redis_cluster(str(tmp_path_factory.mktemp("redis-cluster")))
    cluster_ports[:] = ports
    cluster_procs.update(zip(ports, procs, strict=True))
    _redis["cluster_url"] = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    try:
        yield _redis["cluster_url"]
    finally:
        _redis["cluster_url"] = ""
        cluster_ports.clear()
        cluster_procs.clear()
        for proc in procs:
            stop_process(proc)


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """WSGI servers a test starts (tests/servers.py); stopped by pid whatever happens."""
    started: list[Any] = []
    yield started
    for server in started:
        if not server.stopped:
            server.stop(signal.SIGKILL)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    if request.param == "redis-cluster":
        request.getfixturevalue("redis_cluster_url")
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def app(backend: str, run_dir: str) -> Flask:
    """The app that pytest-flask's fixtures (client, ...) use: one per backend."""
    return make_app(backend, run_dir, SHAREDSTATE_TIMEOUT=3.0)


@pytest.fixture
def shared(app: Flask) -> Iterator[SharedState]:
    ext = SharedState(app)
    yield ext
    app.extensions["sharedstate"].backend.close()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes a test starts; killed (after SIGCONT, if stopped) at the end."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.join(10)


def time_unanswered(
    operations: list[tuple[str, Callable[[], Any]]], took: dict[str, float]
) -> None:
    """Run each operation against a Redis that does not answer: each must raise
    SharedStateUnavailable ("did not answer"); record in ``took`` how long each took."""
    for name, operation in operations:
        start = time.monotonic()
        with pytest.raises(SharedStateUnavailable, match="did not answer"):
            operation()
        took[name] = time.monotonic() - start
