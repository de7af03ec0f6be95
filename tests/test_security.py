"""Bad input to the state server, keys, permissions: the server keeps serving."""

from __future__ import annotations

import os
import pickle
import socket
import stat
import struct
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from flask_sharedstate import AuthenticationError, ConfigError, SharedState
from flask_sharedstate.server import protocol

import workers
from conftest import make_app


@pytest.fixture
def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, "app.sock")


@pytest.fixture
def here(socket_path: str) -> Iterator[SharedState]:
    shared = workers.make_shared(socket_path, timeout=3.0)
    shared.set("alive", True)
    yield shared
    shared.state().backend.close()


def raw_connection(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def authenticated(path: str) -> Connection:
    """A connection that passed the handshake and hello, for sending raw requests."""
    with open(path + ".key", "rb") as f:
        key = f.read()
    sock = raw_connection(path)
    sock.settimeout(None)
    protocol.set_receive_timeout(sock, 5)
    conn = Connection(sock.detach())
    protocol.client_handshake(conn, key)
    conn.send_bytes(protocol.dumps(("hello", protocol.PROTOCOL_VERSION, "worker_app", 3.0)))
    assert protocol.loads(conn.recv_bytes())[0] is True
    return conn


def assert_serving(shared: SharedState) -> None:
    """The server still answers another client, from a fresh connection too."""
    assert shared.incr("served") >= 1
    shared.state().backend.close()
    assert shared.get("alive") is True


def test_random_bytes_leave_server_serving(here: SharedState, socket_path: str) -> None:
    """Garbage sent before the handshake costs only that connection."""
    pid = workers.server_pid(here)
    for size in (1, 7, 300, 70000):
        sock = raw_connection(socket_path)
        try:
            sock.sendall(os.urandom(size))
        except OSError:
            pass  # the server may hang up before reading it all
        sock.close()
    assert_serving(here)
    assert workers.server_pid(here) == pid


def test_truncated_message_leaves_server_serving(here: SharedState, socket_path: str) -> None:
    """A message cut short (header promises more than comes) does not stall others."""
    sock = raw_connection(socket_path)
    sock.sendall(struct.pack("!i", 100) + b"0123456789")
    # Keep it open: the server must not wait on it while serving others.
    assert_serving(here)
    sock.close()
    conn = authenticated(socket_path)
    conn._send(struct.pack("!i", 1000) + b"partial")  # type: ignore[attr-defined]
    conn.close()
    assert_serving(here)


def test_silent_client_does_not_stall_server(here: SharedState, socket_path: str) -> None:
    """Clients that connect and say nothing are dropped after the handshake timeout."""
    idle = [raw_connection(socket_path) for _ in range(20)]
    try:
        assert_serving(here)
    finally:
        for sock in idle:
            sock.close()


def test_oversized_message_is_refused(here: SharedState, socket_path: str) -> None:
    """An authenticated client announcing a huge message loses its connection, no more."""
    conn = authenticated(socket_path)
    conn._send(struct.pack("!i", -1) + struct.pack("!Q", 2**40))  # type: ignore[attr-defined]
    with pytest.raises((EOFError, OSError)):
        conn.recv_bytes()
    conn.close()
    assert_serving(here)


def test_bad_requests_get_errors_and_connection_keeps_serving(
    here: SharedState, socket_path: str
) -> None:
    """Unknown operations, wrong arguments and non-pickles get an error reply."""
    conn = authenticated(socket_path)
    try:
        for request in (
            protocol.dumps(("no_such_op",)),
            protocol.dumps(("get",)),
            protocol.dumps(("set", "k", object.__new__(object).__class__)),
            protocol.dumps("not a tuple"),
            b"\x80\x05garbage",
        ):
            conn.send_bytes(request)
            reply = protocol.loads(conn.recv_bytes())
            assert reply[0] is False, request
        conn.send_bytes(protocol.dumps(("get", "alive")))
        assert protocol.loads(conn.recv_bytes()) == (True, pickle.dumps(True, protocol=5))
    finally:
        conn.close()
    assert_serving(here)


def test_wrong_key_raises_authentication_error(run_dir: str, socket_path: str) -> None:
    """A client with another key gets AuthenticationError naming SHAREDSTATE_KEY,
    and never sees the key in the message."""
    right = workers.make_shared(socket_path, SHAREDSTATE_KEY="right-key-0123456789")
    wrong = workers.make_shared(socket_path, SHAREDSTATE_KEY="wrong-key-0123456789")
    try:
        right.set("k", 1)
        with pytest.raises(AuthenticationError, match="SHAREDSTATE_KEY") as info:
            wrong.get("k")
        assert "wrong-key" not in str(info.value) and "right-key" not in str(info.value)
        assert right.get("k") == 1
    finally:
        right.state().backend.close()


def test_key_derived_from_secret_key(socket_path: str) -> None:
    """Without SHAREDSTATE_KEY, apps with the same SECRET_KEY connect, others do not."""
    one = workers.make_shared(socket_path, SECRET_KEY="s1")
    same = workers.make_shared(socket_path, SECRET_KEY="s1")
    other = workers.make_shared(socket_path, SECRET_KEY="s2")
    try:
        one.set("k", 1)
        assert same.get("k") == 1
        with pytest.raises(AuthenticationError):
            other.get("k")
    finally:
        one.state().backend.close()
        same.state().backend.close()


def test_permissions(here: SharedState, socket_path: str) -> None:
    """The socket, key file and log are 0600 and only their owner's."""
    for path in (socket_path, socket_path + ".key", socket_path + ".log", socket_path + ".lock"):
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, path
        assert info.st_uid == os.getuid()


def test_default_folder_is_private(monkeypatch: pytest.MonkeyPatch, run_dir: str) -> None:
    """The default runtime folder is made 0700, and one others can enter is refused."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", run_dir)
    app = make_app("manager", None, name="private_app")
    shared = SharedState(app)
    folder = os.path.join(run_dir, f"flask-sharedstate-{os.getuid()}")
    try:
        shared.set("k", 1)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    finally:
        shared.state().backend.close()
    os.chmod(folder, 0o755)
    app2 = make_app("manager", None, name="private_app2")
    shared2 = SharedState(app2)
    with pytest.raises(ConfigError, match="0700"):
        shared2.get("k")
    os.chmod(folder, 0o700)


def test_key_never_logged_or_shown(run_dir: str, socket_path: str) -> None:
    """The key appears in no repr, no log line and no error message."""
    key = "a-very-secret-key-value-42"
    shared = workers.make_shared(socket_path, SHAREDSTATE_KEY=key)
    try:
        shared.set("k", 1)
        state = shared.state()
        texts = [repr(state.settings), repr(state.backend), repr(shared), repr(shared.dict)]
        with open(socket_path + ".log") as f:
            texts.append(f.read())
        assert all(key not in text for text in texts)
        time.sleep(0.05)
    finally:
        shared.state().backend.close()
