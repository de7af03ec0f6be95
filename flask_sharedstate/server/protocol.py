"""The wire protocol between clients and the state server.

A connection is a :class:`multiprocessing.connection.Connection` over a unix
or TCP socket: each message is a 4-byte big-endian length and a body. The
server first runs the HMAC challenge of :mod:`multiprocessing.connection`
in both directions; no pickle is read before it succeeds. Then:

* the client sends ``("hello", PROTOCOL_VERSION, namespace, wait_timeout)``;
* each request is a pickled tuple ``(op, *args)``, each reply
  ``(True, result)`` or ``(False, error_name, message)``.

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

PROTOCOL_VERSION = 1

#: The largest message either side accepts. A larger one closes the connection.
MAX_MESSAGE = 64 * 1024 * 1024

#: How long an unauthenticated peer may take over the handshake.
HANDSHAKE_TIMEOUT = 5.0

#: ``ttl`` argument of a commit entry: leave the key's expiry as it is.
KEEP_TTL = "keep"


#: The length prefix of every message, as multiprocessing.connection writes it.
HEADER = struct.Struct("!i")


def write_message(fd: int, body: bytes) -> None:
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
