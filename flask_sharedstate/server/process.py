"""The state server process: listening, authenticating, serving, stopping.

Lifetime rules (see ``docs/architecture.md``):

* The server is started as a new interpreter (``python -m
  flask_sharedstate.server``) that detaches at once: its starter only waits
  for it to say it listens, and no descriptor of the starter survives in it.
* It serves until its *owner* process (the gunicorn master, say) is gone, or
  until SIGTERM/SIGINT, and removes its unix socket file on the way out.
* One thread per client connection. A client that disconnects or dies
  releases every lock it held and aborts its atomic block.
* Garbage, wrong keys, stalled handshakes and oversized messages cost the
  server one connection, never its service to the others.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from . import processes, protocol
from .persistence import Journal, NotPersisted, estimated_size
from .store import LockTimeout, Session, Store

log = logging.getLogger("flask_sharedstate.server")

SWEEP_INTERVAL = 1.0


#: The start time of a process, or None if unknown (see ``processes.py``).
process_start_time = processes.start_time


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
        pid_file: str | None = None,
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
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(pid_file, flags, 0o600), "w") as f:  # never through a symlink
                f.write(f"{os.getpid()}\n")
        self._socket_path: str | None = None
        self._socket_inode: int | None = None
        if listener.family == socket.AF_UNIX:
            self._socket_path = listener.getsockname()
            self._socket_inode = os.stat(self._socket_path).st_ino

    # -- lifetime --------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Ask the accept loop to stop; safe from signal handlers and threads."""
        if not self._stopping.is_set():
            log.info("stopping: %s", reason)
            self._stopping.set()
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        if self.store.journal is not None:
            threading.Thread(target=self._persist, args=(self.store.journal,), daemon=True).start()
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self.listener:
                        self._accept()
        finally:
            sel.close()
            self._close_listener()
            journal = self.store.journal
            if journal is not None:
                with self.store.cond:  # no write slips in after the last fsync
                    journal.close()
                log.info("saved %s", journal.path)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:  # the peer gave up already, or we ran out of descriptors
            return
        threading.Thread(target=self._serve_client, args=(sock,), daemon=True).start()

    def _close_listener(self) -> None:
        self.listener.close()
        if self.pid_file is not None:
            try:
                with open(self.pid_file) as f:
                    if f.read().strip() == str(os.getpid()):
                        os.unlink(self.pid_file)
            except OSError:
                pass
        path = self._socket_path
        if path is not None:
            # Only remove the file if it is still ours: a successor may own the path.
            try:
                if os.stat(path).st_ino == self._socket_inode:
                    os.unlink(path)
            except OSError:
                pass

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

    # -- one client --------------------------------------------------------------

    def _serve_client(self, sock: socket.socket) -> None:
        protocol.set_receive_timeout(sock, protocol.HANDSHAKE_TIMEOUT)
        conn = Connection(sock.detach())
        try:
            session = self._greet(conn)
        except Exception as exc:  # noqa: BLE001 - any failure costs only this connection
            log.debug("handshake failed: %s", type(exc).__name__)
            conn.close()
            return
        try:
            self._serve_session(conn, session)
        except (EOFError, OSError):
            pass  # the client went away; its locks go with it
        finally:
            session.close()
            conn.close()

    def _greet(self, conn: Connection) -> Session:
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
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            protocol.set_receive_timeout(sock, 0)
        finally:
            sock.close()
        session = self.store.session(hello[2], float(hello[3]))
        journal = self.store.journal
        welcome = {"pid": os.getpid(), "persist": None if journal is None else journal.path}
        conn.send_bytes(protocol.dumps((True, welcome)))
        return session

    def _serve_session(self, conn: Connection, session: Session) -> None:
        fd = conn.fileno()
        read, write, loads, dumps = (
            protocol.read_message,
            protocol.write_reply,  # a reply over MAX_MESSAGE goes in parts
            protocol.loads,
            protocol.dumps,
        )
        while True:
            request = read(fd)
            try:
                op, *args = loads(request)
                if op == "info":
                    reply: tuple[Any, ...] = (True, self.info(session))
                else:
                    reply = (True, session.call(op, args))
            except LockTimeout as exc:
                reply = (False, "LockTimeout", exc.args)
            except (KeyError, TypeError, ValueError, RuntimeError, NotPersisted) as exc:
                reply = (False, type(exc).__name__, exc.args)
            except Exception as exc:  # noqa: BLE001 - a bad request never stops the server
                reply = (False, "ValueError", (f"bad request: {type(exc).__name__}",))
            write(fd, dumps(reply))

    def info(self, session: Session) -> dict[str, Any]:
        journal = self.store.journal
        with self.store.cond:
            return {
                "pid": os.getpid(),
                "uptime": time.time() - self.started,
                "clients": self.store.sessions,
                "namespaces": len(self.store.namespaces),
                "keys": len(session.space.data),
                "owner_pid": self.owner_pid,
                "memory": _resident_memory(),
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
