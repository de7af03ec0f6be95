"""The wire protocol between clients and the state server.

A connection is a :class:`multiprocessing.connection.Connection` over a unix
or TCP socket: each message is a 4-byte big-endian length and a body. The
server first runs the HMAC challenge of :mod:`multiprocessing.connection`
in both directions; no pickle is read before it succeeds. Then:

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
import socket
import struct
from multiprocessing.connection import (
    Connection,
    answer_challenge,
    deliver_challenge,
)
from typing import Any

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

#: How long an unauthenticated peer may take over the handshake.
HANDSHAKE_TIMEOUT = 5.0

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


def server_handshake(conn: Connection, key: bytes) -> None:
    """Authenticate the client, then prove our own knowledge of the key.

    Raises :exc:`multiprocessing.AuthenticationError` on a wrong key.
    """
    deliver_challenge(conn, key)
    answer_challenge(conn, key)


def client_handshake(conn: Connection, key: bytes) -> None:
    """The mirror of :func:`server_handshake`."""
    answer_challenge(conn, key)
    deliver_challenge(conn, key)


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound blocking reads on ``sock`` without making it non-blocking.

    :class:`~multiprocessing.connection.Connection` reads with ``os.read``,
    which a socket-level timeout would break; ``SO_RCVTIMEO`` keeps the
    descriptor blocking and makes a stalled read fail with ``EAGAIN``.
    ``0`` removes the bound.
    """
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, micro))
