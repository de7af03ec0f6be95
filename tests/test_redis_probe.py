"""Probes of the redis backend in production setups: what the first tests missed.

Real redis-servers (the session's cluster, a plain one), real sockets; every
process or listener a test starts is stopped by the test, whatever happens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_client
from flask import Flask
from flask.testing import FlaskCliRunner
from test_redis_cluster import Cluster
from test_redis_production import SERVICE, master_port_now, start_sentinels

from flask_sharedstate import ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.cli import sharedstate

from conftest import (
    cluster_ports,
    free_port,
    make_app,
    start_redis,
    start_redis_cluster,
    stop_process,
    wait_for,
)


def status(app: Flask) -> tuple[int, str, BaseException | None]:
    runner: FlaskCliRunner = app.test_cli_runner()
    result = runner.invoke(sharedstate, ["status"])
    return result.exit_code, result.output, result.exception


def test_status_on_a_cluster_shows_the_master_of_the_namespaces_slot(
    redis_cluster_url: str, run_dir: str
) -> None:
    """`flask sharedstate status` on a cluster reports the master that holds the
    namespace's slot, for namespaces on each of the three masters."""
    nodes = Cluster(list(cluster_ports))
    try:
        by_owner: dict[int, str] = {}
        for i in range(200):  # a namespace on each master
            name = f"status-{i}"
            by_owner.setdefault(nodes.owner(nodes.slot_of(name)), name)
            if len(by_owner) == len(cluster_ports):
                break
        assert len(by_owner) == len(cluster_ports), by_owner
        for port, namespace in by_owner.items():
            app = make_app("redis-cluster", run_dir, name="status", SHAREDSTATE_NAMESPACE=namespace)
            shared = SharedState(app)
            try:
                shared.set("x", 1)
                code, out, _ = status(app)
                assert code == 0, out
                assert f"at 127.0.0.1:{port} (the master of slot" in out, (port, out)
                assert "keys:        1" in out, out
            finally:
                shared.state().backend.close()
    finally:
        nodes.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_status_when_redis_is_down_is_a_clear_error(run_dir: str, kind: str) -> None:
    """status with its Redis (or cluster) unreachable: an error saying so, not a traceback."""
    app = Flask("down")
    scheme = "redis+cluster://" if kind == "redis-cluster" else "redis://"
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=f"{scheme}127.0.0.1:{free_port()}",
        SHAREDSTATE_KEY="k" * 32,
        SHAREDSTATE_TIMEOUT=1.0,
    )
    SharedState(app)
    code, out, exc = status(app)
    assert code == 1 and isinstance(exc, SystemExit), (code, out, repr(exc))
    assert "Error: Redis at " in out and "SHAREDSTATE_TIMEOUT" in out, out


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000?password=s3cr3t",
        "redis://:s3cr3t/x@127.0.0.1:6379/0",
        "redis://:s3cr3t?x@127.0.0.1:6379/0",
        "rediss://user:s3cr3t#x@127.0.0.1:6379/0",
        "redis+sentinel://:s3cr3t/x@127.0.0.1:26379/service",
        "redis+sentinel://:s3cr3t?x@127.0.0.1:26379/service",
        "redis+cluster://:s3cr3t/x@127.0.0.1:7000",
    ],
)
def test_a_password_is_never_shown_by_a_url_that_does_not_parse(url: str) -> None:
    """A URL whose password has a reserved character (or sits in a cluster URL's query)
    is a ConfigError at init_app that shows no piece of it (or, where it still reads
    unambiguously, works, and the backend's address shows none either)."""
    app = Flask("leak")
    app.config.update(
        SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL=url, SHAREDSTATE_KEY="k" * 32
    )
    try:
        shared = SharedState(app)
    except ConfigError as exc:
        message = str(exc)
        assert "SHAREDSTATE_REDIS_URL" in message, message
    else:
        message = shared.state().backend.address
        shared.state().backend.close()
    assert "s3cr" not in message, message


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)  # (closing it would not wake a blocked accept)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()
    for conn in held:
        conn.close()


def test_sentinels_that_never_answer_fail_a_read_once_and_say_how_long(
    silent_listener: int,
) -> None:
    """Three sentinels that accept and never answer: a read is not sent through the
    whole discovery a second time, and the error says each sentinel had the timeout."""
    timeout = 1.0
    hosts = ",".join([f"127.0.0.1:{silent_listener}"] * 3)
    app = Flask("silent")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=f"redis+sentinel://{hosts}/service",
        SHAREDSTATE_KEY="k" * 32,
        SHAREDSTATE_TIMEOUT=timeout,
    )
    shared = SharedState(app)
    try:
        took, messages = {}, {}
        for name, operation in [
            ("get", lambda: shared.get("x")),
            ("set", lambda: shared.set("x", 1)),
        ]:
            start = time.monotonic()
            with pytest.raises(SharedStateUnavailable) as info:
                operation()
            took[name], messages[name] = time.monotonic() - start, str(info.value)
        # One discovery: each of the 3 sentinels waited for once (6 s if sent twice).
        assert all(2.5 < t < 3 * timeout + 2 for t in took.values()), took
        for message in messages.values():
            assert "none of the 3 sentinel(s)" in message, message
            assert "each given 1s" in message, message
    finally:
        shared.state().backend.close()


def test_tls_port_that_never_handshakes_fails_within_the_timeout(silent_listener: int) -> None:
    """rediss:// to a port that accepts TCP and never completes the TLS handshake:
    SharedStateUnavailable after about the timeout, never a hang."""
    app = Flask("handshake")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=f"rediss://localhost:{silent_listener}/0",
        SHAREDSTATE_KEY="k" * 32,
        SHAREDSTATE_TIMEOUT=1.0,
    )
    shared = SharedState(app)
    try:
        for operation in (lambda: shared.get("x"), lambda: shared.set("x", 1)):
            start = time.monotonic()
            with pytest.raises(SharedStateUnavailable, match="did not answer"):
                operation()
            assert 0.9 < time.monotonic() - start < 2 * 1.0 + 2
    finally:
        shared.state().backend.close()


@pytest.fixture
def own_cluster(tmp_path: Any) -> Iterator[dict[str, Any]]:
    """A 3-master cluster of this test's own (it kills a node); stopped by pid."""
    folder = str(tmp_path)
    procs, ports = start_redis_cluster(folder)
    started = {"folder": folder, "procs": dict(zip(ports, procs, strict=True)), "ports": ports}
    try:
        yield started
    finally:
        for proc in started["procs"].values():
            stop_process(proc)


def _bus_port(folder: str, port: int) -> int:
    """The cluster bus port a node announced (its nodes.conf, the ``myself`` line)."""
    with open(os.path.join(folder, f"nodes-{port}.conf")) as f:
        for line in f:
            if "myself" in line:
                return int(line.split()[1].split("@")[1].split(",")[0])
    raise AssertionError(f"no myself line in nodes-{port}.conf")


def test_sigkilled_slot_owner_fails_fast_then_recovers_and_forked_children_work(
    own_cluster: dict[str, Any],
) -> None:
    """On a cluster: a forked child (gunicorn --preload style) uses the parent's client;
    SIGKILL the master of the namespace's slot: each operation is SharedStateUnavailable
    (no hang); restarted (empty, no persistence), the same app works again, defaults back."""
    ports = own_cluster["ports"]
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    app = Flask("killed")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=url,
        SHAREDSTATE_KEY="k" * 32,
        SHAREDSTATE_NAMESPACE="killed",
        SHAREDSTATE_TIMEOUT=1.0,
    )
    shared = SharedState(app, defaults={"d": 1})
    try:
        assert shared.incr("n") == 1  # the parent's connections are open
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                with shared.lock("l"):
                    code = 0 if shared.incr("n") == 2 else 3
                with shared.atomic():
                    shared.dict["n"] += 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert shared.incr("n") == 4  # the parent's client after the fork, too
        nodes = Cluster(ports)
        try:
            owner = nodes.owner(nodes.slot_of(app.config["SHAREDSTATE_NAMESPACE"]))
        finally:
            nodes.close()
        bus = _bus_port(own_cluster["folder"], owner)
        proc = own_cluster["procs"][owner]
        proc.kill()
        proc.wait(10)
        for operation in (lambda: shared.get("n"), lambda: shared.incr("n")):
            start = time.monotonic()
            with pytest.raises(SharedStateUnavailable, match="Redis at redis\\+cluster://"):
                operation()
            assert time.monotonic() - start < 4 * 1.0 + 2
        options = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{owner}.conf"]
        own_cluster["procs"][owner] = start_redis(
            owner, own_cluster["folder"], *options, "--cluster-port", str(bus)
        )

        def works() -> bool:
            try:
                return shared.incr("n") == 1  # the node came back empty
            except SharedStateUnavailable:
                return False

        wait_for(works, timeout=30, interval=0.2)
        assert shared.get("d") == 1  # the defaults, applied again on the new connection
    finally:
        shared.state().backend.close()


@pytest.fixture
def sentinel_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The redis-servers and sentinels a test starts; each stopped by its pid at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc)


def test_sentinel_failover_of_a_live_master_moves_writes_to_the_new_one(
    tmp_path: Any, sentinel_procs: list[subprocess.Popen[bytes]]
) -> None:
    """SENTINEL FAILOVER while the old master stays up: once the sentinels name the new
    master (and a check interval passed), writes go there, not to the old master, which
    would drop them when it turns replica. A forked child uses the same client too."""
    s = start_sentinels(str(tmp_path), sentinel_procs)
    app = Flask("demoted")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=s["url"],
        SHAREDSTATE_KEY="k" * 32,
        SHAREDSTATE_NAMESPACE="demoted",
        SHAREDSTATE_TIMEOUT=2.0,
    )
    shared = SharedState(app)
    old = redis_client.Redis(port=s["master_port"], socket_timeout=5)
    new = redis_client.Redis(port=s["replica_port"], socket_timeout=5)
    try:
        assert shared.incr("n") == 1  # a pooled connection to the (old) master
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                code = 0 if shared.incr("n") == 2 else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        sentinel = redis_client.Redis(port=s["sentinel_ports"][0], socket_timeout=5)
        try:
            sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            sentinel.close()
        wait_for(lambda: master_port_now(s["sentinel_ports"]) == s["replica_port"], timeout=30)
        time.sleep(1.5)  # the backend asks the sentinels each SENTINEL_CHECK (1 s)
        still_master = old.info("replication")["role"] == "master"
        before = int(new.get("{demoted}:k:n") or 0)
        for _ in range(10):
            shared.incr("n")
        after = int(new.get("{demoted}:k:n") or 0)
        assert after == before + 10, (before, after, "old still master:", still_master)
    finally:
        old.close()
        new.close()
        shared.state().backend.close()
