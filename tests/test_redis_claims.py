"""Redis: the claims of an atomic block whose commit failed do not outlive the failure.

A loopback TCP forwarder between one app and a real redis-server is cut while
the app's atomic block is open: the commit then fails without reaching Redis
(the case of a Sentinel promotion's MasterNotFoundError, or a dropped
connection), and its claims stay in Redis, where only this client can drop them.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_client

from flask_sharedstate import SharedState, SharedStateUnavailable

from conftest import make_app, wait_for

#: Long, so that "dropped when the lease ran out" and "dropped at once" are far apart.
LEASE = 20.0


class Forwarder:
    """A TCP forwarder on loopback, to ``port``; ``cut()`` drops every connection
    and closes new ones at once (as a dead master would), ``restore()`` ends that."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = False
        self.mute = False  # Redis's replies dropped (requests still go through)
        self.muted = 0  # bytes of replies dropped
        self.refused = 0  # connections closed at once while cut
        #: client socket -> its requests held back (hold()); then (server socket, requests)
        #: of each held connection its client closed, for release()
        self.held: dict[socket.socket, bytearray] = {}
        self.late: list[tuple[socket.socket, bytes]] = []
        self.stopping = False
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping:
            # (a blocked accept() does not wake when the socket is closed: poll)
            if not select.select([self.listener], [], [], 0.1)[0]:
                continue
            client, _ = self.listener.accept()
            with self.lock:
                if self.cut_off:
                    self.refused += 1
                    client.close()
                    continue
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
                self.pairs.append((client, server))
            pump = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            self.threads.append(pump)
            pump.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        late = False
        try:
            while True:
                ready = select.select([a, b], [], [], 0.1)[0]
                if self.stopping:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        with self.lock:
                            if sock is a and a in self.held:  # its client gave up on it
                                self.late.append((b, bytes(self.held.pop(a))))
                                late = True
                        return
                    if sock is b and self.mute:
                        self.muted += len(data)
                        continue
                    if sock is a and a in self.held:
                        self.held[a] += data
                        continue
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            for sock in (a,) if late else (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def cut(self) -> None:
        with self.lock:
            self.cut_off = True
            for a, b in self.pairs:
                for sock in (a, b):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self.pairs = []

    def hold(self) -> None:
        """Hold back the requests of the connections open now (new ones go through)."""
        with self.lock:
            for a, _ in self.pairs:
                self.held[a] = bytearray()

    def release(self) -> list[bytes]:
        """Send the held requests of connections their clients closed: Redis's replies."""
        with self.lock:
            late, self.late = self.late, []
        replies = []
        for server, data in late:
            with server:
                server.settimeout(10)
                server.sendall(data)
                replies.append(server.recv(65536))
        return replies

    def restore(self) -> None:
        with self.lock:
            self.cut_off = False

    def close(self) -> None:
        self.stopping = True
        self.cut()
        for thread in self.threads:
            thread.join(10)
        for server, _ in self.late:  # held requests never released
            server.close()
        self.listener.close()


@pytest.fixture
def forwarder(redis_url: str) -> Iterator[Forwarder]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    fwd = Forwarder(port)
    try:
        yield fwd
    finally:
        fwd.close()


def _apps(
    run_dir: str, forwarder: Forwarder, timeout: float = 5.0
) -> tuple[SharedState, SharedState, Any]:
    """The app behind the forwarder, another app on the same namespace straight to
    Redis (waiting for claims up to more than the lease), and a plain Redis client."""
    url = f"redis://127.0.0.1:{forwarder.port}/0"
    cut = make_app("redis", run_dir, "claims", SHAREDSTATE_LEASE=LEASE, SHAREDSTATE_TIMEOUT=timeout)
    cut.config["SHAREDSTATE_REDIS_URL"] = url
    other = make_app(
        "redis", run_dir, "claims", SHAREDSTATE_LEASE=LEASE, SHAREDSTATE_TIMEOUT=2 * LEASE
    )
    direct = redis_client.Redis.from_url(other.config["SHAREDSTATE_REDIS_URL"])
    return SharedState(cut), SharedState(other), direct


def _close(*shared: SharedState) -> None:
    for s in shared:
        s.state().backend.close()


def _fail_commit(shared: SharedState, forwarder: Forwarder, txn: str, direct: Any) -> None:
    """Open a block on ``n``, cut the forwarder, and see its commit fail unsent."""
    with pytest.raises(SharedStateUnavailable):
        with shared.atomic():
            shared.dict["n"] += 1
            forwarder.cut()
    assert forwarder.refused >= 1  # the commit's connection was refused: never sent
    assert direct.hget(txn, "owner") is not None  # so the block's claim is still in Redis
    assert direct.exists(txn)


def test_failed_commit_drops_its_claims_once_redis_answers(
    run_dir: str, redis_url: str, forwarder: Forwarder
) -> None:
    """A commit that failed unsent: once Redis is reachable again, another client's
    write to the claimed key goes through long before the lease, and the failed
    block's write is never applied."""
    cut, other, direct = _apps(run_dir, forwarder)
    txn = "{" + cut.state().settings.namespace + "}:txn"
    try:
        cut.dict["n"] = 1
        _fail_commit(cut, forwarder, txn, direct)
        forwarder.restore()
        start = time.monotonic()
        other.dict["n"] = 5  # waits while the failed block's claim is there
        waited = time.monotonic() - start
        print(f"the other writer waited {waited:.2f}s (lease {LEASE:g}s)")
        assert waited < LEASE / 2, f"waited {waited:.2f}s: the claim stayed for the lease"
        time.sleep(2)  # (a late commit would have landed by now)
        assert other.dict["n"] == 5
        assert cut.dict["n"] == 5
        assert not direct.exists(txn)
    finally:
        _close(cut, other)
        direct.close()


def test_lazy_abort_never_drops_a_newer_block_of_the_same_thread(
    run_dir: str, redis_url: str, forwarder: Forwarder
) -> None:
    """After a failed commit, the same thread's next block keeps its claims while the
    failed block's claims are dropped: it commits, and others' writes wait for it."""
    cut, other, direct = _apps(run_dir, forwarder)
    txn = "{" + cut.state().settings.namespace + "}:txn"
    short = make_app("redis", run_dir, "claims", SHAREDSTATE_LEASE=LEASE, SHAREDSTATE_TIMEOUT=1.0)
    impatient = SharedState(short)
    try:
        cut.dict["n"] = 1
        _fail_commit(cut, forwarder, txn, direct)
        forwarder.restore()
        with cut.atomic():
            assert cut.dict["n"] == 1  # the failed block wrote nothing
            cut.dict["n"] = 10
            # Seconds of the failed block's aborts being sent again (if they are): each
            # turn is a second's sleep and a write that waits a second (ORPHAN_RETRY = 1).
            for _ in range(2):
                time.sleep(1)
                assert direct.hget(txn, "owner") is not None
                with pytest.raises(Exception, match="waited"):
                    impatient.dict["n"] = 99  # still claimed: the write waits and fails
        assert other.dict["n"] == 10
        wait_for(lambda: not direct.exists(txn), timeout=LEASE / 2)
    finally:
        _close(cut, other, impatient)
        direct.close()


def test_lazy_abort_after_a_lost_reply_drops_nothing_of_others(
    run_dir: str, redis_url: str, forwarder: Forwarder
) -> None:
    """A commit that ran but whose reply was lost: the write stands (once), and the
    aborts of it sent afterwards never drop another client's block."""
    cut, other, direct = _apps(run_dir, forwarder, timeout=2.0)
    txn = "{" + cut.state().settings.namespace + "}:txn"
    try:
        cut.dict["n"] = 1
        with pytest.raises(SharedStateUnavailable, match="did not answer"):
            with cut.atomic():
                cut.dict["n"] += 1
                forwarder.mute = True
        forwarder.mute = False
        assert forwarder.muted > 0  # the commit's reply was dropped
        assert not direct.exists(txn)  # it ran: no claim left
        with other.atomic():
            assert other.dict["n"] == 2  # applied once
            other.dict["n"] = 20
            for _ in range(3):  # while the cut app sends its aborts (if it does), once a second
                time.sleep(1)
                assert direct.hget(txn, "owner") is not None
        assert cut.dict["n"] == 20
    finally:
        _close(cut, other)
        direct.close()


def _eventually(condition: Any, timeout: float) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_commit_reaching_redis_after_the_abort_writes_nothing(
    run_dir: str, redis_url: str, forwarder: Forwarder
) -> None:
    """A commit held up on its way (no answer in time) that reaches Redis only after
    its block was aborted finds its claims gone and writes nothing: failed, never applied."""
    cut, other, direct = _apps(run_dir, forwarder, timeout=2.0)
    txn = "{" + cut.state().settings.namespace + "}:txn"
    try:
        cut.dict["n"] = 1
        with pytest.raises(SharedStateUnavailable, match="did not answer"):
            with cut.atomic():
                cut.dict["n"] += 1
                forwarder.hold()
        wait_for(lambda: forwarder.late, timeout=10)  # the client closed that connection
        gone = _eventually(lambda: not direct.exists(txn), LEASE / 2)
        replies = forwarder.release()  # the commit reaches Redis now
        assert replies, "the held commit was not sent"
        assert other.dict["n"] == 1, f"the failed commit was applied later: {replies}"
        assert replies == [b"*1\r\n$4\r\nlost\r\n"]
        assert gone, "the failed block's claim stayed for the lease"
    finally:
        _close(cut, other)
        direct.close()
