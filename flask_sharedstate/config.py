"""The ``SHAREDSTATE_*`` configuration keys: defaults, validation, messages.

:func:`load_settings` reads every key once, at ``init_app``, and turns a wrong
value into a :exc:`~flask_sharedstate.ConfigError` that names the key, the bad
value and what was expected. It touches neither the network nor the disk, but
for one thing: it creates the instance folder that a relative
``SHAREDSTATE_PERSIST_PATH`` lies in.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import hmac
import ipaddress
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

from .errors import ConfigError
from .server.protocol import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    MAX_SECONDS,
)

#: Every key, with its default. ``None`` means unset.
DEFAULTS: dict[str, Any] = {
    "SHAREDSTATE_BACKEND": "manager",
    "SHAREDSTATE_HOST": None,
    "SHAREDSTATE_PORT": None,
    "SHAREDSTATE_SOCKET": None,
    "SHAREDSTATE_KEY": None,
    "SHAREDSTATE_PERSIST_PATH": None,
    "SHAREDSTATE_FSYNC": "everysec",
    "SHAREDSTATE_REDIS_URL": None,
    "SHAREDSTATE_REDIS_OPTIONS": None,
    "SHAREDSTATE_NAMESPACE": None,
    "SHAREDSTATE_TIMEOUT": 5.0,
    "SHAREDSTATE_LEASE": 30.0,
    "SHAREDSTATE_MAX_CONNECTIONS": DEFAULT_MAX_CONNECTIONS,
    "SHAREDSTATE_MAX_CONNECTIONS_PER_PEER": DEFAULT_MAX_CONNECTIONS_PER_PEER,
    "SHAREDSTATE_CLIENT_CACHE": 16 * 2**20,
    "SHAREDSTATE_CLIENT_CACHE_MAX_VALUE": 2**20,
}

BACKENDS = ("manager", "memory", "redis")
FSYNC_POLICIES = ("always", "everysec", "no")

#: Unix socket paths longer than this do not fit ``sockaddr_un``: its ``sun_path`` holds
#: 108 bytes on Linux, 104 on macOS and the BSDs, the final NUL included.
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
#: A default socket name that would not fit becomes a hash this long, plus ``.sock``.
SHORT_SOCKET_NAME = 16
MIN_REMOTE_KEY = 16


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one app."""

    backend: str
    #: ``(host, port)`` for TCP, or None for the unix socket
    tcp: tuple[str, int] | None
    socket_path: str
    #: the auth key, or None to use (and create) the key file; never shown in a repr
    key: bytes | None = field(repr=False)
    #: path prefix of the files that go with the address: ``.key``, ``.lock``, ``.log``
    run_base: str
    namespace: str
    timeout: float
    #: manager: the persistence file, or None for memory only
    persist_path: str | None = None
    #: manager: "always", "everysec" or "no"
    fsync: str = "everysec"
    #: redis: the URL (its password never shown in a repr)
    redis_url: str | None = field(default=None, repr=False)
    #: redis: redis-py connection arguments (TLS files, user, ...; may hold a password)
    redis_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: redis: seconds a lock or atomic block outlives a holder that vanished
    lease: float = 30.0
    #: manager: connections the server holds at once; more are refused
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: manager: connections one process (unix socket) or address (TCP) may hold
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    #: manager on a unix socket: bytes of values each process keeps in its read cache
    #: (0: no read cache)
    client_cache: int = 16 * 2**20
    #: manager: the largest value (pickled bytes) the read cache keeps
    client_cache_max_value: int = 2**20

    @property
    def key_file(self) -> str:
        return self.run_base + ".key"

    @property
    def address(self) -> str:
        """The server address as a user would write it, for messages."""
        if self.tcp is not None:
            host, port = self.tcp
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.socket_path


def _user() -> str:
    """This user, as a name fit for a folder: the uid, or the login name where there is none."""
    if hasattr(os, "getuid"):
        return str(os.getuid())
    try:  # Windows
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):
        name = "user"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def runtime_dir() -> str:
    """The private per-user folder that holds sockets and key files.

    ``$XDG_RUNTIME_DIR`` where the system provides one, else the temp folder,
    else ``/tmp``: the first that exists and is short enough for a socket in it
    (macOS's temp folder is long, and ``sun_path`` short).
    """
    folder = None
    for base in (_own_xdg_runtime_dir(), tempfile.gettempdir(), "/tmp"):
        if not base or not os.path.isdir(base):
            continue
        folder = os.path.join(base, f"flask-sharedstate-{_user()}")
        room = MAX_SOCKET_PATH - len(os.fsencode(folder)) - len("/.sock")
        if room >= SHORT_SOCKET_NAME:
            return folder
    return folder or os.path.join(tempfile.gettempdir(), f"flask-sharedstate-{_user()}")


def _own_xdg_runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` if it is this user's, as the XDG spec requires.

    A gunicorn master started from root's login shell passes ``/run/user/0`` to
    workers that become ``nobody`` (``user =``): theirs is elsewhere.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not hasattr(os, "getuid"):
        return base
    try:
        return base if os.stat(base).st_uid == os.getuid() else None
    except OSError:
        return None


def manager_unsupported() -> str | None:
    """Why this platform cannot run the manager backend, or None if it can."""
    try:
        import fcntl  # noqa: F401 - the election's file lock
    except ImportError:
        has_locks = False
    else:
        has_locks = True
    if hasattr(os, "fork") and has_locks:
        return None
    platform = "Windows" if sys.platform == "win32" else sys.platform
    return f"{platform} has no os.fork or fcntl file locks"


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is not valid: expected {expected}.")


def _text(config: Any, key: str) -> str | None:
    value = config[key]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(key, value, "a string")
    return value


def _seconds(config: Any, key: str) -> float:
    value = config[key]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(key, value, "a number of seconds") from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_SECONDS  # also refuses nan
    ):
        raise _fail(key, value, f"a positive number of seconds, at most {MAX_SECONDS:g}")
    return float(value)


def _count(config: Any, key: str) -> int:
    value = config[key]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, value, "a positive whole number")
    return value


def _size(config: Any, key: str) -> int:
    """A number of bytes, 0 or more (``8_000_000``, ``"8000000"``)."""
    value = config[key]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "a whole number of bytes, 0 or more")
    return value


def _app_slug(app: Flask) -> str:
    """A per-app name: readable, and unique per app location on this machine."""
    identity = f"{app.import_name}\0{app.root_path}".encode()
    digest = hashlib.sha256(identity).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", app.name)[:32] or "app"
    return f"{name}-{digest}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_unknown_keys(config: Any) -> None:
    """A misspelt key (``SHAREDSTATE_TIMEOUTT``) is an error, not a silent default."""
    prefix = "SHAREDSTATE_"
    for name in config:
        if isinstance(name, str) and name.startswith(prefix) and name not in DEFAULTS:
            # (Compared without the prefix, which every key shares.)
            suffixes = [key[len(prefix) :] for key in DEFAULTS]
            close = difflib.get_close_matches(name[len(prefix) :], suffixes, 1)
            raise ConfigError(
                f"{name} is not a key Flask-SharedState reads: "
                + (
                    f"did you mean {prefix + close[0]!r}?"
                    if close
                    else "the keys are " + ", ".join(DEFAULTS) + "."
                )
                + " Rename or remove it."
            )


def load_settings(app: Flask) -> Settings:
    """Default, read and validate every ``SHAREDSTATE_*`` key of ``app``."""
    config = app.config
    _refuse_unknown_keys(config)
    for name, default in DEFAULTS.items():
        config.setdefault(name, default)

    backend = _text(config, "SHAREDSTATE_BACKEND") or "manager"
    if backend not in BACKENDS:
        raise _fail("SHAREDSTATE_BACKEND", backend, "one of " + ", ".join(map(repr, BACKENDS)))
    redis_url = _text(config, "SHAREDSTATE_REDIS_URL")
    if backend == "redis" and redis_url is None:
        raise ConfigError(
            "SHAREDSTATE_BACKEND = 'redis' needs SHAREDSTATE_REDIS_URL, e.g."
            " 'redis://localhost:6379/0' (or rediss://, unix://, redis+sentinel://)."
        )
    redis_options: dict[str, Any] = {}
    if redis_url is not None:
        # (Plain text checks: redis is imported only when the backend is built.)
        from .backends.redis_client import check

        redis_options = check(redis_url, config["SHAREDSTATE_REDIS_OPTIONS"])

    if backend == "manager":
        unsupported = manager_unsupported()
        if unsupported is not None:
            raise ConfigError(
                f"SHAREDSTATE_BACKEND = 'manager' needs its own state server process, and"
                f" {unsupported}: use 'memory' for `flask run` (one process), or 'redis' with"
                " SHAREDSTATE_REDIS_URL to share the state between processes."
            )

    timeout = _seconds(config, "SHAREDSTATE_TIMEOUT")
    lease = _seconds(config, "SHAREDSTATE_LEASE")
    max_connections = _count(config, "SHAREDSTATE_MAX_CONNECTIONS")
    max_per_peer = _count(config, "SHAREDSTATE_MAX_CONNECTIONS_PER_PEER")
    if max_per_peer > max_connections:
        raise ConfigError(
            f"SHAREDSTATE_MAX_CONNECTIONS_PER_PEER = {max_per_peer} is more than"
            f" SHAREDSTATE_MAX_CONNECTIONS = {max_connections}: lower the first or"
            " raise the second."
        )

    client_cache = _size(config, "SHAREDSTATE_CLIENT_CACHE")
    client_cache_max_value = _size(config, "SHAREDSTATE_CLIENT_CACHE_MAX_VALUE")

    persist_path = _text(config, "SHAREDSTATE_PERSIST_PATH")
    if persist_path is not None:
        if backend != "manager":
            raise ConfigError(
                f"SHAREDSTATE_PERSIST_PATH is for the 'manager' backend; with {backend!r},"
                + (
                    " Redis keeps the state as its own configuration says (appendonly)."
                    if backend == "redis"
                    else " the state lives in this process only. Remove the key."
                )
            )
        persist_path = os.path.expanduser(persist_path)
        if not os.path.isabs(persist_path):
            # Relative to the instance folder, as Flask's own files are; Flask does not
            # create that folder, so create it (and the path's own), as Flask-SQLAlchemy
            # does for a relative SQLite path. An absolute path's folder is the user's.
            persist_path = os.path.join(app.instance_path, persist_path)
            folder = os.path.dirname(persist_path)
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"SHAREDSTATE_PERSIST_PATH = {config['SHAREDSTATE_PERSIST_PATH']!r} lies in"
                    f" the instance folder, and {folder} cannot be created: {exc.strerror}."
                    " Create it, or give an absolute path in a folder this user can write."
                ) from None
    fsync = _text(config, "SHAREDSTATE_FSYNC") or "everysec"
    if fsync not in FSYNC_POLICIES:
        raise _fail("SHAREDSTATE_FSYNC", fsync, "one of " + ", ".join(map(repr, FSYNC_POLICIES)))

    namespace = config["SHAREDSTATE_NAMESPACE"]
    if namespace is None:
        namespace = app.name
    elif not isinstance(namespace, str) or not namespace:
        raise _fail("SHAREDSTATE_NAMESPACE", namespace, "a non-empty string")

    host = _text(config, "SHAREDSTATE_HOST")
    port = config["SHAREDSTATE_PORT"]
    tcp = None
    if port is not None and port != "":
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _fail("SHAREDSTATE_PORT", port, "a TCP port number from 1 to 65535")
        tcp = (host or "127.0.0.1", port)
    elif host is not None:
        raise ConfigError(
            f"SHAREDSTATE_HOST = {host!r} is set but SHAREDSTATE_PORT is not: set both"
            " to use TCP, or neither to use a unix socket."
        )

    slug = _app_slug(app)
    socket_path = _text(config, "SHAREDSTATE_SOCKET")
    if socket_path is None:
        folder = runtime_dir()
        socket_path = os.path.join(folder, f"{slug}.sock")
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:  # too long to bind: a short name
            digest = hashlib.sha256(slug.encode()).hexdigest()[:SHORT_SOCKET_NAME]
            socket_path = os.path.join(folder, f"{digest}.sock")
    else:
        socket_path = os.path.abspath(socket_path)
    if tcp is None and len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise _fail(
            "SHAREDSTATE_SOCKET",
            socket_path,
            f"a path of at most {MAX_SOCKET_PATH} bytes (unix sockets here allow no more):"
            " choose a shorter one, or leave SHAREDSTATE_SOCKET unset for a default that fits",
        )

    key: bytes | None
    raw_key = config["SHAREDSTATE_KEY"]
    if raw_key is not None and raw_key != "" and raw_key != b"":
        if isinstance(raw_key, str):
            key = raw_key.encode()
        elif isinstance(raw_key, bytes):
            key = raw_key
        else:
            raise ConfigError("SHAREDSTATE_KEY is not valid: expected a str or bytes.")
        if tcp is not None and not _is_loopback(tcp[0]) and len(key) < MIN_REMOTE_KEY:
            raise ConfigError(
                f"SHAREDSTATE_KEY is too short for a non-loopback SHAREDSTATE_HOST:"
                f" use at least {MIN_REMOTE_KEY} bytes, e.g. secrets.token_hex(32)."
            )
    else:
        if tcp is not None and not _is_loopback(tcp[0]):
            raise ConfigError(
                f"SHAREDSTATE_HOST = {tcp[0]!r} is not a loopback address, so"
                f" SHAREDSTATE_KEY must be set explicitly, to at least {MIN_REMOTE_KEY}"
                " bytes (e.g. secrets.token_hex(32)), on every machine that connects."
            )
        secret = app.config.get("SECRET_KEY")
        if secret:
            if isinstance(secret, str):
                secret = secret.encode()
            if tcp is not None and len(secret) < MIN_REMOTE_KEY:
                # Any local user can connect to a TCP port: one who guesses a weak
                # SECRET_KEY ("dev") could run code in the server (requests are pickles).
                raise ConfigError(
                    f"SECRET_KEY is too short ({len(secret)} bytes) to derive the state"
                    f" server's key for TCP (SHAREDSTATE_PORT = {tcp[1]}): set SHAREDSTATE_KEY"
                    f" to at least {MIN_REMOTE_KEY} random bytes (python -c 'import secrets;"
                    " print(secrets.token_hex(32))'), or use a SECRET_KEY that long, or unset"
                    " SHAREDSTATE_PORT to use a unix socket in a private folder."
                )
            key = hmac.new(secret, b"flask-sharedstate key", "sha256").digest()
        else:
            key = None

    if tcp is not None:
        host, port = tcp
        run_base = os.path.join(
            runtime_dir(), f"tcp-{re.sub(r'[^A-Za-z0-9_.-]+', '-', host)}-{port}"
        )
    else:
        run_base = socket_path

    return Settings(
        backend=backend,
        tcp=tcp,
        socket_path=socket_path,
        key=key,
        run_base=run_base,
        namespace=namespace,
        timeout=timeout,
        redis_url=redis_url,
        redis_options=redis_options,
        lease=lease,
        persist_path=persist_path,
        fsync=fsync,
        max_connections=max_connections,
        max_connections_per_peer=max_per_peer,
        client_cache=client_cache,
        client_cache_max_value=client_cache_max_value,
    )
