"""The ``manager`` backend: the client side of the embedded state server.

What it promises, and how:

* **Election and start** (``launcher.py``): whoever cannot connect holds the
  address's election lock, tries once more, and only then starts a server,
  a fresh detached interpreter owned by the app's master process.
* **Self-healing.** A request that finds its connection dead before it was
  sent reconnects, re-electing a server if needed, and is sent again. A
  request whose reply is lost is not repeated (it may have been applied),
  except for reads; it raises :exc:`SharedStateUnavailable`.
* **Fork and thread safety.** Each thread has its own connection; a forked
  child drops every connection it inherited and opens its own.
* **Bounded waits.** Connecting (and starting a server) is bounded by
  ``SHAREDSTATE_TIMEOUT``; so is each request, from its first byte sent to
  its reply, plus the lock or atomic wait the caller asked for, plus
  :data:`REPLY_SLACK`. A server that takes no more of a request (stopped,
  say) costs at most the same.
* **Refusals.** A server at its connection limit refuses before the
  handshake with a reason naming the limit; that is raised at once as
  :exc:`SharedStateUnavailable`.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from ..config import Settings
from ..errors import (
    AtomicBlockLost,
    AuthenticationError,
    LockNotOwned,
    LockTimeout,
    NotPersisted,
    SharedStateUnavailable,
)
from ..launcher import ServerLauncher
from ..server import catalogue, protocol
from ..server.versions import table_path
from .base import Backend, Packed
from .client_cache import ReadCache

_ERRORS: dict[str, type[Exception]] = {
    "KeyError": KeyError,
    "TypeError": TypeError,
    "ValueError": ValueError,
    "RuntimeError": RuntimeError,
    "LockTimeout": LockTimeout,
    "NotPersisted": NotPersisted,
    "AtomicBlockLost": AtomicBlockLost,
}

#: Operations on a held lock: they fail with LockNotOwned once its connection was lost.
_LOCK_CHECKS = ("release", "extend")

#: Seconds a reply may come after ``SHAREDSTATE_TIMEOUT`` (plus any wait asked for):
#: a write to a key claimed by an atomic block waits up to the timeout in the
#: server, whose answer must still arrive in time.
REPLY_SLACK = 1.0

# Bumped in every forked child: connections of an older generation are the parent's.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _gevent_patched() -> bool:
    """Whether gevent's monkey-patching made ``select`` cooperative in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("select"))


class _Link:
    """One authenticated connection of one thread to the server.

    Replies are read with a blocking read bounded by ``SO_RCVTIMEO`` (no
    extra ``poll`` per request): ``wait`` is the bound in force.
    """

    __slots__ = ("conn", "fd", "poller", "generation", "server_pid", "wait", "cooperative")

    def __init__(self, conn: Connection, wait: float) -> None:
        self.conn = conn  # for the handshake; requests use the descriptor directly
        self.fd = conn.fileno()
        # Under gevent, a blocking read would stall every greenlet of the worker,
        # including the one holding the lock we wait for: wait in the hub first.
        self.cooperative = _gevent_patched()
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.generation = _fork_generation
        self.server_pid = 0
        self.wait = wait

    def bound_reads(self, wait: float) -> None:
        if wait != self.wait:
            # The Connection owns the descriptor; borrow it for one setsockopt.
            fd = self.conn.fileno()
            sock = socket.socket(fileno=fd)
            try:
                protocol.set_receive_timeout(sock, wait)
            finally:
                sock.detach()
                os.set_blocking(fd, True)  # a gevent (or default-timeout) socket unset it
            self.wait = wait

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class _Broken(Exception):
    """The link died; ``delivered`` tells whether the request may have arrived."""

    def __init__(self, delivered: bool, cause: BaseException) -> None:
        self.delivered = delivered
        self.cause = cause


class _Busy(Exception):
    """Someone listens at the address but did not accept or answer in time: overloaded
    (or stopped), never a reason to elect a new server."""


class ManagerBackend(Backend):
    name = "manager"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.address
        self._timeout = settings.timeout
        self._wait = settings.timeout + REPLY_SLACK
        self._local = threading.local()
        self._defaults: list[tuple[str, Packed]] = []
        #: election, start and key of this app's server
        self.launcher = ServerLauncher(settings)
        #: set by ensure_server: the owner of a server this process starts
        self._owner: int | None = None
        #: False for the CLI, which works on a running server and never starts one
        self.may_start = True
        # Only on a unix socket: the version table is a file beside it, which a
        # client on TCP (perhaps on another machine) cannot map.
        if settings.tcp is None and settings.client_cache > 0:
            self.read_cache = ReadCache(
                self,
                table_path(settings.socket_path),
                settings.client_cache,
                settings.client_cache_max_value,
            )

    # -- the interface ---------------------------------------------------------

    def set_defaults(self, defaults: list[tuple[str, Packed]]) -> None:
        # Sent on every new connection: a new server gets them from its first client.
        self._defaults = list(defaults)
        self.close()

    def close(self) -> None:
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            self._drop(link)  # the server releases its locks: they are lost
        self._local.link = None

    def call(self, op: str, *args: Any) -> Any:
        # The server answers at once, except when an operation waits for a lock,
        # an atomic block, or a key claimed by one: at most the timeout it was given.
        entry = catalogue.lookup(op)
        if op in _LOCK_CHECKS:
            self._check_not_lost(op, args[0])
        wait = self._wait
        if entry.wait is not None:
            wait += args[entry.wait]
        request = protocol.dumps((op, *args))
        link = self._link()
        try:
            reply = self._round_trip(link, request, wait)
        except _Broken as broken:
            self._drop(link)
            if op in _LOCK_CHECKS:
                if op == "release" and broken.delivered:
                    # Held until the request went out; released now, by it or by
                    # the server on the disconnect.
                    self._lost_locks().discard(args[0])
                    return None
                self._check_not_lost(op, args[0])
            if broken.delivered and not entry.read_only:
                raise SharedStateUnavailable(
                    f"lost the connection to the state server at {self.address} while"
                    f" waiting for the reply to {op!r}; it may or may not have been applied."
                ) from broken.cause
            try:
                link = self._link()
                reply = self._round_trip(link, request, wait)
            except _Broken as again:
                self._drop(link)
                raise SharedStateUnavailable(
                    f"the state server at {self.address} went away during {op!r}"
                ) from again.cause
        if reply[0]:
            if op == "acquire" and reply[1]:
                self._held_locks(link).add(args[0])
                self._lost_locks().discard(args[0])
            elif op == "release":
                self._held_locks(link).discard(args[0])
            return reply[1]
        raise _ERRORS.get(reply[1], RuntimeError)(*reply[2])

    # -- locks held on a connection --------------------------------------------------
    # The server releases a connection's locks when it closes. A thread whose
    # connection was dropped (an error, a timeout, a dead server) has lost them,
    # and must hear so from release() and extend(), not from a new server that
    # never heard of them (or, worse, from nobody).

    def _held_locks(self, link: _Link) -> set[str]:
        """The names of the locks this thread holds on ``link``."""
        held: tuple[_Link, set[str]] | None = getattr(self._local, "held", None)
        if held is None or held[0] is not link:
            held = self._local.held = (link, set())
        return held[1]

    def _lost_locks(self) -> set[str]:
        """Names of locks this thread held on a connection since dropped, until released."""
        lost: tuple[int, set[str]] | None = getattr(self._local, "lost", None)
        if lost is None or lost[0] != _fork_generation:
            lost = self._local.lost = (_fork_generation, set())
        return lost[1]

    def _check_not_lost(self, op: str, name: str) -> None:
        lost = self._lost_locks()
        if name in lost:
            if op == "release":
                lost.discard(name)  # said once: after that it is simply not held
            raise LockNotOwned(
                f"lock {name!r} was lost: the connection to the state server at"
                f" {self.address} was lost while the lock was held (the server released"
                " it then), and another process may have taken it since. Work done"
                " under the lock may have overlapped with another holder's."
            )

    def server_pid(self) -> int:
        """The pid of the server this thread is connected to (connecting if needed)."""
        return self._link().server_pid

    def ensure_server(self, owner: int) -> int:
        """Connect, starting a server owned by process ``owner`` if none runs.

        For the gunicorn hooks, which start the server in the master's name.
        Returns the server's pid.
        """
        self._owner = owner
        try:
            return self.server_pid()
        finally:
            self._owner = None
            self.close()

    # -- one request -------------------------------------------------------------

    def _round_trip(self, link: _Link, request: bytes, wait: float) -> Any:
        """Send ``request`` and read its reply, both by one deadline ``wait`` from now."""
        fd = link.fd
        if self.settings.tcp is not None and link.poller.poll(0):
            # Nothing is due, so the server closed this connection (TCP would only
            # report that on the next receive, after the request had gone out).
            raise _Broken(False, EOFError("connection closed by the state server"))
        deadline = time.monotonic() + wait
        try:
            link.bound_reads(wait)
            protocol.write_within(fd, request, deadline)
        except TimeoutError:
            self._drop(link)  # part of the request may have gone: the framing is lost
            raise SharedStateUnavailable(
                f"the state server at {self.address} took no more of the request within"
                f" {wait:g}s ({self._bound_text(wait)}); is it overloaded or stopped?"
                " The request was not applied."
            ) from None
        except OSError as exc:
            raise _Broken(False, exc) from exc
        except BaseException:
            self._drop(link)  # e.g. gunicorn's timeout exception, mid-message
            raise
        remaining = deadline - time.monotonic()
        if remaining < wait - 0.05:  # a long send: the reply gets only what is left
            link.bound_reads(max(remaining, 0.001))
        try:
            if link.cooperative and not select.select([fd], [], [], max(remaining, 0))[0]:
                raise BlockingIOError
            return protocol.read_reply(fd)  # joins a large reply's parts
        except BlockingIOError:
            self._drop(link)
            raise SharedStateUnavailable(
                f"the state server at {self.address} did not answer within"
                f" {wait:g}s ({self._bound_text(wait)}); is it overloaded or stopped?"
            ) from None
        except (OSError, EOFError) as exc:
            raise _Broken(True, exc) from exc
        except BaseException:
            self._drop(link)
            raise

    def _bound_text(self, wait: float) -> str:
        """How a request's bound ``wait`` is made up, for messages."""
        asked = wait - self._wait
        lock = f" + the {asked:g}s wait asked for" if asked > 0 else ""
        return f"SHAREDSTATE_TIMEOUT {self._timeout:g}s{lock} + {REPLY_SLACK:g}s"

    def _drop(self, link: _Link) -> None:
        if link.generation == _fork_generation:  # an inherited link is the parent's
            link.close()
        held: tuple[_Link, set[str]] | None = getattr(self._local, "held", None)
        if held is not None and held[0] is link:
            self._lost_locks().update(held[1])
            self._local.held = None
        if getattr(self._local, "link", None) is link:
            self._local.link = None

    # -- connecting ----------------------------------------------------------------

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            if link.generation == _fork_generation:
                return link
            # Inherited through fork: the parent owns it. Drop our copy quietly.
            link.close()
        link = self._local.link = self._connect()
        return link

    def _connect(self) -> _Link:
        deadline = time.monotonic() + self._timeout
        key = self.launcher.key()
        # Only the reason is kept: a kept exception would hold this frame (and
        # the new connection with it) in a reference cycle.
        reason = "no attempt"
        busy: _Busy | None = None
        pause = 0.005
        # Connect; if nobody listens, elect (connect or start a server); repeat. A
        # server that is there but busy (its backlog full, its handshake slow) is
        # waited for, never elected away: the election would queue every client
        # behind one lock, and a busy server is not a dead one.
        attempts = (self._open, self._elect)
        while time.monotonic() < deadline:
            for attempt in attempts:
                try:
                    return attempt(key, deadline)
                except SharedStateUnavailable:
                    raise
                except _Busy as exc:
                    busy = exc
                    break
                except (OSError, EOFError) as exc:
                    # Nobody listens (FileNotFoundError, ConnectionRefusedError), or
                    # the server went away between accept and handshake.
                    busy = None
                    reason = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    break
            if busy is not None:
                pause = min(pause * 2, 0.1)
                time.sleep(max(min(pause, deadline - time.monotonic()), 0))
            else:
                time.sleep(0.01)
        if busy is not None:
            raise SharedStateUnavailable(
                f"the state server at {self.address} is overloaded: it {busy} within"
                f" SHAREDSTATE_TIMEOUT ({self._timeout:g}s). It is there, not dead, so no"
                " other server was started; it is busy (or stopped). Raise"
                " SHAREDSTATE_TIMEOUT, or give it less work at once."
            )
        raise SharedStateUnavailable(
            f"cannot reach the state server at {self.address} within {self._timeout:g}s"
            f" (SHAREDSTATE_TIMEOUT): {reason}. See {self.settings.run_base}.log for the"
            " server's own account."
        )

    def _open(self, key: bytes, deadline: float) -> _Link:
        remaining = max(deadline - time.monotonic(), 0.001)
        if self.settings.tcp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.settings.socket_path
        else:
            host, port = self.settings.tcp
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = info[4]
        try:
            sock.settimeout(remaining)
            try:
                sock.connect(target)
            except (BlockingIOError, TimeoutError):
                # A unix socket's backlog is full (EAGAIN), or a TCP connect timed out:
                # someone listens, but is too busy to accept.
                raise _Busy("did not accept the connection") from None
            sock.settimeout(None)
            # Bound every read and write: a stopped server must not hang this worker.
            protocol.set_receive_timeout(sock, remaining)
            protocol.set_send_timeout(sock, min(remaining, self._timeout))
        except BaseException:
            sock.close()
            raise
        fd = sock.detach()
        os.set_blocking(fd, True)  # gevent's sockets are non-blocking underneath
        link = _Link(Connection(fd), remaining)
        # Handshake, hello and defaults, by the connecting deadline.
        conn = protocol.Handshake(fd, deadline)
        try:
            try:
                protocol.client_handshake(conn, key)
            except protocol.Refused as refused:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} refused the connection: {refused}."
                ) from None
            except multiprocessing.AuthenticationError:
                raise AuthenticationError(
                    f"the state server at {self.address} refused this process's key."
                    " Every worker of the app must use the same SHAREDSTATE_KEY (derived"
                    " from SECRET_KEY when unset); if it changed, stop the old server."
                ) from None
            except AssertionError:
                raise SharedStateUnavailable(
                    f"{self.address} is not a Flask-SharedState state server"
                ) from None
            conn.send_bytes(
                protocol.dumps(
                    (
                        "hello",
                        protocol.PROTOCOL_VERSION,
                        self.settings.namespace,
                        self._timeout,
                    )
                )
            )
            ok, welcome, *_ = protocol.loads(conn.recv_bytes())
            if not ok:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} speaks another protocol version;"
                    " stop it so that this version can start its own."
                )
            link.server_pid = welcome["pid"]
            if welcome.get("persist") != self.settings.persist_path:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} (pid {link.server_pid}) persists to"
                    f" {welcome.get('persist') or 'nothing'}, but this app's"
                    f" SHAREDSTATE_PERSIST_PATH is {self.settings.persist_path or 'unset'}."
                    " Stop that server (flask sharedstate stop) so that one with this"
                    " configuration can start, or give the apps the same setting."
                )
            if self._defaults:
                conn.send_bytes(protocol.dumps(("apply_defaults", self._defaults)))
                reply = protocol.loads(conn.recv_bytes())
                if not reply[0]:
                    raise _ERRORS.get(reply[1], RuntimeError)(*reply[2])
            link.bound_reads(self._wait)
            if remaining < self._timeout:
                sock = socket.socket(fileno=fd)
                try:
                    protocol.set_send_timeout(sock, self._timeout)
                finally:
                    sock.detach()
                    os.set_blocking(fd, True)
            return link
        except (BlockingIOError, TimeoutError):
            link.close()
            raise _Busy("accepted the connection but did not answer its handshake") from None
        except BaseException:
            link.close()
            raise

    def _elect(self, key: bytes, deadline: float) -> _Link:
        """Under the election lock: connect if someone won, else start a server."""
        with self.launcher.election(deadline):
            try:
                return self._open(key, deadline)
            except (FileNotFoundError, ConnectionRefusedError):
                if not self.may_start:
                    raise SharedStateUnavailable(
                        f"no state server is running at {self.address}. Start the app (its"
                        " first use starts one) or run 'flask sharedstate serve'."
                    ) from None
            # Nobody listens, and we hold the election: any socket file is a dead server's.
            self.launcher.remove_stale_socket()
            self.launcher.start(key, deadline, owner=self._owner)
            return self._open(key, deadline)

    def running_server(self, key: bytes, deadline: float) -> int | None:
        """The pid of the server answering at the address, or None if nobody listens.

        Never starts one. For ``flask sharedstate serve``, under the election.
        """
        try:
            link = self._open(key, deadline)
        except (OSError, EOFError):
            return None
        except _Busy as busy:
            raise SharedStateUnavailable(
                f"the state server at {self.address} is overloaded: it {busy}"
            ) from None
        link.close()
        return link.server_pid
