"""The redis-py client behind the ``redis`` backend: one Redis, TLS, an ACL user, Sentinel,
or a Redis Cluster (``redis_cluster.py``).

``SHAREDSTATE_REDIS_URL`` takes redis-py's own URLs, and one more:

* ``redis://[user:password@]host[:port][/db]``, ``unix:///path?db=0``: as
  :meth:`redis.Redis.from_url` reads them;
* ``rediss://...``: TLS. The certificate is checked against the system's CAs,
  or ``ssl_ca_certs``, and its name against the host, unless told otherwise
  (redis-py before 6 did not check the name by default; here it always does);
* ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``:
  the master that the sentinels name for ``service`` (default port 26379), as
  the ``limits`` library writes it. The user and password are the master's and,
  unless ``sentinel_kwargs`` says otherwise, the sentinels';
* ``rediss+sentinel://...``: the same over TLS, to the master and to the
  sentinels, with ``rediss://``'s arguments and checks (``sentinel_kwargs``
  overrides them for the sentinels: ``{'ssl': False}`` for plain ones);
* ``redis+cluster://`` and ``rediss+cluster://``: see ``redis_cluster.py``.

URL query parameters and ``SHAREDSTATE_REDIS_OPTIONS`` (a dict) are redis-py
connection arguments (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_check_hostname``, ``username``, ``password``, ``client_name``, ...; for
Sentinel also ``sentinel_kwargs``, a dict for the sentinels' connections). The
arguments that carry the backend's guarantees are the backend's own
(:data:`OWNED`): every reply and every connection is bounded by
``SHAREDSTATE_TIMEOUT``, and nothing is sent twice behind the backend's back.
:func:`check` refuses them at ``init_app``; :func:`connect` builds the client.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import AuthenticationError, ConfigError, SharedStateUnavailable
from .redis_cluster import SCHEME as CLUSTER_SCHEME
from .redis_cluster import TLS_SCHEME as TLS_CLUSTER_SCHEME
from .redis_cluster import parse_url as parse_cluster_url

SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEME = "redis+sentinel://"
TLS_SENTINEL_SCHEME = "rediss+sentinel://"
SENTINEL_SCHEMES = (SENTINEL_SCHEME, TLS_SENTINEL_SCHEME)
#: The schemes that speak TLS, and each plain scheme's TLS form.
TLS_SCHEMES = ("rediss://", TLS_SENTINEL_SCHEME, TLS_CLUSTER_SCHEME)
TLS_FORM = {
    "redis://": "rediss://",
    "unix://": "rediss://",
    SENTINEL_SCHEME: TLS_SENTINEL_SCHEME,
    CLUSTER_SCHEME: TLS_CLUSTER_SCHEME,
}
SENTINEL_PORT = 26379
#: The hint for a URL that does not parse: a password's reserved characters.
ENCODE = (
    " A password with / ? # @ : or , in it must be percent-encoded in the URL:"
    " urllib.parse.quote(password, safe='')."
)

#: Connections per process (and app) to one Redis, unless max_connections says otherwise.
#: A caller that finds them all lent waits for one, up to SHAREDSTATE_TIMEOUT.
POOL_SIZE = 50

#: redis-py arguments the backend sets itself, and why a user may not.
OWNED: dict[str, str] = {
    "socket_timeout": "every reply is bounded by SHAREDSTATE_TIMEOUT",
    "socket_connect_timeout": "connecting is bounded by SHAREDSTATE_TIMEOUT",
    "timeout": "every reply is bounded by SHAREDSTATE_TIMEOUT",
    "retry": "a write whose reply was lost must not be sent again",
    "retry_on_timeout": "a write whose reply was lost must not be sent again",
    "retry_on_error": "a write whose reply was lost must not be sent again",
    "health_check_interval": "a health check would be a second, unbounded round trip",
    "redis_connect_func": "new connections apply the app's defaults",
    "decode_responses": "values are bytes (signed pickles and numbers)",
    "encoding": "values are bytes (signed pickles and numbers)",
    "encoding_errors": "values are bytes (signed pickles and numbers)",
    "protocol": "replies are read as RESP2",
    "maint_notifications_config": (
        "they need RESP3, and redis-py skips its check that a pooled connection holds no"
        " unread reply while they are on"
    ),
    "connection_pool": "the backend builds its own pool",
    "connection_class": "the URL's scheme chooses it",
    "single_connection_client": "each thread needs its own connection",
    "host": "put it in SHAREDSTATE_REDIS_URL",
    "port": "put it in SHAREDSTATE_REDIS_URL",
    "path": "put it in SHAREDSTATE_REDIS_URL",
    "unix_socket_path": "put it in SHAREDSTATE_REDIS_URL",
    "url": "that is SHAREDSTATE_REDIS_URL",
}

#: The commands the backend runs (directly, or in its Lua scripts), and ``flask sharedstate
#: status`` (info), for ACL users.
COMMANDS = (
    "get mget exists pttl scan evalsha eval script|load info"
    " set del pexpire persist incrby hget hset hexists sadd sismember"
)


def check(url: str, options: Any) -> dict[str, Any]:
    """Validate ``SHAREDSTATE_REDIS_URL`` and ``SHAREDSTATE_REDIS_OPTIONS``; touch nothing.

    :returns: the options, as a new dict.
    :raises ConfigError: naming the key and what to do.
    """
    if not url.startswith((*SCHEMES, *SENTINEL_SCHEMES, CLUSTER_SCHEME, TLS_CLUSTER_SCHEME)):
        raise ConfigError(
            f"SHAREDSTATE_REDIS_URL = {redact(url)!r} is not valid: expected a redis://,"
            f" rediss:// or unix:// URL, {SENTINEL_SCHEME}host:port,host:port/service, or"
            f" {CLUSTER_SCHEME}host:port[,host:port...] for a Redis Cluster (TLS:"
            f" {TLS_SENTINEL_SCHEME}..., {TLS_CLUSTER_SCHEME}...)."
        )
    if url.startswith((CLUSTER_SCHEME, TLS_CLUSTER_SCHEME)):
        _cluster_nodes(url)  # raises ConfigError
    if url.startswith(SCHEMES):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError
            misread = "@" not in parts.netloc and (
                "@" in parts.fragment
                or "@" in parts.query.partition("=")[0]
                or ("@" in parts.path and not url.startswith("unix://"))
            )
        except ValueError:
            misread = True
        if misread:
            # (A raw # / or ? in the password ends the host part early: urllib then
            # reads the host as localhost, and a port from the password, maybe.)
            raise ConfigError(
                f"SHAREDSTATE_REDIS_URL = {redact(url)!r} is not valid: its host, port or"
                " password does not parse; expected redis://[user:password@]host[:port][/db]"
                f" (or rediss://, unix:///path?db=0).{ENCODE}"
            )
    if options is None:
        options = {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(
            f"SHAREDSTATE_REDIS_OPTIONS = {type(options).__name__} is not valid: expected a"
            " dict of redis-py connection arguments, e.g. {'ssl_ca_certs': '/path/ca.pem'}."
        )
    query = parse_qs(urlsplit(url).query)
    given = (("SHAREDSTATE_REDIS_OPTIONS", list(options)), ("SHAREDSTATE_REDIS_URL", list(query)))
    for where, names in given:
        for name in names:
            if name in OWNED:
                raise ConfigError(
                    f"{where}: {name!r} is the backend's own: {OWNED[name]}. Remove it."
                )
    known = _arguments(url)
    scheme = url.split("://", 1)[0] + "://"
    if "sentinel_kwargs" in query:
        raise ConfigError(
            "SHAREDSTATE_REDIS_URL: 'sentinel_kwargs' cannot be given in the URL: put it in"
            " SHAREDSTATE_REDIS_OPTIONS, as a dict ({'sentinel_kwargs': {'password': ...}})."
        )
    for where, names in given:
        for name in names:
            if known is not None and name not in known and name != "sentinel_kwargs":
                close = difflib.get_close_matches(name, known, 1)
                hint = ""
                if name.startswith("ssl") and scheme in TLS_FORM:
                    hint = (
                        f" (ssl and ssl_* arguments need {TLS_FORM[scheme]}: the URL's scheme"
                        " turns TLS on.)"
                    )
                elif name == "ssl":
                    hint = " (TLS is on already: the URL's scheme says so.)"
                elif url.startswith((CLUSTER_SCHEME, TLS_CLUSTER_SCHEME)):
                    hint = " (redis-py's cluster client drops it without a word.)"
                raise ConfigError(
                    f"{where}: {name!r} is not an argument redis-py takes for a {scheme} URL"
                    + (f": did you mean {close[0]!r}?" if close else ".")
                    + hint
                )
    sentinel_kwargs = options.get("sentinel_kwargs")
    if sentinel_kwargs is not None:
        if not url.startswith(SENTINEL_SCHEMES):
            raise ConfigError(
                f"SHAREDSTATE_REDIS_OPTIONS: 'sentinel_kwargs' is for {SENTINEL_SCHEME} and"
                f" {TLS_SENTINEL_SCHEME} URLs; remove it, or use a Sentinel URL."
            )
        if not isinstance(sentinel_kwargs, Mapping):
            raise ConfigError(
                "SHAREDSTATE_REDIS_OPTIONS: 'sentinel_kwargs' must be a dict of redis-py"
                " connection arguments for the sentinels, e.g. {'password': '...'}."
            )
        # (Each sentinel's client is a redis.Redis built with them: it takes no others.)
        taken = _sentinel_arguments()
        for name in sentinel_kwargs:
            if name in OWNED:
                raise ConfigError(
                    f"SHAREDSTATE_REDIS_OPTIONS: {name!r} (in 'sentinel_kwargs') is the"
                    f" backend's own: {OWNED[name]}. Remove it."
                )
            if taken is not None and name not in taken:
                close = difflib.get_close_matches(str(name), taken, 1)
                raise ConfigError(
                    f"SHAREDSTATE_REDIS_OPTIONS: {name!r} (in 'sentinel_kwargs') is not an"
                    " argument redis-py takes for a sentinel's connection"
                    + (f": did you mean {close[0]!r}?" if close else ".")
                )
    if url.startswith(SENTINEL_SCHEMES):
        _sentinel_parts(url)  # raises ConfigError
    # (After the options: a misspelt or refused one is named whatever the version.)
    if url.startswith(TLS_CLUSTER_SCHEME) and redis_version() < (6, 0):
        raise ConfigError(
            f"SHAREDSTATE_REDIS_URL = {redact(url)!r} needs redis-py 6 or later: before it,"
            " redis-py's cluster client drops ssl_check_hostname, so the nodes' host names"
            " would go unchecked. Upgrade it: pip install -U 'redis>=6'."
        )
    return dict(options)


def _cluster_nodes(url: str) -> None:
    """A cluster URL's nodes parse.

    :raises ConfigError: what to write instead.
    """
    try:
        parse_cluster_url(url)
    except ValueError as exc:
        raise ConfigError(
            f"SHAREDSTATE_REDIS_URL = {redact(url)!r} is not valid: expected {exc}.{ENCODE}"
        ) from None


def redis_version() -> tuple[int, int]:
    """redis-py's (major, minor); (0, 0) if it is not installed (the backend says so)."""
    try:
        import redis
    except ImportError:
        return (0, 0)
    major, minor = (re.findall(r"\d+", redis.__version__) + ["0", "0"])[:2]
    return int(major), int(minor)


def _arguments(url: str) -> set[str] | None:
    """The connection arguments redis-py takes for ``url``'s scheme (None: no redis-py)."""
    try:
        from redis import connection
    except ImportError:
        return None  # the backend says to install it
    kind: type = connection.Connection
    if url.startswith(TLS_SCHEMES):
        kind = connection.SSLConnection
    elif url.startswith("unix://"):
        kind = connection.UnixDomainSocketConnection
    names = {"max_connections", "db", "username", "password"}
    for cls in kind.__mro__:
        if "__init__" in cls.__dict__:
            names |= set(inspect.signature(cls.__dict__["__init__"]).parameters)
    if url.startswith(SENTINEL_SCHEMES):
        from redis.sentinel import Sentinel

        # (force_master_ip since redis-py 5.1: before, it would reach the connection.)
        taken = set(inspect.signature(Sentinel.__init__).parameters)
        names |= {"sentinel_kwargs", "min_other_sentinels", "force_master_ip"} & taken
    if url.startswith((CLUSTER_SCHEME, TLS_CLUSTER_SCHEME)):
        from redis.cluster import REDIS_ALLOWED_KEYS

        names &= set(REDIS_ALLOWED_KEYS)  # (RedisCluster drops the others without a word)
    return names - {"self", "args", "kwargs"} - set(OWNED)


def _sentinel_arguments() -> set[str] | None:
    """The arguments a sentinel's client (``redis.Redis``) takes (None: no redis-py)."""
    try:
        import redis
    except ImportError:
        return None
    return set(inspect.signature(redis.Redis.__init__).parameters) - {"self"} - set(OWNED)


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, str]]:
    """``(sentinels, service, db, auth)`` of a ``redis+sentinel://`` (or ``rediss+``) URL."""
    scheme = TLS_SENTINEL_SCHEME if url.startswith(TLS_SENTINEL_SCHEME) else SENTINEL_SCHEME
    rest = url[len(scheme) :]
    location, _, _ = rest.partition("?")
    auth: dict[str, str] = {}
    userinfo, at, location = location.rpartition("@")  # (a raw / in a password too)
    if at:
        user, colon, password = userinfo.partition(":")
        if user:
            auth["username"] = unquote(user)
        if colon and password:
            auth["password"] = unquote(password)
    hosts, _, path = location.partition("/")
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":") if ":" in item else (item, "", "")
        host = host.strip("[]")
        if not host or (colon and not port.isdigit()):
            # (Not shown when it may be a piece of a password.)
            what = f"{item!r} is not" if "@" not in url else "a part of its host list is not"
            raise ConfigError(
                f"SHAREDSTATE_REDIS_URL = {redact(url)!r}: {what} a sentinel's host:port;"
                f" write {scheme}host:port,host:port/service_name.{ENCODE}"
            )
        sentinels.append((host, int(port) if port else SENTINEL_PORT))
    service, _, db = path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ConfigError(
            f"SHAREDSTATE_REDIS_URL = {redact(url)!r} names no service (or a db that is no"
            f" number): write {scheme}host:port,host:port/service_name[/db]."
        )
    return sentinels, unquote(service), int(db or 0), auth


def connect(
    url: str, options: Mapping[str, Any], timeout: float, connected: Callable[[Any], None]
) -> Any:
    """A redis-py client for ``url``: nothing is retried, everything bounded by ``timeout``.

    ``connected(connection)`` runs on every new connection, after redis-py's
    handshake (``AUTH``, ``SELECT``, ``CLIENT SETNAME``, ...). Opens no connection itself.
    """
    import redis
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    from .redis_classes import SentinelManager, SentinelPool, no_retry, untyped

    def owned() -> dict[str, Any]:
        return {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": no_retry(),
            "health_check_interval": 0,
            "protocol": 2,  # (redis-py 8 speaks RESP3 unless told: one reply format for all)
            **unchecked(),
        }

    hook = functools.partial(_handshake_then, connected)
    extra = dict(options)
    if url.startswith(SCHEMES):
        if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
            checked(extra)
        # A bounded pool per process whose callers wait (up to the timeout) for a
        # connection when all are lent, as the state server's clients wait for theirs.
        # The URL's query parameters override keyword arguments (redis-py's rule).
        extra.setdefault("max_connections", POOL_SIZE)
        pool = untyped(redis.BlockingConnectionPool).from_url(
            url, **extra, **owned(), timeout=timeout, redis_connect_func=hook
        )
        return untyped(redis.Redis)(connection_pool=pool)
    # The URL's query parameters override keyword arguments (redis-py's rule).
    parsers: Mapping[str, Callable[[str], Any]] = untyped(URL_QUERY_ARGUMENT_PARSERS)
    for name, values in parse_qs(urlsplit(url).query).items():
        extra[name] = parsers.get(name, str)(values[0])
    if url.startswith(TLS_SCHEMES):
        extra["ssl"] = True
        checked(extra)
    if url.startswith((CLUSTER_SCHEME, TLS_CLUSTER_SCHEME)):
        from .redis_cluster import ClusterClient

        return ClusterClient(url, timeout, connected, extra)

    sentinels, service, db, auth = _sentinel_parts(url)
    given = dict(extra.pop("sentinel_kwargs", None) or {})
    # Over TLS, the sentinels are asked over TLS too, with the same arguments, unless
    # sentinel_kwargs says otherwise ({'ssl': False}: plain sentinels).
    tls = {name: value for name, value in extra.items() if name.startswith("ssl")}
    if "ssl_cert_reqs" in given and "ssl_check_hostname" not in given:
        tls.pop("ssl_check_hostname", None)  # (their own checks: see checked())
    sentinel_kwargs = {**auth, **tls, **given, **owned()}
    if sentinel_kwargs.get("ssl"):
        checked(sentinel_kwargs)
    # (The URL's user and password win over the options', as in redis-py's from_url.)
    master_kwargs = {**extra, **auth, **owned()}
    master_kwargs.setdefault("max_connections", POOL_SIZE)
    manager = SentinelManager(sentinels, sentinel_kwargs=sentinel_kwargs, **master_kwargs)
    return untyped(manager).master_for(
        service,
        connection_pool_class=SentinelPool,
        db=db,
        redis_connect_func=hook,
        fss_wait=timeout,
    )


def _handshake_then(connected: Callable[[Any], None], connection: Any) -> None:
    """redis-py's handshake on a new connection, then ``connected(connection)``."""
    connection.on_connect()
    connected(connection)


def checked(arguments: dict[str, Any]) -> None:
    """TLS arguments with the certificate's host name checked, unless told otherwise
    (redis-py before 6 did not check it by default; here it always does)."""
    if "ssl_cert_reqs" not in arguments:  # (a name check needs a certificate check)
        arguments.setdefault("ssl_check_hostname", True)


def unchecked() -> dict[str, Any]:
    """Maintenance notifications off (redis-py 7 and later; they need RESP3 anyway).

    While they are on (``"auto"``, redis-py 8's default on TCP), the pool lends an
    idle connection even when it holds a reply nobody read (a caller interrupted
    between a command and its reply): the next command would read that reply as
    its own. Off, the pool finds it and reconnects.
    """
    try:
        notifications = importlib.import_module("redis.maint_notifications")
    except ImportError:  # redis-py before 7: nothing to turn off
        return {}
    return {"maint_notifications_config": notifications.MaintNotificationsConfig(enabled=False)}


def unavailable(
    exc: Exception, address: str, op: str, timeout: float, namespace: str
) -> SharedStateUnavailable:
    """The error for a Redis that could not be used: what happened and what to do."""
    import redis
    from redis.sentinel import MasterNotFoundError

    from .redis_classes import pool_full

    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, redis.AuthenticationError):
        return AuthenticationError(
            f"Redis at {address} refused the credentials ({what}): check the user and"
            " password in SHAREDSTATE_REDIS_URL (or SHAREDSTATE_REDIS_OPTIONS), and that"
            " the ACL user is on."
        )
    if refused(exc):
        return SharedStateUnavailable(
            f"Redis at {address} refused {op!r} to this ACL user (NOPERM {exc}); nothing"
            " was changed. The backend (and flask sharedstate status) needs these commands"
            " on the keys of its namespace"
            f" ({{{namespace}}}:*): ACL SETUSER <user> ~{{{namespace}}}:*"
            f" +{' +'.join(COMMANDS.split())}"
        )
    if isinstance(exc, MasterNotFoundError):
        # (redis-py's own text holds a repr of each sentinel's client: too long to read.)
        causes = sorted(set(re.findall(r"\b(\w+Error)\b", str(exc))) - {"MasterNotFoundError"})
        hint = ""
        if "AuthenticationError" in causes:
            hint = (
                " A sentinel refused the password: the URL's user and password go to the"
                " sentinels too, unless SHAREDSTATE_REDIS_OPTIONS = {'sentinel_kwargs':"
                " {'password': ...}} gives theirs (None for none)."
            )
        elif tls_refused(str(exc), address):
            # OpenSSL's reasons, e.g. "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify
            # failed: self-signed certificate in certificate chain".
            reasons = sorted({r.strip() for r in re.findall(r"\[SSL: \w+\][^()]*", str(exc))})
            hint = (
                " The sentinels' TLS handshake failed"
                + (f" ({'; '.join(reasons)})" if reasons else "")
                + ": over rediss+sentinel:// they are"
                " asked over TLS with the master's ssl_* arguments, unless"
                " SHAREDSTATE_REDIS_OPTIONS = {'sentinel_kwargs': {...}} gives theirs"
                " ({'ssl': False} for sentinels without TLS)." + tls_hint(str(exc), address)
            )
        try:
            count = len(_sentinel_parts(address)[0])
        except ConfigError:  # pragma: no cover - it parsed at init_app
            count = 1
        each = f"each given {timeout:g}s" if count > 1 else f"given {timeout:g}s"
        return SharedStateUnavailable(
            f"Redis at {address}: none of the {count} sentinel(s) named a master for"
            f" {op!r} ({each}, SHAREDSTATE_TIMEOUT, one after another) (MasterNotFoundError"
            f"{': ' + ', '.join(causes) if causes else ''}): the sentinels are unreachable,"
            " refuse this client, or are between a master's failure and its replacement;"
            f" if it was a write, it was not sent.{hint}"
        )
    if (
        isinstance(exc, redis.ConnectionError) and str(exc) == "No connection available."
    ) or pool_full(exc):
        # (The first: BlockingConnectionPool's; the second: a cluster node's pool.)
        return SharedStateUnavailable(
            f"Redis at {address}: every connection of this process's pool was in use"
            f" ({what}): {op!r} was not sent. The pool holds max_connections ({POOL_SIZE}"
            " unless SHAREDSTATE_REDIS_OPTIONS says otherwise) per process, and a caller"
            f" waits up to {timeout:g}s (SHAREDSTATE_TIMEOUT) for one (on a cluster it does"
            " not wait): raise max_connections, or look for slow commands or a slow Redis."
        )
    if isinstance(exc, redis.TimeoutError):
        return SharedStateUnavailable(
            f"Redis at {address} did not answer {op!r} within {timeout:g}s"
            f" (SHAREDSTATE_TIMEOUT) ({what}); if it was a write, it may or may not have"
            " been applied."
        )
    return SharedStateUnavailable(
        f"Redis at {address} could not be used for {op!r} within {timeout:g}s"
        f" (SHAREDSTATE_TIMEOUT) ({what}); if it was a write, it may or may not have been"
        f" applied.{tls_hint(str(exc), address)}"
    )


def tls_refused(text: str, address: str) -> bool:
    """Whether an error's text says a TLS handshake was refused (by either side)."""
    return tls_hint(text, address) != ""


def tls_hint(text: str, address: str) -> str:
    """What to check, for an error whose text says a TLS handshake failed ("": it does not)."""
    hint = ""
    text = text.upper()
    if "CERTIFICATE_REQUIRED" in text or "ALERT BAD CERTIFICATE" in text or "UNKNOWN CA" in text:
        hint = (
            " The server refused this client's TLS certificate (or its absence): give"
            " ssl_certfile and ssl_keyfile (in the URL or SHAREDSTATE_REDIS_OPTIONS), a"
            " certificate from a CA the server's tls-ca-cert-file trusts."
        )
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        hint = (
            " The server's TLS certificate was refused: give the CA that signed it as"
            " ssl_ca_certs (in the URL or SHAREDSTATE_REDIS_OPTIONS), and connect with a"
            " host name the certificate is for."
        )
        if "MISMATCH" in text and address.startswith((TLS_SENTINEL_SCHEME, TLS_CLUSTER_SCHEME)):
            hint += (
                " The master's (or a node's) name is the address the sentinels (or the"
                " cluster) hand out: an IP address, unless they announce host names"
                " (sentinel announce-hostnames, cluster-announce-hostname): its certificate"
                " must be for it."
            )
    elif address.startswith("rediss") and any(
        sign in text for sign in ("RESET BY PEER", "ERROR 104", "CLOSED BY SERVER", "EOF")
    ):
        # TLS 1.3: the server checks the client's certificate after the handshake, and its
        # refusal may arrive as a reset of the first write rather than as a TLS alert
        # (or as OpenSSL's "EOF occurred in violation of protocol (_ssl.c)": checked
        # before the other TLS errors).
        hint = (
            " Over TLS, a connection the server drops at once usually means it refused this"
            " client's certificate (or its absence): give ssl_certfile and ssl_keyfile (in the"
            " URL or SHAREDSTATE_REDIS_OPTIONS), a certificate from a CA the server's"
            " tls-ca-cert-file trusts, or check the server's tls-auth-clients."
        )
    elif "SSL" in text or "TLS" in text:
        hint = " The TLS handshake failed: check that the port speaks TLS (tls-port)."
    return hint


def refused(exc: Exception) -> bool:
    """Whether Redis refused a command (or one a script runs) to this ACL user."""
    import redis

    return isinstance(exc, redis.exceptions.NoPermissionError) or (
        isinstance(exc, redis.ResponseError) and "can't run this command" in str(exc)
    )


def redact(url: str) -> str:
    """The URL without its password, for messages (any scheme, several hosts too).

    A password with an unencoded ``/``, ``?``, ``#`` or ``@`` in it is masked too:
    the user information runs to the last ``@`` before the query (no host, port or
    db holds one; a query may, e.g. ``ssl_ca_certs=/certs/a@b.pem``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    query = ""
    first = rest.find("@")
    if first >= 0:
        start = rest.find("?", first)  # the query: the first ? after the user information's @
        if start >= 0:
            rest, query = rest[:start], rest[start:]
    userinfo, at, rest = rest.rpartition("@")
    rest += query
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    elif at and scheme + "://" in (CLUSTER_SCHEME, TLS_CLUSTER_SCHEME):
        userinfo = "***"  # (a cluster URL's lone user information is its password)
    masked = f"{scheme}://{userinfo}{at}{rest}"
    # Passwords in query parameters too (password=, ssl_password=, ...).
    return re.sub(r"([?&][^=&?]*password[^=&?]*=)[^&]*", r"\1***", masked, flags=re.IGNORECASE)
