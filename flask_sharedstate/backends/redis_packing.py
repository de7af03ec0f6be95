"""Commands put in Redis's protocol by the backend itself, where redis-py would write
the same bytes.

redis-py's packer (``Connection.send_command``) costs the backend's direct path a
quarter to a third more client CPU than plain redis-py's own ``GET``/``SET``/``INCR``
on redis-py 5 (an ``EVALSHA`` has six arguments, each encoded on every call). The
backend's arguments are only ever ``str`` (UTF-8: the backend owns ``encoding``),
``bytes`` and ``int``, which :func:`pack` writes as redis-py's encoder does, and
sends with the connection's public ``send_packed_command``.

:func:`packs_like` checks that, once per backend, on a live connection, against the
installed redis-py's own ``pack_command``: where they differ (a redis-py that packs
otherwise), the backend sends with ``send_command``, redis-py's own packing. The
suite runs both paths, on the oldest and newest redis-py.
"""

from __future__ import annotations

from typing import Any

#: A command of each kind of argument the backend sends (a non-ASCII key, a signed
#: pickle, a number), to compare the two packings on.
PROBE: tuple[Any, ...] = ("EVALSHA", "0" * 40, 2, "{é}:txn", "{é}:k:x", b"\x80\x05N.\r\n", -12)


def pack(args: tuple[Any, ...]) -> bytes:
    """``args`` as one command in Redis's protocol (RESP2): bytes, str (UTF-8) or int."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is not bytes:
            if type(arg) is str:
                arg = arg.encode()
            elif type(arg) is int:
                arg = b"%d" % arg
            else:
                raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def packs_like(connection: Any) -> bool:
    """Whether :func:`pack` writes what redis-py's ``connection.pack_command`` does."""
    try:
        theirs = b"".join(bytes(part) for part in connection.pack_command(*PROBE))
    except Exception:  # a redis-py whose packer takes other arguments: use its own
        return False
    return theirs == pack(PROBE)
