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

#: Errors the server may report, by name; anything else becomes RuntimeError.
ERROR_NAMES = ("KeyError", "TypeError", "ValueError", "RuntimeError", "LockTimeout")


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
