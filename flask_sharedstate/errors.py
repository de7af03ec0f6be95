"""The exceptions Flask-SharedState raises.

Every exception carries a message that names the cause and what to do about it.
Values that cannot be stored raise the builtin :exc:`TypeError` or
:exc:`ValueError` (naming the key), and a missing key raises :exc:`KeyError`,
as a :class:`dict` would. The rest form one tree::

    SharedStateError
     ├── ConfigError              a SHAREDSTATE_* key has a wrong value
     ├── SharedStateUnavailable   the state server cannot be reached in time
     │    └── AuthenticationError the server refused the key (SHAREDSTATE_KEY)
     └── LockTimeout              a lock or atomic block waited past its timeout

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
