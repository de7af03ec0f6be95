"""Flask-SharedState: one shared dict and lock for every worker of a Flask app."""

from typing import TYPE_CHECKING, Any

from .errors import AtomicBlockLost as AtomicBlockLost
from .errors import AuthenticationError as AuthenticationError
from .errors import ConfigError as ConfigError
from .errors import LockNotOwned as LockNotOwned
from .errors import LockTimeout as LockTimeout
from .errors import NotPersisted as NotPersisted
from .errors import SharedStateError as SharedStateError
from .errors import SharedStateUnavailable as SharedStateUnavailable

if TYPE_CHECKING:
    from .extension import SharedState as SharedState

__all__ = [
    "AtomicBlockLost",
    "AuthenticationError",
    "ConfigError",
    "LockNotOwned",
    "LockTimeout",
    "NotPersisted",
    "SharedState",
    "SharedStateError",
    "SharedStateUnavailable",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that the state server (python -m
    # flask_sharedstate.server) never imports Flask.
    if name == "SharedState":
        from .extension import SharedState

        return SharedState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
