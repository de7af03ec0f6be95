"""Bad input to the state server, keys, permissions: the server keeps serving."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from flask_sharedstate import AuthenticationError, ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.server import protocol

import workers
from conftest import kill_servers, make_app


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
    """Unknown operations and wrong arguments get an error reply to their request id,
    and the connection goes on serving."""
    conn = authenticated(socket_path)
    try:
        for rid, request in enumerate(
            (
                (1, "no_such_op"),
                (1, "get"),
                (1, "set", "k", object.__new__(object).__class__),
            ),
            start=1,
        ):
            conn.send_bytes(protocol.dumps((rid, *request)))
            reply = protocol.loads(conn.recv_bytes())
            assert reply[:2] == (rid, False), request
        conn.send_bytes(protocol.dumps((9, 1, "get", "alive")))
        assert protocol.loads(conn.recv_bytes()) == (9, True, pickle.dumps(True, protocol=5))
    finally:
        conn.close()
    assert_serving(here)


@pytest.mark.parametrize(
    "request_body",
    [protocol.dumps("not a tuple"), b"\x80\x05garbage", protocol.dumps(("get", "k"))],
    ids=["not-a-tuple", "not-a-pickle", "no-request-id"],
)
def test_unanswerable_request_closes_only_its_connection(
    here: SharedState, socket_path: str, request_body: bytes
) -> None:
    """A request without a request id (not a tuple, not a pickle) cannot be answered:
    the server hangs up on that connection alone and serves the others."""
    conn = authenticated(socket_path)
    try:
        conn.send_bytes(request_body)
        with pytest.raises((EOFError, OSError)):
            conn.recv_bytes()
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


NOBODY = 65534  # Debian's nobody and nogroup: a real second user


def as_nobody(*command: str) -> None:
    """Run ``command`` as the user nobody (the test runs as root)."""
    subprocess.run(command, check=True, user=NOBODY, group=NOBODY, extra_groups=[], timeout=30)


@pytest.fixture
def shared_folder() -> Iterator[str]:
    """A folder every user may write, like /tmp (mode 1777); emptied afterwards."""
    folder = tempfile.mkdtemp(prefix="fss-shared-", dir="/tmp")
    os.chmod(folder, 0o1777)
    try:
        yield folder
    finally:
        kill_servers(folder)
        shutil.rmtree(folder, ignore_errors=True)


def precious_file(folder: str, name: str) -> str:
    """A 0600 file of the app's user, for a planted symlink to aim at."""
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"precious\n")
    os.close(fd)
    return path


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="planting files as another user needs root")
def test_socket_folder_of_another_user_is_refused(run_dir: str, shared_folder: str) -> None:
    """A SHAREDSTATE_SOCKET folder that another user made, with .pid and .log symlinks
    planted in it, is refused with a ConfigError, and the files they aim at are untouched."""
    victim = precious_file(run_dir, "victim")
    folder = os.path.join(shared_folder, "app")
    as_nobody("mkdir", "-m", "0777", folder)
    as_nobody("ln", "-s", victim, os.path.join(folder, "app.sock.pid"))
    as_nobody("ln", "-s", victim, os.path.join(folder, "app.sock.log"))
    shared = workers.make_shared(os.path.join(folder, "app.sock"), timeout=3.0)
    try:
        with pytest.raises(ConfigError, match="SHAREDSTATE_SOCKET") as info:
            shared.set("k", 1)
        assert f"{folder} belongs to uid {NOBODY}" in str(info.value)
        assert "mkdir -m 0700" in str(info.value)
    finally:
        shared.state().backend.close()
    assert read(victim) == b"precious\n"
    assert sorted(os.listdir(folder)) == ["app.sock.log", "app.sock.pid"]


@pytest.mark.parametrize(("mode", "problem"), [(0o777, "0777"), (0o1777, "1777"), (0o770, "0770")])
def test_socket_folder_others_can_write_is_refused(run_dir: str, mode: int, problem: str) -> None:
    """A SHAREDSTATE_SOCKET folder of this user that others can write (even with the
    sticky bit, like /tmp) is refused: another user could plant files in it first; the
    message points to a 0700 folder of its own inside it."""
    folder = os.path.join(run_dir, "open")
    os.mkdir(folder)
    os.chmod(folder, mode)
    shared = workers.make_shared(os.path.join(folder, "app.sock"), timeout=3.0)
    try:
        with pytest.raises(ConfigError, match="SHAREDSTATE_SOCKET") as info:
            shared.set("k", 1)
        assert f"can be written by other users (mode {problem})" in str(info.value)
        # The fix that works: a 0700 folder of its own inside it, not a chmod of this one.
        assert f"mkdir -m 0700 {os.path.join(folder, 'app')}" in str(info.value)
    finally:
        shared.state().backend.close()
    assert os.listdir(folder) == []


def test_socket_in_a_shared_folder_is_pointed_to_a_folder_of_its_own(run_dir: str) -> None:
    """SHAREDSTATE_SOCKET = "/tmp/NAME.sock" is refused with the fix that works: a 0700
    folder of its own (/tmp/NAME/), never "mkdir -m 0700 /tmp"; nothing is written in /tmp."""
    name = f"fss-myapp-{os.getpid()}"
    socket_path = os.path.join("/tmp", f"{name}.sock")
    shared = workers.make_shared(socket_path, timeout=3.0)
    try:
        with pytest.raises(ConfigError, match="SHAREDSTATE_SOCKET") as info:
            shared.set("k", 1)
    finally:
        shared.state().backend.close()
    message = str(info.value)
    own = os.path.join("/tmp", name)
    assert f"mkdir -m 0700 {own}" in message
    assert f"SHAREDSTATE_SOCKET = {os.path.join(own, name + '.sock')!r}" in message
    assert "mkdir -m 0700 /tmp " not in message and "mkdir -m 0700 /tmp," not in message
    assert not [f for f in os.listdir("/tmp") if f.startswith(name)]


def test_socket_folder_that_is_a_symlink_is_refused(run_dir: str) -> None:
    """A SHAREDSTATE_SOCKET folder that is a symbolic link is refused (whoever owns the
    link decides where the server's files go)."""
    os.mkdir(os.path.join(run_dir, "real"), 0o700)
    os.symlink(os.path.join(run_dir, "real"), os.path.join(run_dir, "link"))
    shared = workers.make_shared(os.path.join(run_dir, "link", "app.sock"), timeout=3.0)
    try:
        with pytest.raises(ConfigError, match="SHAREDSTATE_SOCKET.*symbolic link"):
            shared.set("k", 1)
    finally:
        shared.state().backend.close()
    assert os.listdir(os.path.join(run_dir, "real")) == []


def test_private_socket_folder_of_this_user_works(run_dir: str) -> None:
    """A SHAREDSTATE_SOCKET folder that only this user can write (0755 here) is accepted."""
    folder = os.path.join(run_dir, "mine")
    os.mkdir(folder, 0o755)
    os.chmod(folder, 0o755)
    shared = workers.make_shared(os.path.join(folder, "app.sock"), timeout=3.0)
    try:
        shared.set("k", 1)
        assert shared.get("k") == 1
    finally:
        shared.state().backend.close()


@pytest.mark.parametrize("suffix", [".pid", ".log", ".key"])
def test_symlinks_beside_the_socket_are_not_followed(run_dir: str, suffix: str) -> None:
    """A symbolic link where the server's pid, log or key file goes is never followed:
    a clear error names it, and the file it aims at is untouched."""
    victim = precious_file(run_dir, "victim")
    socket_path = os.path.join(run_dir, "app.sock")
    os.symlink(victim, socket_path + suffix)
    shared = workers.make_shared(socket_path, timeout=3.0)
    try:
        with pytest.raises((ConfigError, SharedStateUnavailable), match="symbolic link") as info:
            shared.set("k", 1)
        assert socket_path + suffix in str(info.value)
    finally:
        shared.state().backend.close()
    assert read(victim) == b"precious\n"
