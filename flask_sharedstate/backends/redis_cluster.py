"""Redis Cluster for the ``redis`` backend: the ``redis+cluster://`` URL and its client.

Every key of a namespace carries the hash tag ``{namespace}`` (see ``redis.py``),
so the whole namespace lives in one hash slot, on one master: each Lua script's
keys are on the node that runs it, and an atomic block is as atomic as on a
single Redis. redis-py's :class:`~redis.cluster.RedisCluster` finds that master
and follows ``MOVED`` (the slot was moved to another master) and ``ASK`` (it is
being moved) by itself; this module adds, with the plain client's rules:

* no silent retries of a command that may have run (a lost reply is an error);
  each reply, and connecting, bounded by ``SHAREDSTATE_TIMEOUT``;
* a command the cluster refused before running it (``TRYAGAIN`` while the
  slot's keys are half moved, ``CLUSTERDOWN``) is sent again until the timeout,
  as a write to a claimed key waits;
* the cluster is first reached at first use, not at ``init_app``, so an app
  boots while its cluster is down and answers 503 until it is back;
* new connections apply the defaults on the master that owns the namespace's
  slot (the others answer ``MOVED`` and are left alone).

``URL``: ``redis+cluster://[[user]:password@]host:port[,host:port...]``, the
style of the ``limits`` library: any reachable node is enough to discover the
others. ``rediss+cluster://...[?ssl_ca_certs=...]``: the same over TLS, to every
node, with ``rediss://``'s arguments (see ``redis_client.py``, which checks them
and builds this client with them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

SCHEME = "redis+cluster://"
#: The same over TLS (the scheme other clients use for it: redis-rs, go-redis wrappers).
TLS_SCHEME = "rediss+cluster://"


def parse_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """The startup nodes, user name and password of a ``redis+cluster://`` or
    ``rediss+cluster://`` URL (the latter's query, its TLS arguments, is not read here).

    :raises ValueError: what is wrong with it, in words that say what to write.
    """
    scheme = TLS_SCHEME if url.startswith(TLS_SCHEME) else SCHEME
    if not url.startswith(scheme):
        raise ValueError(f"a cluster URL starts with {SCHEME} (or {TLS_SCHEME}, for TLS)")
    rest = url[len(scheme) :]
    if scheme == TLS_SCHEME:
        rest = rest.partition("?")[0]
    if any(c in rest for c in "/?#"):
        raise ValueError(
            f"{scheme}host:port[,host:port...] with no database, path or"
            " options after the hosts (a cluster has only database 0)"
            + ("; TLS arguments need rediss+cluster://" if "?" in rest else "")
        )
    username = password = None
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host means a password, as redis-py reads it
            username, password = None, unquote(user) or None
    nodes = []
    for item in rest.split(","):
        host, colon, port = item.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            # (Not shown when it may be a piece of a password: a raw ? in it, over TLS.)
            hidden = scheme == TLS_SCHEME and "@" in url.partition("?")[2]
            what = "a part of its host list is" if hidden else f"{item.strip()!r} is"
            raise ValueError(
                f"{scheme}host:port[,host:port...], some of the cluster's nodes"
                f" (any one reachable node is enough), but {what} not host:port"
            )
        nodes.append((host, int(port)))
    return nodes, username, password


class ClusterClient:
    """A :class:`~redis.cluster.RedisCluster`, built at its first use.

    redis-py's cluster client asks a node for the slot map as it is built, and
    fails if none answers: built here on first use instead, so that an
    unreachable cluster is a :exc:`~redis.exceptions.ConnectionError` of one
    operation (``SharedStateUnavailable``), tried again by the next, as with the
    plain client.

    :param connected: called with each new connection, after redis-py's handshake.
    :param options: more redis-py connection arguments for every node (TLS,
        credentials), checked by ``redis_client.check``.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        connected: Callable[[Any], None],
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._connected = connected
        self._options = dict(options or {})
        self._lock = threading.Lock()
        self._client: Any = None

    def _get(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = _build(self._url, self._timeout, self._connected, self._options)
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    # What the backend needs before it reaches the cluster:

    def register_script(self, script: str) -> Any:
        from redis.commands.core import Script

        from .redis_classes import untyped

        # As bytes: a str would make Script ask the (unbuilt) client for its encoder.
        return untyped(Script)(self, script.encode())  # (it forwards to one)

    def disconnect(self) -> None:
        """Close every connection to every node (the slot map is kept)."""
        if self._client is not None:
            self._client.disconnect_connection_pools()


def _build(
    url: str, timeout: float, connected: Callable[[Any], None], extra: Mapping[str, Any]
) -> Any:
    import redis
    from redis.exceptions import RedisClusterException

    from .redis_classes import Cluster, ClusterUnreachable, cluster_node, no_retry, untyped
    from .redis_client import redis_version, tls_refused, unchecked

    nodes, username, password = parse_url(url)
    options: dict[str, Any] = dict(extra)  # (the URL's user and password win, as redis-py's)
    if username is not None or "username" not in options:
        options["username"] = username
    if password is not None or "password" not in options:
        options["password"] = password
    if redis_version() < (6, 0):  # later ones read retry= only
        options["cluster_error_retry_attempts"] = 0
    try:
        # (Through untyped: redis-py 5's stubs call the class abstract.)
        return untyped(Cluster)(
            timeout=timeout,
            startup_nodes=[cluster_node(host, port) for host, port in nodes],
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # No silent retries: a write whose reply was lost must not run twice.
            retry=no_retry(),
            # Called on every new connection, after redis-py's handshake.
            redis_connect_func=connected,
            protocol=2,
            **unchecked(),
            **options,
        )
    except RedisClusterException as exc:
        if tls_refused(str(exc), url):
            # Every node was reached and refused the handshake: not a silence.
            raise redis.ConnectionError(f"{exc}") from None
        raise ClusterUnreachable(f"{exc}") from None
