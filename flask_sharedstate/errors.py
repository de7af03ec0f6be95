"""The exceptions Flask-SharedState raises.

Every exception carries a message that names the cause and what to do about it.
Values that cannot be stored raise the builtin :exc:`TypeError` or
:exc:`ValueError` (naming the key), and a missing key raises :exc:`KeyError`,
as a :class:`dict` would. The rest form one tree::

    SharedStateError
     ├── ConfigError              a SHAREDSTATE_* key has a wrong value
     ├── SharedStateUnavailable   the state server cannot be reached in time
     │    ├── AuthenticationError the server refused the key (SHAREDSTATE_KEY)
     │    └── NotPersisted        the server could not write a change to its
     │                            persistence file (disk full); nothing changed
     ├── LockTimeout              a lock or atomic block waited past its timeout
     ├── LockNotOwned             released or extended a lock this holder no
     │                            longer holds (lease ran out, connection lost)
     └── AtomicBlockLost          an atomic block lost its claims; nothing of it
                                  was written

:exc:`SharedStateUnavailable` is the one to turn into a ``503`` response.
"""

from __future__ import annotations


class SharedStateError(Exception):
    """Base class of every Flask-SharedState exception."""


class ConfigError(SharedStateError, ValueError):
    """A ``SHAREDSTATE_*`` configuration value is wrong. The message names the key."""


class SharedStateUnavailable(SharedStateError, ConnectionError):
    """The state server could not be reached, or went away during an operation.

    The message says which address was tried.
    """


class AuthenticationError(SharedStateUnavailable):
    """The state server at the address refused this process's key.

    All workers of one app must share ``SHAREDSTATE_KEY`` (or ``SECRET_KEY``,
    from which it is derived by default).
    """


class LockTimeout(SharedStateError, TimeoutError):
    """A lock, an atomic block, or a write waiting for one, timed out."""


class NotPersisted(SharedStateUnavailable):
    """The server could not write a change to its persistence file (a full disk, say).

    The change was not applied: nothing of the operation is visible, and it may
    be retried once the cause (named in the message) is gone.
    """


class LockNotOwned(SharedStateError, RuntimeError):
    """A lock was released (or extended) by a holder that no longer holds it.

    On Redis, the lock's lease (``SHAREDSTATE_LEASE``) ran out while it was
    held; on the state server, the connection that held it was lost. Either
    way another process may have taken the lock since.
    """


class AtomicBlockLost(SharedStateError, RuntimeError):
    """An atomic block lost its claim on the keys it read; nothing of it was written."""
