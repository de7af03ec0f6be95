"""The state server process: listening, authenticating, serving, stopping.

Lifetime rules (see ``docs/architecture.md``):

* The server is started as a new interpreter (``python -m
  flask_sharedstate.server``) that detaches at once: its starter only waits
  for it to say it listens, and no descriptor of the starter survives in it.
* It serves until its *owner* process (the gunicorn master, say) is gone, or
  until SIGTERM/SIGINT, and removes its unix socket file on the way out. An
  owner check that cannot answer (no descriptor free, say) means "alive".
* It holds its pid file locked (:class:`PidFile`) while it runs, so that a
  second server for the same address stands down even if the socket file was
  deleted; and it listens again at its socket path if that file disappears,
  or stops if another server's socket replaced it.
* One event loop (:mod:`selectors`) serves every authenticated connection:
  a client process holds one connection, shared by its threads and greenlets,
  each of which is an *owner* with its own session (locks, atomic block). An
  operation that must wait (a lock, an atomic block, a key one claimed) is
  parked with its deadline, not given a thread, and tried again when a lock
  or a block is let go. Replies are written without blocking; a peer that
  does not read them is not read from until it does. A client that
  disconnects or dies releases every lock its owners held and aborts their
  atomic blocks; an owner that ends (``forget``) releases its own.
* Each handshake runs in a short-lived thread of its own, by one deadline,
  so handshakes never queue behind each other or behind requests.
* Connections are capped in total and per peer (a process on a unix socket,
  an address on TCP), below the open-file limit: the excess is refused with a
  message that names the limit, in the accept loop, costing no thread.
* Garbage, wrong keys, stalled handshakes and oversized messages cost the
  server one connection, never its service to the others. The whole
  handshake has one deadline (:data:`~.protocol.HANDSHAKE_TIMEOUT`).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import struct
import threading
import time
from typing import Any

try:
    import fcntl
    import resource
except ImportError:  # Windows
    raise ImportError(
        "flask_sharedstate.server is the state server of the 'manager' backend, which runs"
        " on Unix only (it needs fork, fcntl locks and unix sockets): on Windows use"
        " SHAREDSTATE_BACKEND = 'memory' for one process (flask run), or 'redis' to share"
        " the state between processes."
    ) from None

from . import processes, protocol
from .persistence import Journal, NotPersisted, estimated_size
from .protocol import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_PEER
from .store import LockTimeout, Session, Store, WouldBlock
from .versions import HEARTBEAT_BOUND, HEARTBEAT_INTERVAL, VersionTable, table_path

log = logging.getLogger("flask_sharedstate.server")

SWEEP_INTERVAL = 1.0

#: Bytes asked of a connection per read.
READ_SIZE = 65536

#: A connection whose unsent replies pass this many bytes is not read from until
#: they are taken: a peer that sends and never reads cannot grow the server.
OUTPUT_HIGH_WATER = 4 * 1024 * 1024

#: Descriptors kept free of connections: the listener, the journal and its
#: compaction, /proc reads, the owner's pidfd, logging.
RESERVED_DESCRIPTORS = 64


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit.

    Each connection costs the server a descriptor, and the usual soft limit
    (1024) is far below the usual hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    # Some systems refuse an unlimited (or very high) soft limit: try lower ones.
    for target in (hard, 1 << 20, 1 << 16, 10240):
        if soft < target <= hard or (hard == resource.RLIM_INFINITY and soft < target):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return target
            except (ValueError, OSError):
                continue
    return soft


def listen_unix(path: str) -> socket.socket:
    """A socket listening at ``path``, its file born 0600 (no window for others)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(512)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


class PidFile:
    """The server's pid file, locked (``flock``) for as long as the server runs.

    A second server for the same address finds it locked and stands down
    (``in-use``), even when the socket file was deleted; the kernel drops the
    lock of a server that dies, so a stale file never blocks a successor.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        #: whether a server that died without cleaning up left its pid here
        self.left_behind = os.fstat(fd).st_size > 0

    @classmethod
    def claim(cls, path: str) -> PidFile | None:
        """Lock the pid file at ``path``; None if a running server holds it."""
        for _ in range(10):
            # Never through a symbolic link: it could point at a file of the app's user.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return cls(path, fd)
            except FileNotFoundError:
                pass
            os.close(fd)  # unlinked or replaced while we locked it: lock the new one
        raise OSError(errno.EAGAIN, f"the pid file {path} keeps changing")

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        """Remove the file if it is still ours, and let go of the lock (once)."""
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


class _Client:
    """One authenticated connection: a client process, its owners' sessions, its buffers."""

    __slots__ = (
        "sock",
        "fd",
        "peer",
        "wait_timeout",
        "shared",
        "sessions",
        "parked",
        "inbox",
        "outbox",
        "events",
        "closed",
    )

    def __init__(self, sock: socket.socket, peer: object, shared: Session) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.wait_timeout = shared.wait_timeout
        #: the session of every owner that holds nothing (no lock, no atomic block)
        self.shared = shared
        #: owner -> its own session, while it holds a lock or an atomic block
        self.sessions: dict[int, Session] = {}
        #: owner -> its parked request
        self.parked: dict[int, _Parked] = {}
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.events = selectors.EVENT_READ
        self.closed = False


class _Parked:
    """A request that must wait (for a lock, an atomic block, a claimed key)."""

    __slots__ = ("client", "rid", "owner", "session", "op", "args", "deadline", "done")

    def __init__(
        self,
        client: _Client,
        rid: int,
        owner: int,
        session: Session,
        op: str,
        args: tuple[Any, ...],
        deadline: float,
    ) -> None:
        self.client = client
        self.rid = rid
        self.owner = owner
        self.session = session
        self.op = op
        self.args = args
        self.deadline = deadline
        self.done = False


_OWNED = frozenset(protocol.OWNED_OPERATIONS)


def _still_blocked(parked: _Parked) -> bool:
    """Whether a parked lock or atomic-block wait is plainly still blocked (a cheap
    look, without the store's lock: only the event loop changes locks and blocks).
    False means "try it": the operation itself decides."""
    op, session = parked.op, parked.session
    space = session.space
    if op == "acquire":
        holder = space.locks.get(parked.args[0]) if parked.args else None
        return holder is not None and holder is not session
    if op in ("txn_read", "txn_commit"):
        owner = space.txn_owner
        return owner is not None and owner is not session
    return False


class StateServer:
    """Serve one :class:`~.store.Store` on a listening socket until told to stop."""

    def __init__(
        self,
        listener: socket.socket,
        key: bytes,
        *,
        owner_pid: int | None = None,
        owner_start: str | None = None,
        store: Store | None = None,
        pid_file: PidFile | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
    ) -> None:
        self.listener = listener
        self.key = key
        self.owner_pid = owner_pid
        self.owner_start = owner_start
        self.store = store if store is not None else Store()
        self.started = time.time()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.pid_file = pid_file
        if pid_file is not None:
            pid_file.write(os.getpid())
        self._socket_path: str | None = None
        self._socket_inode: int | None = None
        if listener.family == socket.AF_UNIX:
            self._socket_path = listener.getsockname()
            self._socket_inode = os.stat(self._socket_path).st_ino
            # The workers' read caches check it; taken over (new instance id) before
            # the accept loop serves anyone, so no worker trusts an old server's values.
            with self.store.cond:
                self.store.versions = VersionTable.open(table_path(self._socket_path))
            table = self.store.versions
            if table is not None and table.created and pid_file and pid_file.left_behind:
                # A server died here, and its table is gone: its workers may still map
                # the old file, trusting it until its heartbeat is HEARTBEAT_BOUND old.
                # No write of ours may be acknowledged before then.
                log.warning("the version table was gone: waiting out the old one's heartbeat")
                time.sleep(HEARTBEAT_BOUND)
        # -- connection limits
        self.descriptor_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fit = max_connections
        if self.descriptor_limit != resource.RLIM_INFINITY:
            fit = self.descriptor_limit - RESERVED_DESCRIPTORS
        self.max_connections = max(1, min(max_connections, fit))
        self._lowered = self.max_connections < max_connections
        if self._lowered:
            log.warning(
                "at most %d connections (not %d): the open-file limit is %d",
                self.max_connections,
                max_connections,
                self.descriptor_limit,
            )
        self.max_connections_per_peer = max_connections_per_peer
        self._connections = 0
        self._per_peer: dict[object, int] = {}
        self._count_lock = threading.Lock()
        self._last_refusal_log = 0.0
        self.refused = 0
        # Kept free so that a client can be told "no" when no other descriptor is left.
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # -- the event loop's state
        self._selector: selectors.BaseSelector | None = None
        #: authenticated connections handed over by handshake threads
        self._arrivals: list[tuple[socket.socket, object, str, float]] = []
        self._arrivals_lock = threading.Lock()
        #: parked requests, in arrival order
        self._parked: list[_Parked] = []
        #: the soonest deadline of a parked request (inf when none)
        self._soonest = float("inf")
        self._released_seen = 0
        #: connections with replies to write after the current step
        self._to_flush: set[_Client] = set()

    # -- lifetime --------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Ask the accept loop to stop; safe from signal handlers and threads."""
        if not self._stopping.is_set():
            log.info("stopping: %s", reason)
            self._stopping.set()
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        if self.store.versions is not None:
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        if self.store.journal is not None:
            threading.Thread(target=self._persist, args=(self.store.journal,), daemon=True).start()
        sel = self._selector = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        next_check = time.monotonic() + SWEEP_INTERVAL
        try:
            while not self._stopping.is_set():
                timeout = SWEEP_INTERVAL
                if self._parked:
                    timeout = max(min(timeout, self._soonest - time.monotonic()), 0)
                for key, events in sel.select(timeout):
                    client = key.data
                    if client is not None:
                        if events & selectors.EVENT_READ:
                            self._read(client)
                        if events & selectors.EVENT_WRITE and not client.closed:
                            self._flush(client)
                    elif key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._welcome_arrivals()
                if self._parked:
                    self._retry_parked()
                if self._to_flush:
                    self._flush_all()
                if self._socket_path is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + SWEEP_INTERVAL
                    self._check_socket_file(sel)
        finally:
            for key in list(sel.get_map().values()):
                if key.data is not None:
                    self._drop(key.data)
            sel.close()
            with self.store.cond:  # after any reply: values cached from now on are dead
                if self.store.versions is not None:
                    self.store.versions.retire()
            self._close_listener()
            journal = self.store.journal
            if journal is not None:
                with self.store.cond:  # no write slips in after the last fsync
                    journal.close()
                log.info("saved %s", journal.path)

    def _check_socket_file(self, sel: selectors.BaseSelector) -> None:
        """Listen again if our socket file was deleted; stop if another replaced it.

        Otherwise the next client would find no socket, start a second server
        beside this one, and the app would have two states.
        """
        path = self._socket_path
        assert path is not None
        try:
            inode: int | None = os.stat(path).st_ino
        except FileNotFoundError:
            inode = None
        except OSError:
            return  # cannot tell: look again later
        if inode == self._socket_inode:
            return
        if inode is not None:
            self.stop(f"the socket file {path} was replaced by another server's")
            return
        try:
            listener = listen_unix(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # in use: the next check sees whose
                self.stop(f"the socket file {path} was deleted and cannot be made again: {exc}")
            return
        sel.unregister(self.listener)
        self.listener.close()
        self.listener = listener
        try:
            self._socket_inode = os.stat(path).st_ino
        except OSError:
            self._socket_inode = -1  # deleted again at once: the next check listens anew
        sel.register(listener, selectors.EVENT_READ)
        log.warning("the socket file %s was deleted: listening there again", path)

    # -- admitting connections ------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, address = self.listener.accept()
        except OSError as exc:  # the peer gave up already, or no descriptor is left
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._refuse_with_spare()
            return
        peer = self._peer(sock, address)
        reason = self._admit(peer)
        if reason is None:
            try:
                threading.Thread(target=self._handshake, args=(sock, peer), daemon=True).start()
                return
            except RuntimeError:  # no thread can start: the process or system limit
                self._leave(peer)
                reason = (
                    f"the state server cannot start another thread (it serves"
                    f" {self._connections}); lower SHAREDSTATE_MAX_CONNECTIONS below that,"
                    " or raise the system's thread limit"
                )
        self._refuse(sock, reason)

    def _peer(self, sock: socket.socket, address: Any) -> object:
        """Who counts against the per-peer limit: a process (unix), an address (TCP)."""
        if sock.family != socket.AF_UNIX:
            return f"address {address[0]}"
        credentials = getattr(socket, "SO_PEERCRED", None)
        if credentials is None:
            return "this host"  # no way to tell processes apart: one peer
        try:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, credentials, 12))
        except OSError:
            return "this host"
        return f"process {pid}"

    def _admit(self, peer: object) -> str | None:
        """Count a new connection of ``peer`` in; or return why it is refused."""
        with self._count_lock:
            if self._connections >= self.max_connections:
                if self._lowered:
                    limit = (
                        f"SHAREDSTATE_MAX_CONNECTIONS, lowered to {self.max_connections} by"
                        f" the server's open-file limit of {self.descriptor_limit}): raise"
                        " that limit (ulimit -n, systemd LimitNOFILE=)"
                    )
                else:
                    limit = f"SHAREDSTATE_MAX_CONNECTIONS = {self.max_connections}): raise it"
                return (
                    f"it already holds {self._connections} connections, its limit ({limit},"
                    " or run fewer threads or greenlets"
                )
            held = self._per_peer.get(peer, 0)
            if held >= self.max_connections_per_peer:
                return (
                    f"{peer} already holds {held} connections, the limit per peer"
                    f" (SHAREDSTATE_MAX_CONNECTIONS_PER_PEER = {self.max_connections_per_peer}):"
                    " raise it, or give this worker fewer threads or greenlets"
                )
            self._connections += 1
            self._per_peer[peer] = held + 1
            return None

    def _leave(self, peer: object) -> None:
        with self._count_lock:
            self._connections -= 1
            held = self._per_peer.pop(peer) - 1
            if held:
                self._per_peer[peer] = held

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Tell the client why, without waiting for it, and hang up."""
        try:
            sock.send(protocol.refusal(reason), socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 10:  # one line per burst, not per client
            self._last_refusal_log = now
            log.warning("refused a connection: %s", reason)

    def _refuse_with_spare(self) -> None:
        """No descriptor is left: free the spare one to accept and refuse one client.

        Otherwise the listener stays readable and the accept loop spins.
        """
        if self._spare is None:
            time.sleep(0.01)
            return
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            pass
        else:
            self._refuse(
                sock,
                f"it has no descriptor left (open-file limit {self.descriptor_limit}):"
                " raise that limit (ulimit -n), or lower SHAREDSTATE_MAX_CONNECTIONS",
            )
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._spare = None

    def _close_listener(self) -> None:
        self.listener.close()
        if self.pid_file is not None:
            self.pid_file.release()
        path = self._socket_path
        if path is not None:
            # Only remove the file if it is still ours: a successor may own the path.
            try:
                if os.stat(path).st_ino == self._socket_inode:
                    os.unlink(path)
            except OSError:
                pass

    def _heartbeat(self) -> None:
        """Beat in the version table; follow its file if it is deleted or replaced.

        Workers that mapped a deleted table would keep trusting it (the heartbeat
        goes on) while new workers map a new one: so the old one is retired (its
        instance id zeroed: its readers go to the server, and map the new file).
        """
        beats = 0
        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            table = self.store.versions
            if table is None:
                return
            table.beat()
            beats += 1
            if beats % 10 or not table.moved():
                continue
            with self.store.cond:
                # Retired before the new file exists: whoever finds the new file can
                # no longer be answered by the old one.
                table.retire()
                new = VersionTable.open(table.path)
                self.store.versions = new
            table.close()
            log.warning(
                "the version table %s was deleted or replaced: %s",
                table.path,
                "using a new one" if new is not None else "the workers' read caches are off",
            )

    def _housekeeping(self) -> None:
        """Drop expired keys, and stop when the owner process is gone."""
        owner = None
        if self.owner_pid is not None:
            owner = processes.watch(self.owner_pid, self.owner_start)
            log.info("watching owner %d by %s", self.owner_pid, owner.kind)
        try:
            while not self._stopping.is_set():
                if owner is None:
                    self._stopping.wait(SWEEP_INTERVAL)
                elif owner.wait(SWEEP_INTERVAL):
                    self.stop(f"owner process {self.owner_pid} is gone")
                    return
                self.store.sweep()
        finally:
            if owner is not None:
                owner.close()

    def _persist(self, journal: Journal) -> None:
        """The journal's thread: fsync each second (``everysec``), compact when it is due.

        The first compaction threshold is set from the live state just restored,
        so a file that a crash left large is compacted at once.
        """
        with self.store.cond:
            journal.base_size = estimated_size(self.store.snapshot())
        while not self._stopping.is_set():
            journal.sync()  # without the lock: clients go on meanwhile
            if journal.wants_compaction():
                try:
                    self._compact(journal)
                except Exception:  # a bug here must not stop the fsyncs
                    log.exception("compaction of %s failed", journal.path)
                    with self.store.cond:
                        journal.abandon_compaction()
                        self.store.cond.notify_all()
            journal.due.wait(SWEEP_INTERVAL)

    def _compact(self, journal: Journal) -> None:
        started = time.monotonic()
        with self.store.cond:
            journal.begin_compaction()
            snapshot = self.store.snapshot()
        try:
            aside, size = journal.write_compacted(snapshot)  # the slow part: clients go on
            with self.store.cond:
                journal.finish_compaction(aside, size)
                self.store.cond.notify_all()  # writers waiting for it
        except OSError as exc:
            with self.store.cond:
                journal.abandon_compaction()
                self.store.cond.notify_all()
            if journal.failed_compactions in (1, 10, 100) or journal.failed_compactions % 1000 == 0:
                log.error(
                    "compaction of %s failed (%d times in a row), the journal is intact: %s",
                    journal.path,
                    journal.failed_compactions,
                    exc,
                )
            return
        log.info(
            "compacted %s to %d bytes in %.2fs",
            journal.path,
            journal.size,
            time.monotonic() - started,
        )

    def _owner_alive(self) -> bool:
        """False only if the owner is known to be gone; an unknown answer is "alive"."""
        assert self.owner_pid is not None
        return not processes.process_gone(self.owner_pid, self.owner_start)

    # -- handshakes (a thread each, by one deadline) ----------------------------------

    def _handshake(self, sock: socket.socket, peer: object) -> None:
        try:
            deadline = time.monotonic() + protocol.HANDSHAKE_TIMEOUT
            namespace, wait_timeout = self._greet(protocol.Handshake(sock.fileno(), deadline))
        except Exception as exc:  # noqa: BLE001 - any failure costs only this connection
            log.debug("handshake failed: %s", type(exc).__name__)
            sock.close()
            self._leave(peer)
            return
        with self._arrivals_lock:
            self._arrivals.append((sock, peer, namespace, wait_timeout))
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass  # the pipe is full of wake-ups already: the loop will look

    def _greet(self, conn: protocol.Handshake) -> tuple[str, float]:
        """Handshake, hello and welcome: all by ``conn``'s one deadline."""
        protocol.server_handshake(conn, self.key)
        hello = protocol.loads(conn.recv_bytes(protocol.MAX_MESSAGE))
        if (
            type(hello) is not tuple
            or len(hello) != 4
            or hello[0] != "hello"
            or hello[1] != protocol.PROTOCOL_VERSION
            or type(hello[2]) is not str
            or type(hello[3]) not in (int, float)
        ):
            conn.send_bytes(protocol.dumps((False, "ValueError", ("unsupported hello",))))
            raise ValueError("unsupported hello")
        journal = self.store.journal
        welcome = {"pid": os.getpid(), "persist": None if journal is None else journal.path}
        conn.send_bytes(protocol.dumps((True, welcome)))
        return hello[2], float(hello[3])

    # -- the event loop: connections, requests, parked waits --------------------------

    def _welcome_arrivals(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass
        with self._arrivals_lock:
            arrivals, self._arrivals = self._arrivals, []
        assert self._selector is not None
        for sock, peer, namespace, wait_timeout in arrivals:
            sock.setblocking(False)
            client = _Client(sock, peer, self.store.session(namespace, wait_timeout))
            try:
                self._selector.register(sock, selectors.EVENT_READ, client)
            except (OSError, ValueError):
                client.shared.close()
                sock.close()
                self._leave(peer)

    def _read(self, client: _Client) -> None:
        try:
            data = os.read(client.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)  # the client went away; its locks go with it
            return
        inbox = client.inbox
        inbox += data
        position, end = 0, len(inbox)
        unpack = protocol.HEADER.unpack_from
        while end - position >= 4:
            (size,) = unpack(inbox, position)
            if not 0 <= size <= protocol.MAX_MESSAGE:
                self._drop(client)  # garbage or an oversized message: this connection only
                return
            if end - position - 4 < size:
                break
            body = bytes(inbox[position + 4 : position + 4 + size])
            position += 4 + size
            self._request(client, body)
            if client.closed:
                return
        if position:
            del inbox[:position]
        if client.outbox:
            self._flush(client)  # at once: the usual reply is one small write
            self._to_flush.discard(client)

    def _request(self, client: _Client, body: bytes) -> None:
        try:
            request = protocol.loads(body)
            rid, owner, op = request[0], request[1], request[2]
            if type(rid) is not int or type(owner) is not int or type(op) is not str:
                raise ValueError("bad request")
        except Exception:  # noqa: BLE001 - a request that cannot be answered: hang up
            self._drop(client)
            return
        args = tuple(request[3:])
        parked = client.parked.pop(owner, None)
        if parked is not None:
            parked.done = True  # an owner asks one thing at a time: its requester gave up
        if op == protocol.FORGET:
            session = client.sessions.pop(owner, None)
            if session is not None:
                session.close()
            return
        session = client.sessions.get(owner)
        if session is None:
            if op in _OWNED:
                session = client.sessions[owner] = self.store.session(
                    client.shared.space.name, client.wait_timeout
                )
            else:
                session = client.shared
        self._run(client, rid, owner, session, op, args, None)

    def _run(
        self,
        client: _Client,
        rid: int,
        owner: int,
        session: Session,
        op: str,
        args: tuple[Any, ...],
        deadline: float | None,
    ) -> bool:
        """Run one request and queue its reply; False if it was parked (must wait)."""
        try:
            if op == "read_versioned":
                reply: tuple[Any, ...] = (rid, True, session.read_versioned(*args))
            elif op == "info":
                reply = (rid, True, self.info(session))
            else:
                reply = (rid, True, session.attempt(op, args))
        except WouldBlock as blocked:
            current = time.monotonic()
            if deadline is None:
                deadline = current + blocked.timeout
            if current < deadline:
                if rid:
                    parked = _Parked(client, rid, owner, session, op, args, deadline)
                    client.parked[owner] = parked
                    self._parked.append(parked)
                    if deadline < self._soonest:
                        self._soonest = deadline
                return False
            reply = (rid, False, "LockTimeout", blocked.timed_out().args)
        except LockTimeout as exc:
            reply = (rid, False, "LockTimeout", exc.args)
        except (KeyError, TypeError, ValueError, RuntimeError, NotPersisted) as exc:
            reply = (rid, False, type(exc).__name__, exc.args)
        except Exception as exc:  # noqa: BLE001 - a bad request never stops the server
            reply = (rid, False, "ValueError", (f"bad request: {type(exc).__name__}",))
        if session is not client.shared and session.holds_nothing():
            # It held nothing before and holds nothing now: back to the shared session.
            if client.sessions.get(owner) is session:
                del client.sessions[owner]
            session.close()
        if rid:
            self._queue(client, rid, protocol.dumps(reply))
        return True

    def _queue(self, client: _Client, rid: int, body: bytes) -> None:
        """Add a pickled reply to ``client``'s unsent output (in parts when it is large)."""
        if client.closed:
            return
        outbox = client.outbox
        header = protocol.HEADER.pack
        if len(body) <= protocol.MAX_MESSAGE:
            outbox += header(len(body))
            outbox += body
        else:
            for part in protocol.reply_parts(rid, body):
                outbox += header(len(part))
                outbox += part
        self._to_flush.add(client)

    def _retry_parked(self) -> None:
        """Answer parked requests whose wait is over: what they waited for was let go,
        or their deadline passed."""
        released = self.store.released
        if released == self._released_seen and self._soonest > time.monotonic():
            return
        self._released_seen = released
        waiting, self._parked = self._parked, []
        self._soonest = float("inf")
        now = time.monotonic()
        for parked in waiting:
            if parked.done or parked.client.closed:
                continue
            if parked.deadline > now and _still_blocked(parked):
                # The common case in a crowd waiting for one lock: no need to try.
                self._parked.append(parked)
                if parked.deadline < self._soonest:
                    self._soonest = parked.deadline
                continue
            client = parked.client
            if client.parked.get(parked.owner) is parked:
                del client.parked[parked.owner]
            parked.done = True
            if parked.session.closed:
                continue
            # Parked anew (in the same order) if it must still wait.
            self._run(
                client,
                parked.rid,
                parked.owner,
                parked.session,
                parked.op,
                parked.args,
                parked.deadline,
            )
        if self.store.released != released:
            self._released_seen = -1  # something was let go meanwhile: look again next turn

    def _flush_all(self) -> None:
        clients, self._to_flush = self._to_flush, set()
        for client in clients:
            if not client.closed:
                self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Write what ``client`` can take now; watch for room (and stop reading) if not all."""
        outbox = client.outbox
        if outbox:
            try:
                written = os.write(client.fd, outbox)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError:
                self._drop(client)
                return
            del outbox[:written]
        if not outbox:
            events = selectors.EVENT_READ
        elif len(outbox) > OUTPUT_HIGH_WATER:
            events = selectors.EVENT_WRITE
        else:
            events = selectors.EVENT_READ | selectors.EVENT_WRITE
        if events != client.events:
            client.events = events
            assert self._selector is not None
            self._selector.modify(client.sock, events, client)

    def _drop(self, client: _Client) -> None:
        """Close a connection: every lock and atomic block of its owners is let go."""
        if client.closed:
            return
        client.closed = True
        for parked in client.parked.values():
            parked.done = True
        client.parked.clear()
        for session in client.sessions.values():
            session.close()
        client.sessions.clear()
        client.shared.close()
        assert self._selector is not None
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        client.inbox = bytearray()
        client.outbox = bytearray()
        self._to_flush.discard(client)
        self._leave(client.peer)

    def info(self, session: Session) -> dict[str, Any]:
        journal = self.store.journal
        with self.store.cond:
            return {
                "pid": os.getpid(),
                "uptime": time.time() - self.started,
                "clients": self.store.sessions,
                "connections": {
                    "open": self._connections,
                    "max": self.max_connections,
                    "max_per_peer": self.max_connections_per_peer,
                    "refused": self.refused,
                },
                "namespaces": len(self.store.namespaces),
                "keys": len(session.space.data),
                "owner_pid": self.owner_pid,
                "memory": _resident_memory(),
                "read_cache": self._read_cache_info(),
                "persistence": None
                if journal is None
                else {
                    "path": journal.path,
                    "fsync": journal.fsync_policy,
                    "size": journal.size,
                    "last_fsync": journal.last_fsync,
                    "compactions": journal.compactions,
                },
            }

    def _read_cache_info(self) -> dict[str, Any] | None:
        """The workers' read caches as they last reported (call with the store's lock held)."""
        versions = self.store.versions
        if versions is None:
            return None
        reports = self.store.cache_reports
        cutoff = time.time() - 600  # a worker silent that long is gone (or never misses)
        for pid in [p for p, (_, _, when) in reports.items() if when < cutoff]:
            del reports[pid]
        return {
            "table": versions.path,
            "workers": {pid: {"hits": h, "misses": m} for pid, (h, m, _) in reports.items()},
        }


def _resident_memory() -> int | None:
    """This process's resident memory in bytes, from /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def install_signal_handlers(server: StateServer) -> None:
    def on_signal(signum: int, frame: Any) -> None:
        server.stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A terminal hang-up or a reload of the app is no reason to lose state.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
