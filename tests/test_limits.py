"""Finite resources and hostile peers: descriptors, slow handshakes, a stopped server,
a deleted socket file. Each costs at most its own request, never acknowledged data."""

from __future__ import annotations

import multiprocessing
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.server import protocol
from flask_sharedstate.server.processes import start_time as process_start_time

import workers
from conftest import free_port, make_app, pid_alive, sigstop, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ctx = multiprocessing.get_context("spawn")

#: More connections than the usual soft limit of open files (1024).
FLOOD = 1100


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """This process holds the flood's connections: raise its own soft limit to fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * FLOOD
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs a hard limit of {want} open files (ulimit -Hn is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Server:
    """A state server started by the test (not detached: its child), and its app."""

    proc: subprocess.Popen[bytes]
    path: str
    key: bytes
    log_path: str
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def shared(self, timeout: float = 5.0, **config: Any) -> SharedState:
        if self.port is not None:
            config["SHAREDSTATE_PORT"] = self.port
        app = make_app(
            "manager",
            None,
            SHAREDSTATE_SOCKET=self.path,
            SHAREDSTATE_KEY=self.key,
            SHAREDSTATE_TIMEOUT=timeout,
            **config,
        )
        return SharedState(app)

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.fixture
def start_server(run_dir: str) -> Iterator[Any]:
    """Start ``python -m flask_sharedstate.server`` owned by this process, optionally
    under an open-file limit; stopped by pid (SIGCONT first) whatever happens."""
    started: list[Server] = []

    def start(
        *options: str, nofile: tuple[int, int] | None = None, port: int | None = None
    ) -> Server:
        path = os.path.join(run_dir, f"limits{len(started)}.sock")
        key = secrets.token_hex(32).encode()
        log_path = path + ".log"
        me = os.getpid()
        command = [sys.executable, "-m", "flask_sharedstate.server"]
        command += ["--unix", path] if port is None else ["--tcp", f"127.0.0.1:{port}"]
        # The socket path stays in the command line even for TCP: conftest kills by it.
        command += ["--pid-file", path + ".pid"]
        command += ["--owner-pid", str(me), "--owner-start", str(process_start_time(me))]
        command += list(options)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                preexec_fn=limit,  # noqa: PLW1509 - only setrlimit, before exec
            )
        server = Server(proc, path, key, log_path, port)
        started.append(server)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(key)
        proc.stdin.close()
        line = proc.stdout.readline().decode()
        assert line.startswith("ready"), f"{line!r}\n{server.log()}"
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.proc.poll() is None:
                os.kill(server.pid, signal.SIGCONT)
                server.proc.kill()
            server.proc.wait(30)
            if server.proc.stdout is not None:
                server.proc.stdout.close()


def open_sessions(path: str, key: bytes, count: int) -> tuple[list[Connection], list[str]]:
    """Open ``count`` authenticated sessions (handshake and hello) from this process;
    return those held, and the error of each one refused."""
    held: list[Connection] = []
    refused: list[str] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            refused.append(f"{type(exc).__name__}: {exc}")
            continue
        sock.settimeout(None)
        protocol.set_receive_timeout(sock, 10)
        conn = Connection(sock.detach())
        try:
            protocol.client_handshake(conn, key)
            conn.send_bytes(protocol.dumps(("hello", protocol.PROTOCOL_VERSION, "flood", 5.0)))
            assert protocol.loads(conn.recv_bytes())[0] is True
        except Exception as exc:  # noqa: BLE001 - every refusal is reported
            conn.close()
            refused.append(f"{type(exc).__name__}: {exc}")
            continue
        held.append(conn)
    return held, refused


def close_all(conns: list[Connection]) -> None:
    for conn in conns:
        conn.close()


def read_key(path: str, key: bytes, name: str) -> Any:
    """In a child process: read ``name`` from the server at ``path``."""
    shared = workers.make_shared(path, SHAREDSTATE_KEY=key, SHAREDSTATE_NAMESPACE="test_app")
    return shared.get(name)


def incr_and_read(path: str, name: str, config: dict[str, Any]) -> Any:
    """In a child process: increment ``name`` on the app's server, return the new value."""
    return workers.make_shared(path, timeout=10.0, **config).incr(name)


def read_counter(path: str, key: bytes) -> Any:
    """Read "n" from a new process: a fresh connection, as another worker would make."""
    with ctx.Pool(1) as pool:
        return pool.apply(read_key, (path, key, "n"))


# -- descriptors ---------------------------------------------------------------------


def test_owner_check_is_not_fooled_by_descriptor_exhaustion() -> None:
    """With every descriptor in use, the owner check answers "alive", never "gone"."""
    script = (
        "import os, resource\n"
        "from flask_sharedstate.server import processes\n"
        "start = processes.start_time(os.getppid())\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True: held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError as exc: assert exc.errno == 24, exc\n"
        "print(processes.start_time(os.getppid()), processes.process_gone(os.getppid(), start))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    unknown, gone = out.stdout.split()
    assert unknown == "None"  # /proc could not be read: the start time is unknown...
    assert gone == "False", "a full descriptor table was read as the owner's death"


@pytest.mark.parametrize("nofile", ["soft-1024", "hard-1024"])
def test_connection_flood_keeps_every_write(start_server: Any, nofile: str) -> None:
    """1,100 connections against a 1,024-descriptor limit: the excess is refused with a
    clear error, and every acknowledged write survives on a server that still serves."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if nofile == "soft-1024" else 1024
    server = start_server(nofile=(1024, hard))
    shared = server.shared()
    for _ in range(100):
        shared.incr("n")
    acknowledged = 100
    held, refused = open_sessions(server.path, server.key, FLOOD)
    # And peers that connect and say nothing: they hold descriptors while they may.
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(50)]
    try:
        for sock in silent:
            sock.connect(server.path)
        peak = server.descriptors()
        # The flood happened, and held the server at its limit for two owner checks.
        assert len(held) + len(refused) == FLOOD
        assert refused, f"no connection was refused; the server holds {peak} descriptors"
        for _ in range(3):
            time.sleep(1)
            shared.incr("n")  # through the app's own link, opened before the flood
            acknowledged += 1
        assert server.proc.poll() is None, f"the server exited:\n{server.log()}"
    finally:
        close_all(held)
        for sock in silent:
            sock.close()
    if nofile == "soft-1024":
        # It raised its own soft limit: one process held more than 1,024 connections.
        assert peak > 1024
        assert all("SHAREDSTATE_MAX_CONNECTIONS_PER_PEER" in error for error in refused)
    else:
        assert all("SHAREDSTATE_MAX_CONNECTIONS" in error for error in refused)
    assert all(error.startswith("Refused: ") for error in refused), refused[:3]
    assert shared.get("n") == acknowledged
    assert read_counter(server.path, server.key) == acknowledged
    connections = shared.state().backend.call("info")["connections"]
    assert connections["refused"] >= len(refused)
    assert connections["max"] == (4096 if nofile == "soft-1024" else 1024 - 64)
    assert server.proc.poll() is None


def test_refused_client_gets_a_clear_error(start_server: Any) -> None:
    """A process past its connection limit gets SharedStateUnavailable naming the limit
    and its key for a new connection (another app's), while the threads of an app already
    connected share its connection and are served; once connections close, it connects."""
    server = start_server()
    shared = server.shared()
    shared.set("n", 1)  # this app's connection: one of this process's connections
    other = server.shared(SHAREDSTATE_CLIENT_CACHE=0)  # another app: its own connection
    held, refused = open_sessions(server.path, server.key, 1023)
    errors: list[BaseException] = []
    results: list[Any] = []

    def other_thread() -> None:
        try:
            results.append(other.get("n"))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    def same_app_thread() -> None:
        try:
            results.append(shared.incr("m"))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    try:
        assert not refused, refused[:3]
        worker = threading.Thread(target=same_app_thread)
        worker.start()
        worker.join(30)
        assert results == [1] and not errors, (results, errors)
        results.clear()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(30)
        assert not worker.is_alive()
        assert results == [] and len(errors) == 1, (results, errors)
        error = errors[0]
        assert isinstance(error, SharedStateUnavailable), repr(error)
        assert "SHAREDSTATE_MAX_CONNECTIONS_PER_PEER" in str(error)
        assert "1024" in str(error)
        assert server.path in str(error)
    finally:
        close_all(held)
    errors.clear()
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(30)
    assert results == [1] and not errors, errors


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_configured_per_peer_limit(start_server: Any, transport: str) -> None:
    """--max-connections-per-peer (SHAREDSTATE_MAX_CONNECTIONS_PER_PEER) caps one process
    on a unix socket, one address on TCP; connections past it (an app each) get the
    clear error."""
    port = free_port() if transport == "tcp" else None
    server = start_server("--max-connections-per-peer", "3", port=port)
    apps = [server.shared() for _ in range(4)]  # one connection each
    outcomes: list[Any] = []
    release = threading.Event()

    def thread(shared: SharedState) -> None:
        try:
            outcomes.append(shared.incr("n"))
        except SharedStateUnavailable as exc:
            outcomes.append(exc)
        release.wait(30)  # keep the connections open

    threads = [threading.Thread(target=thread, args=(shared,)) for shared in apps]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) == 4, timeout=30)
    finally:
        release.set()
        for t in threads:
            t.join(30)
    errors = [o for o in outcomes if isinstance(o, SharedStateUnavailable)]
    assert sorted(o for o in outcomes if isinstance(o, int)) == [1, 2, 3]
    assert len(errors) == 1
    who = "address 127.0.0.1" if transport == "tcp" else f"process {os.getpid()}"
    assert f"{who} already holds 3 connections" in str(errors[0])
    assert "SHAREDSTATE_MAX_CONNECTIONS_PER_PEER = 3" in str(errors[0])


# -- a slow handshake ------------------------------------------------------------------


def test_slow_handshake_is_cut_at_one_deadline(start_server: Any) -> None:
    """A peer sending one byte every 2 s is cut when the whole handshake's deadline
    (5 s) passes, however often a byte arrives."""
    server = start_server()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(server.path)
    started = time.monotonic()
    closed_after = None
    try:
        assert sock.recv(4096)  # the challenge
        # A 36-byte answer, trickled: each byte arrives well inside any per-read bound.
        trickle = (32).to_bytes(4, "big") + b"x" * 32
        for byte in trickle:
            if time.monotonic() - started > 20:
                break
            try:
                sock.send(bytes([byte]))
                sock.settimeout(2)
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue  # still open: send the next byte
            except OSError:
                closed_after = time.monotonic() - started
                break
    finally:
        sock.close()
    assert closed_after is not None, "the trickling peer was still connected after 20 s"
    assert closed_after < protocol.HANDSHAKE_TIMEOUT + 5
    assert server.shared().incr("n") == 1


# -- a stopped server ------------------------------------------------------------------


def call_stopped(server: Server, timeout: float, call: Any, limit: float) -> tuple[Any, Any]:
    """In a thread: connect and write, SIGSTOP the server, then ``call(shared)``.

    Returns (seconds the call took, or None if still running after ``limit``; the
    exception it raised). Links are per thread, so the thread connects for itself.
    """
    shared = server.shared(timeout=timeout)
    connected = threading.Event()
    stopped = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        shared.set("n", 1)
        connected.set()
        stopped.wait(30)
        start = time.monotonic()
        try:
            call(shared)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert connected.wait(30)
        sigstop(server.pid)
        stopped.set()
        thread.join(limit)
        return outcome.get("seconds"), outcome.get("error")
    finally:
        os.kill(server.pid, signal.SIGCONT)
        thread.join(30)


def test_large_write_to_stopped_server_is_bounded(start_server: Any) -> None:
    """A 1 MiB set to a SIGSTOPped server fails within SHAREDSTATE_TIMEOUT (+ slack)."""
    timeout = 1.0
    seconds, error = call_stopped(
        start_server(), timeout, lambda shared: shared.set("big", b"x" * (1 << 20)), 20
    )
    assert seconds is not None, "the write was still blocked after 20 s"
    assert isinstance(error, SharedStateUnavailable), repr(error)
    assert "SHAREDSTATE_TIMEOUT" in str(error)
    assert seconds < timeout + 1.5


@pytest.mark.parametrize("operation", ["get", "lock-wait-2s"])
def test_reply_wait_is_bounded_by_timeout(start_server: Any, operation: str) -> None:
    """A call to a SIGSTOPped server fails within SHAREDSTATE_TIMEOUT, plus the lock
    wait it asked for, plus 1 s: never twice the timeout."""
    timeout = 3.0
    if operation == "get":
        call, bound = (lambda shared: shared.get("n")), timeout + 1.5
    else:
        call, bound = (lambda shared: shared.lock.acquire(timeout=2.0)), timeout + 2.0 + 1.5
    seconds, error = call_stopped(start_server(), timeout, call, 30)
    assert seconds is not None, "the call was still waiting after 30 s"
    assert isinstance(error, SharedStateUnavailable), repr(error)
    assert "did not answer" in str(error)
    assert seconds < bound, f"took {seconds:.2f}s, bound {bound}s"


# -- a deleted socket file -----------------------------------------------------------------


def state_servers(socket_path: str) -> list[int]:
    """Every running state server process listening at ``socket_path``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"flask_sharedstate.server" in argv and os.fsencode(socket_path) in argv:
            if pid_alive(int(name)):
                pids.append(int(name))
    return pids


@pytest.mark.parametrize("persist", [False, True])
def test_deleted_socket_file_leaves_one_server(run_dir: str, persist: bool) -> None:
    """After its socket file is deleted, the app goes on with the one server it had:
    no second server starts beside it, and no acknowledged write is lost."""
    path = os.path.join(run_dir, "app.sock")
    config = {"SHAREDSTATE_PERSIST_PATH": os.path.join(run_dir, "state.db")} if persist else {}
    shared = workers.make_shared(path, timeout=10.0, **config)
    for _ in range(10):
        shared.incr("n")
    first = workers.server_pid(shared)
    os.unlink(path)
    shared.state().backend.close()  # the next call connects anew, as a new worker would
    for _ in range(10):
        shared.incr("n")
    # A new process, too.
    with ctx.Pool(1) as pool:
        assert pool.apply(incr_and_read, (path, "n", config)) == 21
    wait_for(lambda: len(state_servers(path)) <= 1, timeout=15)
    time.sleep(2)  # long enough for a second server, or the first's check, to act
    assert state_servers(path) == [first]
    assert shared.get("n") == 21
    shared.state().backend.close()


def test_replaced_socket_file_stops_the_old_server(run_dir: str) -> None:
    """If the socket and pid files are both deleted and a new server starts, the old one
    sees its socket file replaced and stops: one server remains."""
    path = os.path.join(run_dir, "app.sock")
    config = {"SHAREDSTATE_PERSIST_PATH": os.path.join(run_dir, "state.db")}
    shared = workers.make_shared(path, timeout=10.0, **config)
    shared.incr("n")
    first = workers.server_pid(shared)
    os.kill(first, signal.SIGSTOP)  # so that it cannot listen again before the new one starts
    try:
        os.unlink(path)
        os.unlink(path + ".pid")
        shared.state().backend.close()
        assert shared.incr("n") == 2  # the new server restored the journal
        second = workers.server_pid(shared)
        assert second != first
    finally:
        os.kill(first, signal.SIGCONT)
    wait_for(lambda: not pid_alive(first), timeout=15)
    assert state_servers(path) == [second]
    shared.state().backend.close()


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"SHAREDSTATE_MAX_CONNECTIONS": 0}, "SHAREDSTATE_MAX_CONNECTIONS = 0 is not valid"),
        ({"SHAREDSTATE_MAX_CONNECTIONS": "many"}, "a positive whole number"),
        ({"SHAREDSTATE_MAX_CONNECTIONS_PER_PEER": True}, "SHAREDSTATE_MAX_CONNECTIONS_PER_PEER"),
        ({"SHAREDSTATE_MAX_CONNECTIONS_PER_PEER": 2.5}, "a positive whole number"),
        (
            {"SHAREDSTATE_MAX_CONNECTIONS": 10, "SHAREDSTATE_MAX_CONNECTIONS_PER_PEER": 20},
            "is more than SHAREDSTATE_MAX_CONNECTIONS = 10",
        ),
    ],
)
def test_bad_connection_limits_name_the_key(config: dict[str, Any], message: str) -> None:
    """A wrong connection limit is a ConfigError at init_app naming the key."""
    app = Flask("limits_app")
    app.config.update(config)
    with pytest.raises(ConfigError) as info:
        SharedState(app)
    assert message in str(info.value)


def test_connection_limits_are_read_from_the_config() -> None:
    """The limits reach the settings, from numbers or from environment-style strings."""
    app = Flask("limits_app")
    app.config.update(SHAREDSTATE_MAX_CONNECTIONS="300", SHAREDSTATE_MAX_CONNECTIONS_PER_PEER=100)
    SharedState(app)
    settings = app.extensions["sharedstate"].settings
    assert (settings.max_connections, settings.max_connections_per_peer) == (300, 100)


def test_configured_limits_reach_the_server_the_app_starts(run_dir: str) -> None:
    """An app's SHAREDSTATE_MAX_CONNECTIONS* are the limits of the server its first use
    starts (the launcher passes them), as `info` reports."""
    app = make_app(
        "manager",
        run_dir,
        SHAREDSTATE_MAX_CONNECTIONS=300,
        SHAREDSTATE_MAX_CONNECTIONS_PER_PEER=7,
    )
    shared = SharedState(app)
    try:
        info = shared.state().backend.call("info")
        assert info["connections"]["max"] == 300
        assert info["connections"]["max_per_peer"] == 7
    finally:
        shared.state().backend.close()


def test_a_starter_with_many_descriptors_starts_the_server(run_dir: str) -> None:
    """A process holding more than 1,024 descriptors (a busy gthread or gevent worker) can
    still elect and start the server: waiting for it to be ready is not limited by select()."""
    script = (
        "import os, resource, sys\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))\n"
        "held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]\n"
        "import workers\n"
        "print(workers.make_shared(sys.argv[1]).incr('n'))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    out = subprocess.run(
        [sys.executable, "-c", script, os.path.join(run_dir, "many.sock")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"
