"""A busy state server is not a dead one.

A server that is too busy to accept a connection, or to answer its handshake,
must never send its clients to the election (where they queue behind each other
and may start a second server): they wait up to ``SHAREDSTATE_TIMEOUT`` and then
get :exc:`SharedStateUnavailable` saying the server is overloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

import pytest

from flask_sharedstate import SharedState, SharedStateUnavailable

from conftest import make_app, server_pids

TIMEOUT = 2.0


@contextlib.contextmanager
def election_held(socket_path: str) -> Iterator[None]:
    """Hold the address's election lock, as a process starting a server would."""
    fd = os.open(socket_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def listener_that_never_accepts(path: str) -> Iterator[list[socket.socket]]:
    """A socket listening at ``path`` whose backlog is full: a server too busy to accept."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        for _ in range(64):  # fill the backlog until a connect would block
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            queued.append(sock)
            try:
                sock.connect(path)
            except BlockingIOError:
                break
        yield queued
    finally:
        for sock in queued:
            sock.close()
        listener.close()


@contextlib.contextmanager
def listener_that_never_answers(path: str) -> Iterator[list[socket.socket]]:
    """A socket that accepts every connection and never says a word: a server too busy
    to answer the handshake."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    try:
        yield accepted
    finally:
        for sock in accepted:
            sock.close()
        listener.close()


def call_and_time(shared: SharedState) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        shared.incr("n")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.mark.parametrize("busy", ["accept", "handshake"])
def test_busy_server_is_not_taken_for_a_dead_one(run_dir: str, busy: str) -> None:
    """A server too busy to accept (or to answer the handshake) makes an operation wait
    up to SHAREDSTATE_TIMEOUT and fail saying it is overloaded; the client never goes to
    the election (held here throughout) and no second server starts."""
    app = make_app("manager", run_dir, SHAREDSTATE_TIMEOUT=TIMEOUT)
    shared = SharedState(app)
    path = app.config["SHAREDSTATE_SOCKET"]
    listener = listener_that_never_accepts if busy == "accept" else listener_that_never_answers
    with listener(path), election_held(path):
        took, error = call_and_time(shared)
    assert isinstance(error, SharedStateUnavailable), repr(error)
    message = str(error)
    assert "overloaded" in message, message
    assert "starting the state server" not in message
    assert path in message
    assert "SHAREDSTATE_TIMEOUT" in message
    assert TIMEOUT - 0.2 <= took < TIMEOUT + 3, took
    assert server_pids(run_dir) == []
