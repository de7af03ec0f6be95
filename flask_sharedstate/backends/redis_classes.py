"""redis-py's classes as the ``redis`` backend extends them (Sentinel, Redis Cluster).

Imported only when a client is built (``redis_client.connect``,
``redis_cluster.ClusterClient``): it imports redis-py. Everything here uses
redis-py's public surface (its documented classes, methods and attributes), on
every redis-py the package supports (``redis>=5``). redis-py's own methods are
reached through :func:`untyped`, so that type checking is the same on releases
with annotations and on those without.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

#: Seconds between two questions to the sentinels about which server is the master.
SENTINEL_CHECK = 1.0


def untyped(value: object) -> Any:
    """``value``, typed as Any: redis-py annotates some releases and not others."""
    return value


def pool_full(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's refusal of a connection because its pool is full."""
    full = getattr(redis.exceptions, "MaxConnectionsError", ())  # (redis-py 5.1 and later)
    return isinstance(exc, full) or str(exc) == "Too many connections"


def no_retry() -> Any:
    """redis-py's ``Retry`` that sends nothing again: a write whose reply was lost
    must not run twice."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return untyped(Retry)(untyped(NoBackoff)(), 0)


class SentinelPool(SentinelConnectionPool):
    """redis-py's, which asks the sentinels only for a new connection; this one also
    asks at most every :data:`SENTINEL_CHECK` seconds when it lends one. A master
    that was failed over while still up (``SENTINEL FAILOVER``, a partition) keeps
    taking writes, which it drops when it turns replica: so its connections are
    closed as soon as the sentinels name another master (the idle ones by redis-py's
    ``get_master_address``, to reconnect when next lent; the one being lent at once,
    here, by connecting it again).

    The check follows the lending: a connection that could not connect (sentinels
    down) has already said so, without a second wait for the sentinels.
    """

    def __init__(self, *args: Any, fss_wait: float = 0.0, **kwargs: Any) -> None:
        #: seconds a caller waits for a connection while all ``max_connections`` are lent
        self.fss_wait = fss_wait
        untyped(super()).__init__(*args, **kwargs)
        self.fss_checked = time.monotonic()

    def reset(self) -> None:
        # (Also in a forked child: a condition the parent's threads held is not the child's.)
        untyped(super()).reset()
        self.fss_returned = threading.Condition()

    def release(self, connection: Any) -> None:
        untyped(super()).release(connection)
        with self.fss_returned:
            self.fss_returned.notify()

    def _lend(self, args: Any, kwargs: Any) -> Any:
        """redis-py's ``get_connection``; while every connection is lent, wait for one to
        come back (up to :attr:`fss_wait`), as ``BlockingConnectionPool`` does, instead of
        failing at once. redis-py has no blocking pool for Sentinel."""
        deadline = None
        while True:
            try:
                return untyped(super()).get_connection(*args, **kwargs)
            except redis.ConnectionError as exc:
                if not pool_full(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.fss_wait
                if now >= deadline:
                    raise
                with self.fss_returned:
                    # (Bounded: a connection given back just before this wait is not missed long.)
                    self.fss_returned.wait(min(deadline - now, 0.05))

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        # (No arguments since redis-py 5.3, which warns of them; needed before.)
        connection = self._lend(args, kwargs)
        now = time.monotonic()
        if now - self.fss_checked >= SENTINEL_CHECK:
            self.fss_checked = now
            try:
                master = tuple(untyped(self).get_master_address())  # (closes idle ones if it moved)
            except MasterNotFoundError:
                # Sentinels down: go on with the master known; meanwhile a request
                # does not wait on them each second.
                self.fss_checked = now + 10 * SENTINEL_CHECK
                return connection
            except BaseException:
                untyped(self).release(connection)
                raise
            if (connection.host, connection.port) != master:
                try:
                    connection.disconnect()
                    connection.connect()  # (asks the sentinels: the new master)
                except BaseException:
                    untyped(self).release(connection)
                    raise
        return connection


class SentinelClient(redis.Redis):
    """A sentinel's client, which keeps the error of its last ``SENTINEL MASTERS``."""

    def __init__(self, host: str, port: int, **kwargs: Any) -> None:
        untyped(super()).__init__(host, port, **kwargs)
        self.fss_where = f"{host}:{port}"
        self.fss_error: str | None = None

    def sentinel_masters(self) -> Any:
        try:
            masters = untyped(super()).sentinel_masters()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.fss_error = f"{self.fss_where}: {type(exc).__name__}: {exc}"
            raise
        self.fss_error = None
        return masters


class SentinelManager(Sentinel):
    """redis-py's, whose MasterNotFoundError says what each sentinel's error was
    (redis-py's shows a repr of each client, and since redis-py 8 only the type of
    its error: not which certificate was refused)."""

    def __init__(self, sentinels: list[tuple[str, int]], **kwargs: Any) -> None:
        untyped(super()).__init__(sentinels, **kwargs)
        # (redis-py's own, with the same arguments, are dropped unused: no connection.)
        self.sentinels = [
            SentinelClient(host, port, **self.sentinel_kwargs) for host, port in sentinels
        ]

    def discover_master(self, service_name: str) -> Any:
        try:
            return untyped(super()).discover_master(service_name)
        except MasterNotFoundError:
            errors = [
                c.fss_error for c in self.sentinels if isinstance(c, SentinelClient) and c.fss_error
            ]
            raise MasterNotFoundError(
                f"No master found for {service_name!r}"
                + (f": {'; '.join(errors)}" if errors else "")
            ) from None


class SlotUnavailable(redis.TimeoutError):
    """The cluster kept refusing a command (not run) until the timeout."""


class ClusterUnreachable(redis.TimeoutError):
    """No node of the cluster answered (a command may or may not have run)."""


#: Cluster errors that say a command was refused before it ran.
REFUSED = (TryAgainError, ClusterDownError, SlotNotCoveredError)


class Cluster(RedisCluster):
    """redis-py's cluster client; a command the cluster refused before running it
    is sent again until ``timeout`` (seconds) has passed."""

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        self.fss_timeout = timeout
        untyped(super()).__init__(**kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        timeout = self.fss_timeout
        deadline = time.monotonic() + timeout
        pause = 0.01
        while True:
            try:
                return untyped(super()).execute_command(*args, **kwargs)
            except (ClusterError, RedisClusterException, TryAgainError) as exc:
                # Refused before it ran: TRYAGAIN (the slot's keys are half
                # migrated), CLUSTERDOWN, no node for the slot, or redis-py's
                # "TTL exhausted" after redirections only. Safe to send again.
                not_run = isinstance(exc, REFUSED) or str(exc) == "TTL exhausted."
                if not not_run:
                    if isinstance(exc, RedisClusterException) and exc.__context__ is not None:
                        # Refreshing the slot map after a lost node failed.
                        raise ClusterUnreachable(str(exc)) from None
                    raise
                now = time.monotonic()
                if now >= deadline:
                    raise SlotUnavailable(
                        f"the cluster refused {args[0]} for {timeout:g}s"
                        f" ({type(exc).__name__}: {exc}): the namespace's slot is"
                        " being migrated or the cluster is down; it was not applied"
                    ) from None
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, 0.1)


def cluster_node(host: str, port: int) -> Any:
    """redis-py's ``ClusterNode`` for a startup node."""
    from redis.cluster import ClusterNode

    return untyped(ClusterNode)(host, port)
