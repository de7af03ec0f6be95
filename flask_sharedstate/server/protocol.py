"""The wire protocol between clients and the state server.

A connection is a :class:`multiprocessing.connection.Connection` over a unix
or TCP socket: each message is a 4-byte big-endian length and a body. The
server first runs the HMAC challenge of :mod:`multiprocessing.connection`
in both directions; no pickle is read before it succeeds. A server at its
connection limit sends, instead of the challenge, one message starting with
:data:`REFUSED` and the reason, and hangs up. The handshake and the hello
that follows are bounded by one deadline (:class:`Handshake`). Then:

* the client sends ``("hello", PROTOCOL_VERSION, namespace, wait_timeout)``;
* then the connection is shared by every thread and greenlet of the client
  process: each request is a pickled tuple ``(id, owner, op, *args)`` (the
  owner is the thread or greenlet: it owns its locks and atomic block), each
  reply ``(id, True, result)`` or ``(id, False, error_name, message)``, in
  the order the server finishes them (a request that waits for a lock does
  not hold up the others). ``(0, owner, "forget")`` says that an owner
  ended; id 0 gets no reply;
* a reply whose pickle is over :data:`MAX_MESSAGE` (``items`` of a large
  namespace, say) goes in parts: ``(id, "parts", count, size, first_part)``,
  then ``count - 1`` raw messages, whose bodies, joined after ``first_part``,
  are that pickle. The server takes the result in one atomic step; only its
  sending is split, and nothing else is sent on the connection between the
  parts. A request has no such form: the client refuses one over the limit
  before sending it.

Values travel as stored: ``int`` and ``float`` as themselves (so the server
can increment them), everything else as a pickled ``bytes`` blob that the
server never unpickles.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import time
from multiprocessing.connection import answer_challenge, deliver_challenge
from typing import Any, Protocol

#: 2: replies over MAX_MESSAGE come in parts (a version-1 client would misread them).
#: 3: one connection per process: requests and replies carry an id, requests an owner.
PROTOCOL_VERSION = 3

#: The operation by which a client says that one of its owners (a thread or greenlet)
#: ended: the server releases what that owner held. Sent with request id 0: no reply.
FORGET = "forget"

#: Operations whose caller the server keeps a session for (its locks, its atomic
#: block); every other operation of an owner that holds nothing runs in its
#: connection's shared session.
OWNED_OPERATIONS = (
    "acquire",
    "release",
    "extend",
    "get_or_claim",  # may take get_or_set's lock
    "fill",  # releases it
    "txn_read",
    "txn_commit",
    "txn_abort",
)

#: The largest message either side accepts. A larger one closes the connection.
MAX_MESSAGE = 64 * 1024 * 1024

#: The first element of a reply that comes in parts.
PARTS = "parts"

#: The bytes of a reply in each part: room is left for the first part's header.
_PART = MAX_MESSAGE - 4096

#: The longest ttl and the longest timeout (seconds, about 31 years). Longer is a
#: mistake (``None`` is "no expiry"), and this bound is far inside what every backend
#: can hold: Redis keeps expiry in 64-bit milliseconds, ``threading`` waits end at
#: ``threading.TIMEOUT_MAX`` (about 292 years), ``SO_RCVTIMEO`` takes a C long.
MAX_SECONDS = 1e9

#: How long an unauthenticated peer may take over the whole handshake and hello.
HANDSHAKE_TIMEOUT = 5.0

#: The start of the message a server sends instead of its challenge when it refuses
#: a connection (the rest is the reason, in UTF-8). No challenge starts so.
REFUSED = b"#REFUSED#"

# Connection limits, defaults of the server's options and of the SHAREDSTATE_* keys
# (here, not in process.py, so that config.py imports nothing Unix-only).
#: Connections the server holds at once (``SHAREDSTATE_MAX_CONNECTIONS``). A client
#: process holds one per app, whatever its threads or greenlets: far more than enough.
DEFAULT_MAX_CONNECTIONS = 4096
#: Connections one peer may hold (``SHAREDSTATE_MAX_CONNECTIONS_PER_PEER``): a process
#: holds one per app; on TCP, a peer is a whole client host.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 1024

#: ``ttl`` argument of a commit entry: leave the key's expiry as it is.
KEEP_TTL = "keep"


#: The length prefix of every message, as multiprocessing.connection writes it.
HEADER = struct.Struct("!i")


def reply_parts(rid: int, body: bytes) -> list[bytes | memoryview]:
    """The messages of a reply over :data:`MAX_MESSAGE` to request ``rid``: a header
    ``(rid, "parts", count, size, first_part)``, then the other parts, raw."""
    view = memoryview(body)
    starts = range(0, len(body), _PART)
    first = dumps((rid, PARTS, len(starts), len(body), bytes(view[:_PART])))
    return [first, *(view[start : start + _PART] for start in starts[1:])]


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


loads = pickle.loads


class MessageChannel(Protocol):
    """What the handshake needs of a connection: the part of ``Connection`` it uses."""

    def send_bytes(self, buf: bytes) -> None: ...

    def recv_bytes(self, maxlength: int | None = None) -> bytes: ...


class Refused(Exception):
    """The server refused the connection before the handshake; ``args[0]`` says why."""


class Handshake:
    """A ``Connection`` look-alike whose every read and write ends by one deadline.

    ``SO_RCVTIMEO`` bounds each read, so a peer sending a byte every few seconds
    could hold a connection for ever; here the whole exchange has one deadline,
    after which :exc:`TimeoutError` is raised. The descriptor stays blocking.
    """

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline

    def _wait(self, event: int) -> None:
        remaining = self.deadline - time.monotonic()
        poller = select.poll()
        poller.register(self.fd, event)
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError("the handshake did not finish in time")

    def _read(self, size: int) -> bytes:
        parts = []
        while size:
            self._wait(select.POLLIN)
            chunk = os.read(self.fd, size)
            if not chunk:
                raise EOFError("connection closed")
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        (size,) = HEADER.unpack(self._read(4))
        if not 0 <= size <= (MAX_MESSAGE if maxlength is None else maxlength):
            raise OSError(f"bad message length {size}")
        return self._read(size)

    def send_bytes(self, buf: bytes) -> None:
        data = memoryview(HEADER.pack(len(buf)) + buf)
        while data:
            self._wait(select.POLLOUT)
            data = data[os.write(self.fd, data) :]


class _Replay:
    """A channel that returns ``first`` before reading on: for a message already read."""

    def __init__(self, channel: MessageChannel, first: bytes) -> None:
        self.channel = channel
        self.first: bytes | None = first

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        if self.first is not None:
            message, self.first = self.first, None
            return message
        return self.channel.recv_bytes(maxlength)

    def send_bytes(self, buf: bytes) -> None:
        self.channel.send_bytes(buf)


def refusal(reason: str) -> bytes:
    """The whole message (header included) that refuses a connection for ``reason``."""
    body = REFUSED + reason.encode()
    return HEADER.pack(len(body)) + body


def server_handshake(conn: MessageChannel, key: bytes) -> None:
    """Authenticate the client, then prove our own knowledge of the key.

    Raises :exc:`multiprocessing.AuthenticationError` on a wrong key.
    """
    deliver_challenge(conn, key)  # type: ignore[arg-type]
    answer_challenge(conn, key)  # type: ignore[arg-type]


def client_handshake(conn: MessageChannel, key: bytes) -> None:
    """The mirror of :func:`server_handshake`; raises :exc:`Refused` for a refusal."""
    first = conn.recv_bytes(256)
    if first.startswith(REFUSED):
        raise Refused(first[len(REFUSED) :].decode(errors="replace"))
    answer_challenge(_Replay(conn, first), key)  # type: ignore[arg-type]
    deliver_challenge(conn, key)  # type: ignore[arg-type]


def write_within(fd: int, body: bytes, deadline: float, *, framed: bool = False) -> None:
    """Write one message to a blocking socket by ``deadline``, or raise :exc:`TimeoutError`.

    The first ``write`` is bounded by the socket's ``SO_SNDTIMEO`` (set it to no
    more than the time to the deadline); a message that does not fit the socket
    buffer at once is written on with the bound lowered to what remains. After a
    :exc:`TimeoutError` part of the message may have gone out: close the connection.
    ``framed``: ``body`` is whole messages already (their headers included).
    """
    data = memoryview(body if framed else HEADER.pack(len(body)) + body)
    try:
        data = data[os.write(fd, data) :]
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the peer did not take the message in time")
            sock = socket.socket(fileno=fd)
            try:
                set_send_timeout(sock, max(remaining, 0.001))  # 0 would mean "no bound"
            finally:
                sock.detach()
                os.set_blocking(fd, True)  # a default socket timeout would have unset it
            data = data[os.write(fd, data) :]
    except BlockingIOError:  # SO_SNDTIMEO expired with nothing taken
        raise TimeoutError("the peer did not take the message in time") from None


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound blocking reads on ``sock`` without making it non-blocking.

    :class:`~multiprocessing.connection.Connection` reads with ``os.read``,
    which a socket-level timeout would break; ``SO_RCVTIMEO`` keeps the
    descriptor blocking and makes a stalled read fail with ``EAGAIN``.
    ``0`` removes the bound.
    """
    _set_timeout(sock, socket.SO_RCVTIMEO, seconds)


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound blocking writes on ``sock`` (``SO_SNDTIMEO``), as :func:`set_receive_timeout`."""
    _set_timeout(sock, socket.SO_SNDTIMEO, seconds)


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, micro))
