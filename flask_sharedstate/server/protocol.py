"""The wire protocol between clients and the state server.

A connection is a :class:`multiprocessing.connection.Connection` over a unix
or TCP socket: each message is a 4-byte big-endian length and a body. The
server first runs the HMAC challenge of :mod:`multiprocessing.connection`
in both directions; no pickle is read before it succeeds. A server at its
connection limit sends, instead of the challenge, one message starting with
:data:`REFUSED` and the reason, and hangs up. The handshake and the hello
that follows are bounded by one deadline (:class:`Handshake`). Then:

* the client sends ``("hello", PROTOCOL_VERSION, namespace, wait_timeout)``;
* each request is a pickled tuple ``(op, *args)``, each reply
  ``(True, result)`` or ``(False, error_name, message)``;
* a reply whose pickle is over :data:`MAX_MESSAGE` (``items`` of a large
  namespace, say) goes in parts: ``("parts", count, size, first_part)``,
  then ``count - 1`` messages, whose bodies, joined after ``first_part``,
  are that pickle. The server takes the result in one atomic step; only its
  sending is split. A request has no such form: the client refuses one over
  the limit before sending it.

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
PROTOCOL_VERSION = 2

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
#: Connections the server holds at once (``SHAREDSTATE_MAX_CONNECTIONS``): 4 gevent
#: workers at gunicorn's default of 1,000 greenlets, or 32 gthread workers of 128.
DEFAULT_MAX_CONNECTIONS = 4096
#: Connections one peer may hold (``SHAREDSTATE_MAX_CONNECTIONS_PER_PEER``): one gevent
#: worker at gunicorn's default ``--worker-connections 1000``, each greenlet with its own.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 1024

#: ``ttl`` argument of a commit entry: leave the key's expiry as it is.
KEEP_TTL = "keep"


#: The length prefix of every message, as multiprocessing.connection writes it.
HEADER = struct.Struct("!i")


def write_message(fd: int, body: bytes | memoryview) -> None:
    """Write one message to a blocking descriptor, in one system call where it fits."""
    data = memoryview(HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def read_message(fd: int, first_read: int = 65536) -> bytes:
    """Read one message from a blocking descriptor: usually a single ``read``.

    Raises EOFError when the peer closed, OSError for a message over
    :data:`MAX_MESSAGE`, BlockingIOError when ``SO_RCVTIMEO`` expired.
    """
    buf = os.read(fd, first_read)
    while len(buf) < 4:
        if not buf:
            raise EOFError("connection closed")
        more = os.read(fd, first_read)
        if not more:
            raise EOFError("connection closed")
        buf += more
    (size,) = HEADER.unpack_from(buf)
    if not 0 <= size <= MAX_MESSAGE:
        raise OSError(f"bad message length {size}")
    end = size + 4
    if len(buf) < end:
        parts = [buf]
        have = len(buf)
        while have < end:
            chunk = os.read(fd, min(end - have, 1 << 20))
            if not chunk:
                raise EOFError("connection closed mid-message")
            parts.append(chunk)
            have += len(chunk)
        buf = b"".join(parts)
    return buf[4:end]


def write_reply(fd: int, body: bytes) -> None:
    """Write a pickled reply: one message, or in parts when it is over the limit."""
    if len(body) <= MAX_MESSAGE:
        write_message(fd, body)
        return
    view = memoryview(body)
    starts = range(0, len(body), _PART)
    # The first part travels inside the header: a message far longer than the
    # client's first read, so that read never takes in bytes of the next one.
    write_message(fd, dumps((PARTS, len(starts), len(body), bytes(view[:_PART]))))
    for start in starts[1:]:
        write_message(fd, view[start : start + _PART])


def read_reply(fd: int) -> Any:
    """Read and unpickle one reply, joining its parts if it came in several messages."""
    reply = loads(read_message(fd))
    if reply[0] != PARTS:
        return reply
    _, count, size, first = reply
    # A 4-byte first read: a part's length, and nothing past the part's end.
    body = b"".join([first, *[read_message(fd, 4) for _ in range(count - 1)]])
    if len(body) != size:
        raise OSError(f"a reply in parts was {len(body)} bytes, not the {size} announced")
    return loads(body)


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


def write_within(fd: int, body: bytes, deadline: float) -> None:
    """Write one message to a blocking socket by ``deadline``, or raise :exc:`TimeoutError`.

    The first ``write`` is bounded by the socket's ``SO_SNDTIMEO`` (set it to no
    more than the time to the deadline); a message that does not fit the socket
    buffer at once is written on with the bound lowered to what remains. After a
    :exc:`TimeoutError` part of the message may have gone out: close the connection.
    """
    data = memoryview(HEADER.pack(len(body)) + body)
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
