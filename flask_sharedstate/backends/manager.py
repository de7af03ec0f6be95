"""The ``manager`` backend: the client side of the embedded state server.

What it promises, and how:

* **Election and start** (``launcher.py``): whoever cannot connect holds the
  address's election lock, tries once more, and only then starts a server,
  a fresh detached interpreter owned by the app's master process. A server
  that is there but busy (its backlog full, its handshake slow) is waited
  for until ``SHAREDSTATE_TIMEOUT``, never elected away.
* **One connection per process.** Every thread and greenlet of a process
  shares one connection (:class:`_Channel`): requests carry an id, and
  whichever waiter holds the read turn reads replies and hands the others
  theirs. Each thread or greenlet is its own *owner* on the server (locks
  and atomic blocks are owned per owner, not per process); when it ends, the
  server is told to release what it held, and when the process (its
  connection) ends, the server releases everything.
* **Self-healing.** A request that finds the connection dead before it was
  sent reconnects, re-electing a server if needed, and is sent again. A
  request whose reply is lost is not repeated (it may have been applied),
  except for reads; it raises :exc:`SharedStateUnavailable`.
* **Fork safety.** A forked child never uses its parent's connection: it
  drops its copy and opens its own.
* **Bounded waits.** Connecting (and starting a server) is bounded by
  ``SHAREDSTATE_TIMEOUT``; so is each request, from its first byte sent to
  its reply, plus the lock or atomic wait the caller asked for, plus
  :data:`REPLY_SLACK`. A request past that bound closes the connection (the
  server then releases the process's locks: they are lost, as on any lost
  connection).
* **Refusals.** A server at its connection limit refuses before the
  handshake with a reason naming the limit; that is raised at once as
  :exc:`SharedStateUnavailable`.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import select
import socket
import sys
import threading
import time
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

#: Operations after which the server may hold something for the caller (a lock, an
#: atomic block): the caller's end must then be told to the server.
_STATEFUL = frozenset(protocol.OWNED_OPERATIONS)

#: Seconds a reply may come after ``SHAREDSTATE_TIMEOUT`` (plus any wait asked for):
#: a write to a key claimed by an atomic block waits up to the timeout in the
#: server, whose answer must still arrive in time.
REPLY_SLACK = 1.0

#: Bytes asked of the socket per read: many replies of a busy process at once.
_READ_SIZE = 65536

# Bumped in every forked child: connections of an older generation are the parent's.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


# Unix only, as fork is: importing this module must work everywhere (the CLI imports it).
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _gevent_patched() -> bool:
    """Whether gevent's monkey-patching made ``select`` cooperative in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("select"))


_owner_ids = itertools.count(1)


class _Owner:
    """One thread's (or greenlet's) identity on the server, and the locks it holds.

    Kept in a ``threading.local`` (greenlet-local under gevent): when its thread
    ends, the server is told to release what the owner still held there.
    """

    __slots__ = ("id", "generation", "held", "held_on", "lost", "told")

    def __init__(self) -> None:
        self.id = next(_owner_ids)
        self.generation = _fork_generation
        #: locks held on ``held_on`` (a channel); lost when that channel is
        self.held: set[str] = set()
        self.held_on: _Channel | None = None
        #: locks held on a channel since lost, until their release() hears so
        self.lost: set[str] = set()
        #: the channel the server may keep something of this owner on
        self.told: _Channel | None = None

    def settle(self, current: _Channel | None) -> None:
        """Count the locks held on a channel that is gone as lost."""
        held_on = self.held_on
        if held_on is not None and (held_on.closed or held_on is not current):
            self.lost |= self.held
            self.held = set()
            self.held_on = None

    def __del__(self) -> None:
        channel = self.told
        if channel is not None and self.generation == _fork_generation:
            channel.forget(self.id)


class _Waiter:
    """One request waiting for its reply on a shared channel."""

    __slots__ = ("reply", "wake")

    def __init__(self) -> None:
        self.reply: Any = None
        #: held while its thread sleeps; released to wake it (reply, read turn, close)
        self.wake: Any = None


class _Broken(Exception):
    """The connection died; ``delivered`` tells whether the request may have arrived."""

    def __init__(self, delivered: bool, cause: BaseException | None) -> None:
        self.delivered = delivered
        self.cause = cause


class _Busy(Exception):
    """Someone listens at the address but did not accept or answer in time: overloaded
    (or stopped), never a reason to elect a new server."""


class _Late(Exception):
    """A request got no reply within its bound; the connection was closed."""


class _Channel:
    """This process's one authenticated connection to the server, shared by its threads.

    Requests ``(id, owner, op, *args)`` are written whole under ``send_lock``;
    replies ``(id, ...)`` come in the server's order of completion. One waiter
    at a time reads (the *reader*): it reads whatever replies arrived, hands each
    to its waiter, and when its own has come hands the read turn to another
    waiter. Under gevent the lock and waits are gevent's (monkey-patched), and
    the reader waits for data in the hub, so no greenlet blocks the worker.
    """

    def __init__(self, fd: int, wait: float, tcp: bool) -> None:
        self.fd = fd
        self.tcp = tcp
        self.generation = _fork_generation
        self.cooperative = _gevent_patched()
        self.server_pid = 0
        #: the SO_RCVTIMEO in force, and the one for a request of no wait of its own
        self.wait = wait
        self.default_wait = wait
        self.closed = False
        self.send_lock = threading.Lock()
        self.mutex = threading.Lock()
        self.pending: dict[int, _Waiter] = {}
        self.reading = False
        self.buffer = bytearray()
        #: a reply in parts being joined: (id, parts left, parts, size)
        self.parts: tuple[int, int, list[bytes | memoryview], int] | None = None
        self.ids = itertools.count(1)
        #: owners that ended, to be told to the server with the next request
        self.forgotten: list[int] = []
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    # -- requests -----------------------------------------------------------------

    def request(self, owner: int, op: str, args: tuple[Any, ...], wait: float) -> Any:
        """Send ``(op, *args)`` for ``owner`` and return the server's reply.

        Raises :exc:`_Broken` if the connection failed, :exc:`_Late` if no reply
        came within ``wait`` seconds, TimeoutError if the request could not be
        written whole in time; the channel is closed after each of them.
        """
        deadline = time.monotonic() + wait
        rid = next(self.ids)
        body = protocol.dumps((rid, owner, op, *args))
        waiter = _Waiter()
        with self.mutex:
            if self.closed:
                raise _Broken(False, None)
            if self.tcp and not self.pending and not self.reading:
                self._check_idle()
            self.pending[rid] = waiter
        try:
            self._send(body, deadline)
        except BaseException:
            with self.mutex:
                self.pending.pop(rid, None)
            raise
        return self._await(rid, waiter, deadline)

    def _check_idle(self) -> None:
        """TCP: nothing is due, so a readable socket means the server closed it.

        (TCP would only say so on the next receive, after the request went out.)
        """
        if self.poller.poll(0):
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close_locked(exc)
                raise _Broken(False, exc) from exc
            if not data:
                self._close_locked(EOFError("connection closed by the state server"))
                raise _Broken(False, EOFError("connection closed by the state server"))
            self.buffer += data

    def _send(self, body: bytes, deadline: float) -> None:
        if not self.send_lock.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
            self.close(TimeoutError("no turn to send"))
            raise TimeoutError("another request of this process held the connection")
        try:
            if self.closed:
                raise _Broken(False, None)
            forgotten, self.forgotten = self.forgotten, []
            if forgotten:
                body = (
                    b"".join(
                        protocol.HEADER.pack(len(m)) + m
                        for m in [
                            protocol.dumps((0, owner, protocol.FORGET)) for owner in forgotten
                        ]
                    )
                    + protocol.HEADER.pack(len(body))
                    + body
                )
                protocol.write_within(self.fd, body, deadline, framed=True)
            else:
                protocol.write_within(self.fd, body, deadline)
        except TimeoutError:
            self.close(TimeoutError("a request was not taken in time"))  # framing lost
            raise
        except OSError as exc:
            self.close(exc)
            raise _Broken(False, exc) from exc
        except BaseException as exc:
            self.close(exc)  # e.g. gunicorn's timeout exception, mid-message
            raise
        finally:
            self.send_lock.release()

    def _await(self, rid: int, waiter: _Waiter, deadline: float) -> Any:
        while True:
            with self.mutex:
                if waiter.reply is not None:
                    return waiter.reply
                if self.closed:
                    self.pending.pop(rid, None)
                    raise _Broken(True, None)
                lead = not self.reading
                if lead:
                    self.reading = True
                else:
                    wake = waiter.wake = threading.Lock()
                    wake.acquire()
            if lead:
                try:
                    self._read_until(waiter, deadline)
                finally:
                    self._pass_read_turn()
                continue
            woken = wake.acquire(timeout=max(deadline - time.monotonic(), 0))
            with self.mutex:
                waiter.wake = None
                if not woken and waiter.reply is None and not self.closed:
                    self.pending.pop(rid, None)
                    late = True
                else:
                    late = False
            if late:
                self.close(TimeoutError("no reply in time"))
                raise _Late

    def _pass_read_turn(self) -> None:
        with self.mutex:
            self.reading = False
            for other in self.pending.values():
                if other.reply is None and other.wake is not None:
                    wake, other.wake = other.wake, None
                    wake.release()
                    break

    def _read_until(self, waiter: _Waiter, deadline: float) -> None:
        """As the reader: read and hand out replies until ``waiter``'s has come."""
        while waiter.reply is None:
            if self.buffer and self._deliver_buffered():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(TimeoutError("no reply in time"))
                raise _Late
            try:
                if self.cooperative:
                    if not select.select([self.fd], [], [], remaining)[0]:
                        raise BlockingIOError
                else:
                    bound = min(remaining, self.default_wait)
                    if abs(bound - self.wait) > 0.05:
                        self._bound_reads(max(bound, 0.001))
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                continue  # SO_RCVTIMEO expired: the deadline check above decides
            except OSError as exc:
                self.close(exc)
                raise _Broken(True, exc) from exc
            except BaseException as exc:
                self.close(exc)
                raise
            if not data:
                error = EOFError("connection closed by the state server")
                self.close(error)
                raise _Broken(True, error)
            if not self.buffer and self.parts is None and len(data) >= 4:
                # The common case: exactly one whole reply, handed out without copying.
                (size,) = protocol.HEADER.unpack_from(data)
                if len(data) == size + 4:
                    self._deliver(memoryview(data)[4:])
                    continue
            self.buffer += data

    def _deliver_buffered(self) -> bool:
        """Hand out every whole message in the buffer; False if there was none."""
        buffer = self.buffer
        position, end = 0, len(buffer)
        delivered = False
        while end - position >= 4:
            (size,) = protocol.HEADER.unpack_from(buffer, position)
            if not 0 <= size <= protocol.MAX_MESSAGE:
                error = OSError(f"bad message length {size}")
                self.close(error)
                raise _Broken(True, error)
            if end - position - 4 < size:
                break
            body = bytes(buffer[position + 4 : position + 4 + size])
            position += 4 + size
            self._deliver(body)
            delivered = True
        if position:
            del buffer[:position]
        return delivered

    def _deliver(self, body: bytes | memoryview) -> None:
        parts = self.parts
        if parts is not None:
            rid, left, chunks, size = parts
            chunks.append(body)
            if left > 1:
                self.parts = (rid, left - 1, chunks, size)
                return
            self.parts = None
            joined = b"".join(chunks)
            if len(joined) != size:
                error = OSError(f"a reply in parts was {len(joined)} bytes, not {size}")
                self.close(error)
                raise _Broken(True, error)
            self._hand(rid, protocol.loads(joined)[1:])
            return
        message = protocol.loads(body)
        if message[1] == protocol.PARTS:
            _, _, count, size, first = message
            if count > 1:
                self.parts = (message[0], count - 1, [first], size)
                return
            self._hand(message[0], protocol.loads(first)[1:])
            return
        self._hand(message[0], message[1:])

    def _hand(self, rid: int, reply: Any) -> None:
        with self.mutex:
            waiter = self.pending.pop(rid, None)
            if waiter is None:
                return  # its requester gave up (and closed the channel): nobody wants it
            waiter.reply = reply
            wake = waiter.wake
            if wake is not None:
                waiter.wake = None
                wake.release()

    def _bound_reads(self, wait: float) -> None:
        sock = socket.socket(fileno=self.fd)
        try:
            protocol.set_receive_timeout(sock, wait)
        finally:
            sock.detach()
            os.set_blocking(self.fd, True)  # a gevent (or default-timeout) socket unset it
        self.wait = wait

    # -- ends ---------------------------------------------------------------------

    def forget(self, owner: int) -> None:
        """An owner ended: tell the server (now if the connection is free, else later)."""
        if self.closed or self.generation != _fork_generation:
            return
        self.forgotten.append(owner)
        if self.send_lock.acquire(blocking=False):
            try:
                forgotten, self.forgotten = self.forgotten, []
                if forgotten and not self.closed:
                    data = b"".join(
                        protocol.HEADER.pack(len(m)) + m
                        for m in [protocol.dumps((0, o, protocol.FORGET)) for o in forgotten]
                    )
                    protocol.write_within(self.fd, data, time.monotonic() + self.wait, framed=True)
            except BaseException as exc:  # noqa: BLE001 - from __del__: never raise
                self.close(exc)
            finally:
                self.send_lock.release()

    def close(self, error: BaseException | None = None) -> None:
        if self.generation != _fork_generation:
            # Inherited through fork: the parent's threads may have held the mutex
            # then. Close our copy of the descriptor only (the parent's stays open).
            if not self.closed:
                self.closed = True
                try:
                    os.close(self.fd)
                except OSError:
                    pass
            return
        with self.mutex:
            self._close_locked(error)

    def _close_locked(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass
        for waiter in self.pending.values():
            wake = waiter.wake
            if wake is not None:
                waiter.wake = None
                wake.release()


class ManagerBackend(Backend):
    name = "manager"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.address
        self._timeout = settings.timeout
        self._wait = settings.timeout + REPLY_SLACK
        self._local = threading.local()
        self._channel_now: _Channel | None = None
        self._connecting: tuple[int, Any] = (-1, None)
        #: the last failure to connect: (when it ended, the exception's type and args)
        self._failure: tuple[float, type[BaseException], tuple[Any, ...]] | None = None
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
        channel = self._channel_now
        if channel is not None:
            # The server releases this process's locks: they are lost.
            channel.close(EOFError("closed by this process"))
        self._channel_now = None

    def call(self, op: str, *args: Any) -> Any:
        # The server answers at once, except when an operation waits for a lock,
        # an atomic block, or a key claimed by one: at most the timeout it was given.
        entry = catalogue.lookup(op)
        owner = self._owner_here()
        if op in _LOCK_CHECKS:
            self._check_not_lost(owner, op, args[0])
        wait = self._wait
        if entry.wait is not None:
            wait += args[entry.wait]
        channel = self._channel()
        try:
            reply = self._round_trip(channel, owner, op, args, wait)
        except _Broken as broken:
            owner.settle(None)
            if op in _LOCK_CHECKS:
                if op == "release" and broken.delivered:
                    # Held until the request went out; released now, by it or by
                    # the server on the disconnect.
                    owner.lost.discard(args[0])
                    return None
                self._check_not_lost(owner, op, args[0])
            if broken.delivered and not entry.read_only:
                raise SharedStateUnavailable(
                    f"lost the connection to the state server at {self.address} while"
                    f" waiting for the reply to {op!r}; it may or may not have been applied."
                ) from broken.cause
            try:
                channel = self._channel()
                reply = self._round_trip(channel, owner, op, args, wait)
            except _Broken as again:
                owner.settle(None)
                raise SharedStateUnavailable(
                    f"the state server at {self.address} went away during {op!r}"
                ) from again.cause
        if reply[0]:
            if op == "acquire" and reply[1]:
                owner.settle(channel)
                owner.held.add(args[0])
                owner.held_on = channel
                owner.lost.discard(args[0])
            elif op == "release":
                owner.held.discard(args[0])
            return reply[1]
        raise _ERRORS.get(reply[1], RuntimeError)(*reply[2])

    # -- locks held on a connection --------------------------------------------------
    # The server releases a connection's locks when it closes. A thread whose
    # connection was dropped (an error, a timeout, a dead server) has lost them,
    # and must hear so from release() and extend(), not from a new server that
    # never heard of them (or, worse, from nobody).

    def _owner_here(self) -> _Owner:
        """This thread's (greenlet's) owner: who holds its locks and atomic block."""
        owner: _Owner | None = getattr(self._local, "owner", None)
        if owner is None or owner.generation != _fork_generation:
            owner = self._local.owner = _Owner()
        return owner

    def _check_not_lost(self, owner: _Owner, op: str, name: str) -> None:
        current = self._channel_now
        owner.settle(current if current is not None and not current.closed else None)
        lost = owner.lost
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
        """The pid of the server this process is connected to (connecting if needed)."""
        return self._channel().server_pid

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

    def _round_trip(
        self, channel: _Channel, owner: _Owner, op: str, args: tuple[Any, ...], wait: float
    ) -> Any:
        """Send ``op`` and read its reply, both by one deadline ``wait`` from now."""
        if op in _STATEFUL and owner.told is not channel:
            owner.told = channel  # from now on, its end is told to the server
        try:
            return channel.request(owner.id, op, args, wait)
        except TimeoutError:
            owner.settle(None)
            raise SharedStateUnavailable(
                f"the state server at {self.address} is overloaded: it took no more of the"
                f" request within {wait:g}s ({self._bound_text(wait)}); is it busy or"
                " stopped? The request was not applied."
            ) from None
        except _Late:
            owner.settle(None)
            raise SharedStateUnavailable(
                f"the state server at {self.address} did not answer within"
                f" {wait:g}s ({self._bound_text(wait)}); is it overloaded or stopped?"
            ) from None

    def _bound_text(self, wait: float) -> str:
        """How a request's bound ``wait`` is made up, for messages."""
        asked = wait - self._wait
        lock = f" + the {asked:g}s wait asked for" if asked > 0 else ""
        return f"SHAREDSTATE_TIMEOUT {self._timeout:g}s{lock} + {REPLY_SLACK:g}s"

    def _channel(self) -> _Channel:
        channel = self._channel_now
        if channel is not None and not channel.closed and channel.generation == _fork_generation:
            return channel
        generation, lock = self._connecting
        if generation != _fork_generation:  # a lock made before a fork may be held forever
            generation, lock = self._connecting = (_fork_generation, threading.Lock())
        asked = time.monotonic()
        if not lock.acquire(timeout=self._timeout + REPLY_SLACK):
            raise SharedStateUnavailable(
                f"another thread of this process has been connecting to the state server at"
                f" {self.address} for longer than SHAREDSTATE_TIMEOUT ({self._timeout:g}s)"
            )
        try:
            channel = self._channel_now
            if channel is not None and not channel.closed:
                if channel.generation == _fork_generation:
                    return channel
                channel.close()  # inherited through fork: drop our copy quietly
            failure = self._failure
            if failure is not None and failure[0] > asked:
                # Another thread failed while this one waited: the same answer, at once.
                raise failure[1](*failure[2])
            try:
                channel = self._channel_now = self._connect()
            except (SharedStateUnavailable, AuthenticationError) as exc:
                self._failure = (time.monotonic(), type(exc), exc.args)
                raise
            return channel
        finally:
            lock.release()

    # -- connecting ----------------------------------------------------------------

    def _connect(self) -> _Channel:
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

    def _open(self, key: bytes, deadline: float) -> _Channel:
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
        channel = _Channel(fd, remaining, self.settings.tcp is not None)
        # Handshake and hello by the connecting deadline.
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
            channel.server_pid = welcome["pid"]
            if welcome.get("persist") != self.settings.persist_path:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} (pid {channel.server_pid}) persists"
                    f" to {welcome.get('persist') or 'nothing'}, but this app's"
                    f" SHAREDSTATE_PERSIST_PATH is {self.settings.persist_path or 'unset'}."
                    " Stop that server (flask sharedstate stop) so that one with this"
                    " configuration can start, or give the apps the same setting."
                )
            channel.default_wait = self._wait
            channel._bound_reads(self._wait)
            if remaining < self._timeout:
                sock = socket.socket(fileno=fd)
                try:
                    protocol.set_send_timeout(sock, self._timeout)
                finally:
                    sock.detach()
                    os.set_blocking(fd, True)
        except (BlockingIOError, TimeoutError):
            channel.close()
            raise _Busy("accepted the connection but did not answer its handshake") from None
        except BaseException:
            channel.close()
            raise
        if self._defaults:
            try:
                reply = channel.request(0, "apply_defaults", (self._defaults,), self._wait)
            except (_Late, TimeoutError):
                channel.close()
                raise _Busy("did not answer the app's defaults") from None
            except _Broken as broken:
                channel.close()
                raise EOFError("the state server closed the connection") from broken.cause
            except BaseException:
                channel.close()
                raise
            if not reply[0]:
                channel.close()
                raise _ERRORS.get(reply[1], RuntimeError)(*reply[2])
        return channel

    def _elect(self, key: bytes, deadline: float) -> _Channel:
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
            channel = self._open(key, deadline)
        except (OSError, EOFError):
            return None
        except _Busy as busy:
            raise SharedStateUnavailable(
                f"the state server at {self.address} is overloaded: it {busy}"
            ) from None
        channel.close()
        return channel.server_pid
