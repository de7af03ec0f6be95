"""The redis backend over TLS to a Redis Cluster and to a Sentinel-managed master.

Each topology speaks TLS only (``--port 0``; the sentinels also have a plain port,
for the test that keeps them plain) and requires client certificates; its nodes,
replica and cluster bus talk TLS to each other. Each is started once for the
module and stopped by pid, whatever happens. Every server also listens on
127.0.0.2, a name its certificate is not for.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_redis_production import make_ca, make_leaf, spawn_redis, tls_client, use_everything

from flask_sharedstate import ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.backends.redis_client import redis_version

from conftest import free_port, make_app, stop_process, wait_for, wait_for_cluster

TIMEOUT = 2.0
SERVICE = "fss-tls-service"


def certificates(folder: str) -> dict[str, str]:
    """A CA, another CA that signed nothing here, a certificate for the servers (for
    ``localhost`` and ``127.0.0.1``, the address the sentinels and the cluster hand
    out; also a client certificate: nodes and replicas log in to each other with it),
    and the app's client certificate."""
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_leaf(
        folder,
        "ca",
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
    )
    make_leaf(folder, "ca", "client", "extendedKeyUsage=clientAuth")
    return {name.replace(".", "_"): os.path.join(folder, name) for name in os.listdir(folder)}


def tls_server_args(files: dict[str, str]) -> list[str]:
    return [
        "--tls-cert-file", files["server_crt"], "--tls-key-file", files["server_key"],
        "--tls-ca-cert-file", files["ca_crt"], "--tls-auth-clients", "yes",
        "--tls-replication", "yes",
    ]  # fmt: skip


def client_options(files: dict[str, str]) -> dict[str, str]:
    return {
        "ssl_ca_certs": files["ca_crt"],
        "ssl_certfile": files["client_crt"],
        "ssl_keyfile": files["client_key"],
    }


def app_for(run_dir: str, name: str, url: str, options: Any = None) -> SharedState:
    app = make_app("redis", run_dir, name=name, SHAREDSTATE_TIMEOUT=TIMEOUT)
    app.config.update(SHAREDSTATE_REDIS_URL=url, SHAREDSTATE_REDIS_OPTIONS=options)
    return SharedState(app, defaults={"d": 5})


def refused_by_redis_py_5(run_dir: str, url: str, options: Any) -> bool:
    """Whether the installed redis-py is older than 6, where init_app refuses
    rediss+cluster:// (its cluster client drops ssl_check_hostname): checked, if so."""
    if redis_version() >= (6, 0):
        return False
    with pytest.raises(ConfigError, match="needs redis-py 6") as refused:
        app_for(run_dir, "tls-cluster-refused", url, options)
    assert "pip install -U 'redis>=6'" in str(refused.value)
    return True


#: A name the servers' certificate is not for (they listen on it too).
OTHER_NAME = "127.0.0.2"
BIND = ["--bind", "127.0.0.1", OTHER_NAME]

#: (case, change to the right options, what the error names, what it says to give)
REFUSALS = [
    ("wrong CA", {"ssl_ca_certs": "other-ca_crt"}, "certificate verify failed", "ssl_ca_certs"),
    ("name mismatch", {"host": OTHER_NAME}, "mismatch", "ssl_ca_certs"),
    ("no client certificate", {"ssl_certfile": None, "ssl_keyfile": None}, "TLS", "ssl_certfile"),
]


def refused_options(files: dict[str, str], change: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = client_options(files)
    for name, value in change.items():
        if name != "host":
            options[name] = files[value] if value else None
    return options


def refused_clearly(shared: SharedState, says: str, todo: str) -> None:
    """Each kind of operation raises SharedStateUnavailable naming ``says`` and TLS,
    and what to give (``todo``), within the timeout (never a hang)."""
    for operation in (lambda: shared.get("k"), lambda: shared.incr("k")):
        start = time.monotonic()
        with pytest.raises(SharedStateUnavailable) as info:
            operation()
        took = time.monotonic() - start
        message = str(info.value)
        assert says.lower() in message.lower(), message
        assert "TLS" in message and todo in message, message  # what to do
        assert len(message) < 1500, message  # readable, not a dump of clients
        assert took < 2 * TIMEOUT + 1, took


# -- Cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[dict[str, Any]]:
    """Three TLS-only masters (client certificates required; TLS cluster bus), joined
    by ``redis-cli --tls --cluster create``."""
    folder = str(tmp_path_factory.mktemp("tls-cluster"))
    files = certificates(folder)
    cli = shutil.which("redis-cli")
    assert cli is not None, "the cluster tests need redis-cli"
    started: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for _ in range(3):
            port = free_port()
            args = ["--port", "0", "--tls-port", str(port), *BIND, "--save", ""]
            args += ["--appendonly", "no", "--dir", folder, *tls_server_args(files)]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            args += ["--cluster-port", str(free_port()), "--tls-cluster", "yes"]
            spawn_redis(started, folder, f"node-{port}", args, lambda p=port: tls_client(p, files))
            ports.append(port)
        subprocess.run(
            [cli, "--tls", "--cacert", files["ca_crt"], "--cert", files["client_crt"]]
            + ["--key", files["client_key"], "--cluster", "create"]
            + [f"127.0.0.1:{p}" for p in ports]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        wait_for_cluster([tls_client(p, files) for p in ports])
        yield {"ports": ports, "files": files}
    finally:
        for proc in started:
            stop_process(proc)


def test_cluster_over_tls_runs_every_operation(tls_cluster: dict[str, Any], run_dir: str) -> None:
    """rediss+cluster:// with the CA as a URL parameter and the client certificate in
    SHAREDSTATE_REDIS_OPTIONS: set/get/incr, SCAN of every master, a lock and an atomic
    block work on a cluster that speaks only TLS, its host name checked."""
    files = tls_cluster["files"]
    hosts = ",".join(f"localhost:{p}" for p in tls_cluster["ports"][:2])
    url = f"rediss+cluster://{hosts}?ssl_ca_certs={files['ca_crt']}"
    options = {"ssl_certfile": files["client_crt"], "ssl_keyfile": files["client_key"]}
    if refused_by_redis_py_5(run_dir, url, options):
        return
    shared = app_for(run_dir, "tls-cluster", url, options)
    try:
        use_everything(shared)
        assert shared.get("d") == 5  # the defaults, applied by a new TLS connection
    finally:
        shared.state().backend.close()


@pytest.mark.parametrize("case, change, says, todo", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_cluster_over_tls_refusals_are_clear_and_bounded(
    tls_cluster: dict[str, Any],
    run_dir: str,
    case: str,
    change: dict[str, Any],
    says: str,
    todo: str,
) -> None:
    """A cluster whose certificate the given CA did not sign, or is not for the name
    connected to, or that requires the client certificate not given:
    SharedStateUnavailable naming the TLS problem and what to give, within the timeout."""
    files = tls_cluster["files"]
    url = f"rediss+cluster://{change.get('host', 'localhost')}:{tls_cluster['ports'][0]}"
    if refused_by_redis_py_5(run_dir, url, refused_options(files, change)):
        return
    shared = app_for(run_dir, "tls-cluster-bad", url, refused_options(files, change))
    try:
        refused_clearly(shared, says, todo)
    finally:
        shared.state().backend.close()


# -- Sentinel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_sentinel(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[dict[str, Any]]:
    """A TLS-only master, its replica (replicating over TLS) and two sentinels that
    watch them over TLS; each sentinel has a TLS port and a plain one."""
    folder = str(tmp_path_factory.mktemp("tls-sentinel"))
    files = certificates(folder)
    started: list[subprocess.Popen[bytes]] = []
    try:
        master_port, replica_port = free_port(), free_port()
        base = ["--port", "0", *BIND, "--save", "", "--appendonly", "no"]
        base += ["--dir", folder, *tls_server_args(files)]
        base += ["--repl-diskless-sync-delay", "0"]  # (the replica's sync at once, not in 5 s)
        master = spawn_redis(
            started,
            folder,
            "master",
            [*base, "--tls-port", str(master_port)],
            lambda: tls_client(master_port, files),
        )
        replica_args = [*base, "--tls-port", str(replica_port)]
        replica_args += ["--replicaof", "127.0.0.1", str(master_port)]
        spawn_redis(
            started, folder, "replica", replica_args, lambda: tls_client(replica_port, files)
        )
        replica = tls_client(replica_port, files)
        try:
            wait_for(lambda: replica.info("replication")["master_link_status"] == "up", 20)
        finally:
            replica.close()
        sentinels = []  # (tls port, plain port)
        for _ in range(2):
            tls_port, plain_port = free_port(), free_port()
            conf = os.path.join(folder, f"sentinel-{tls_port}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {plain_port}\ntls-port {tls_port}\nbind {' '.join(BIND[1:])}\n"
                    f"dir {folder}\n"
                    f"tls-cert-file {files['server_crt']}\ntls-key-file {files['server_key']}\n"
                    f"tls-ca-cert-file {files['ca_crt']}\ntls-auth-clients yes\n"
                    "tls-replication yes\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    # Two sentinels can split their votes; a failed election is tried again
                    # after twice this (the default, 3 min, outlasted the test on a busy machine).
                    f"sentinel failover-timeout {SERVICE} 4000\n"
                )
            spawn_redis(
                started,
                folder,
                f"sentinel-{tls_port}",
                [conf, "--sentinel"],
                lambda p=tls_port: tls_client(p, files),
            )
            sentinels.append((tls_port, plain_port))

        def ready() -> bool:
            # The sentinel reached the master over TLS: it saw its replica in INFO.
            for tls_port, _ in sentinels:
                client = tls_client(tls_port, files, decode_responses=True)
                try:
                    state = client.sentinel_master(SERVICE)
                finally:
                    client.close()
                if state["flags"] != "master" or int(state["num-slaves"]) < 1:
                    return False
            return True

        wait_for(ready, timeout=30, interval=0.1)
        yield {
            "files": files,
            "sentinels": sentinels,
            "master": master,
            "master_port": master_port,
            "replica_port": replica_port,
        }
    finally:
        for proc in started:
            stop_process(proc)


def sentinel_url(setup: dict[str, Any], plain: bool = False, host: str = "localhost") -> str:
    hosts = ",".join(f"{host}:{ports[1 if plain else 0]}" for ports in setup["sentinels"])
    return f"rediss+sentinel://{hosts}/{SERVICE}"


def test_sentinel_over_tls_runs_every_operation(tls_sentinel: dict[str, Any], run_dir: str) -> None:
    """rediss+sentinel:// with the CA and client certificate in SHAREDSTATE_REDIS_OPTIONS:
    the sentinels are asked over TLS, and the master they name (by IP address, its
    certificate checked against it) runs every kind of operation over TLS."""
    shared = app_for(
        run_dir, "tls-sentinel", sentinel_url(tls_sentinel), client_options(tls_sentinel["files"])
    )
    try:
        use_everything(shared)
        assert shared.get("d") == 5
    finally:
        shared.state().backend.close()


def test_sentinels_without_tls_are_chosen_by_sentinel_kwargs(
    tls_sentinel: dict[str, Any], run_dir: str
) -> None:
    """sentinel_kwargs {'ssl': False}: the sentinels are asked on their plain port,
    and the master is still reached over TLS (it has no plain port)."""
    options = {**client_options(tls_sentinel["files"]), "sentinel_kwargs": {"ssl": False}}
    shared = app_for(run_dir, "plain-sentinels", sentinel_url(tls_sentinel, plain=True), options)
    try:
        use_everything(shared)
    finally:
        shared.state().backend.close()


SENTINEL_REFUSALS = [
    *[(f"{case} (sentinels)", *rest) for case, *rest in REFUSALS],
    (
        "wrong CA (master only)",
        {"ssl_ca_certs": "other-ca_crt", "sentinel_kwargs": {"ssl_ca_certs": "ca_crt"}},
        "certificate verify failed",
        "ssl_ca_certs",
    ),
    ("name mismatch (master only)", {"force_master_ip": OTHER_NAME}, "mismatch", "announce"),
]


@pytest.mark.parametrize(
    "case, change, says, todo", SENTINEL_REFUSALS, ids=[r[0] for r in SENTINEL_REFUSALS]
)
def test_sentinel_over_tls_refusals_are_clear_and_bounded(
    tls_sentinel: dict[str, Any],
    run_dir: str,
    case: str,
    change: dict[str, Any],
    says: str,
    todo: str,
) -> None:
    """The sentinels' certificate refused (wrong CA, a name it is not for), or they
    require the client certificate not given; or the master's certificate refused
    (the sentinels' accepted): SharedStateUnavailable naming the TLS problem and what
    to give, within the timeout."""
    files = tls_sentinel["files"]
    options = refused_options(files, {k: v for k, v in change.items() if k.startswith("ssl")})
    if "sentinel_kwargs" in change:
        options["sentinel_kwargs"] = {k: files[v] for k, v in change["sentinel_kwargs"].items()}
    url = sentinel_url(tls_sentinel, host=change.get("host", "localhost"))
    if "force_master_ip" in change:
        options["force_master_ip"] = change["force_master_ip"]
        from redis.sentinel import Sentinel

        if "force_master_ip" not in inspect.signature(Sentinel.__init__).parameters:
            # (redis-py before 5.1 has none: named at init_app, not left to a TypeError.)
            with pytest.raises(ConfigError, match="'force_master_ip' is not an argument"):
                app_for(run_dir, "tls-sentinel-bad", url, options)
            return
    shared = app_for(run_dir, "tls-sentinel-bad", url, options)
    try:
        refused_clearly(shared, says, todo)
    finally:
        shared.state().backend.close()


def test_sentinel_failover_over_tls(tls_sentinel: dict[str, Any], run_dir: str) -> None:
    """The master SIGKILLed: each operation fails with SharedStateUnavailable (never
    hangs) until the sentinels promote the replica, then works on it over TLS (its
    certificate checked against the address they hand out), in the same app, with the
    value replicated over TLS. (The module's last Sentinel test: the replica stays master.)"""
    files = tls_sentinel["files"]
    shared = app_for(run_dir, "tls-failover", sentinel_url(tls_sentinel), client_options(files))
    replica = tls_client(tls_sentinel["replica_port"], files)
    try:
        assert shared.incr("n") == 1
        key = "{tls-failover-" + os.path.basename(run_dir) + "}:k:n"  # (make_app's namespace)
        wait_for(lambda: replica.get(key) == b"1", timeout=20)  # replicated before the kill
        tls_sentinel["master"].kill()
        tls_sentinel["master"].wait(10)
        killed = time.monotonic()
        failures, slowest, deadline = 0, 0.0, killed + 60
        while True:
            assert time.monotonic() < deadline, f"no failover within 60 s ({failures} failures)"
            start = time.monotonic()
            try:
                value = shared.incr("n")
                break
            except SharedStateUnavailable:
                failures += 1
            finally:
                slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.05)
        assert failures > 0, "no operation failed: was the master really killed?"
        assert value == 2
        assert slowest < 3 * TIMEOUT + 1, slowest  # never a hang
        assert replica.info("replication")["role"] == "master"
        print(
            f"failover over TLS: {failures} operations refused, slowest {slowest:.2f}s,"
            f" first success {time.monotonic() - killed:.2f}s after the kill"
        )
    finally:
        replica.close()
        shared.state().backend.close()


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, options, says",
    [
        ("redis+cluster://h:1?ssl_ca_certs=/ca.pem", None, "rediss\\+cluster://"),
        ("redis+cluster://h:1", {"ssl_ca_certs": "/ca.pem"}, "rediss\\+cluster://"),
        ("redis+sentinel://h:1/s", {"ssl": True}, "rediss\\+sentinel://"),
        ("rediss+cluster://h:1/0", None, "no database"),
        ("rediss+cluster://h:1", {"ssl_ca_cert": "/x"}, "did you mean 'ssl_ca_certs'"),
        ("rediss+cluster://h:1", {"socket_timeout": 3}, "'socket_timeout'.*SHAREDSTATE_TIMEOUT"),
        ("rediss+cluster://h:1?retry_on_timeout=1", None, "URL: 'retry_on_timeout'"),
        ("rediss+sentinel://h:1/s", {"ssl_ca_cert": "/x"}, "did you mean 'ssl_ca_certs'"),
        ("rediss+sentinel://h:1", None, "names no service"),
        ("rediss+sentinel://h:1/s", {"sentinel_kwargs": {"retry": 1}}, "'retry'.*sentinel"),
    ],
)
def test_tls_topology_options_are_checked_at_init_app(url: str, options: Any, says: str) -> None:
    """TLS options on a plain cluster or Sentinel URL say which scheme turns TLS on;
    a rediss+cluster:// or rediss+sentinel:// URL's options are checked as rediss://'s
    (the backend's own refused; a misspelt or, for a cluster, silently dropped one named)."""
    from flask import Flask

    app = Flask("tls_options")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=url,
        SHAREDSTATE_REDIS_OPTIONS=options,
        SHAREDSTATE_KEY="k" * 32,
    )
    with pytest.raises(ConfigError, match=says):
        SharedState(app)


def tls_arguments() -> set[str]:
    """The arguments of the installed redis-py's TLS connection, but the backend's own."""
    from redis.connection import SSLConnection

    from flask_sharedstate.backends.redis_client import OWNED

    names: set[str] = set()
    for cls in SSLConnection.__mro__:
        if "__init__" in cls.__dict__:
            names |= set(inspect.signature(cls.__dict__["__init__"]).parameters)
    return names - {"self", "args", "kwargs"} - set(OWNED)


def test_tls_cluster_options_are_the_ones_redis_py_passes_on() -> None:
    """On rediss+cluster://, init_app takes each TLS connection argument that the installed
    redis-py's cluster client passes on to its nodes (redis.cluster.REDIS_ALLOWED_KEYS) and
    refuses, by name, each it would drop without a word (redis-py before 6 refuses the scheme)."""
    from flask import Flask
    from redis.cluster import REDIS_ALLOWED_KEYS

    from flask_sharedstate.backends.redis_client import redis_version

    arguments = tls_arguments()
    passed = sorted(arguments & set(REDIS_ALLOWED_KEYS))
    dropped = sorted(arguments - set(REDIS_ALLOWED_KEYS))
    assert "ssl_ca_certs" in passed, (passed, dropped)  # (else this test checks nothing)

    def init_app(name: str) -> None:
        app = Flask("tls_cluster_options")
        app.config.update(
            SHAREDSTATE_BACKEND="redis",
            SHAREDSTATE_REDIS_URL="rediss+cluster://h:1",
            SHAREDSTATE_REDIS_OPTIONS={name: None},
            SHAREDSTATE_KEY="k" * 32,
        )
        SharedState(app)  # touches no network

    for name in dropped:
        with pytest.raises(ConfigError, match=f"'{name}' is not.*drops it"):
            init_app(name)
    for name in passed:
        if redis_version() < (6, 0):
            with pytest.raises(ConfigError, match="needs redis-py 6"):
                init_app(name)
        else:
            init_app(name)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:s3cret@h:1/s",
        "rediss+sentinel://u:s3cret@h:1/s",
        "rediss+cluster://u:s3cret@h:1",
    ],
)
def test_credentials_in_the_url_and_the_options_are_taken(url: str) -> None:
    """A password in the URL and one in SHAREDSTATE_REDIS_OPTIONS (the URL's wins, as
    redis-py's rule says): init_app takes them, not a TypeError from redis-py."""
    from flask import Flask

    app = Flask("both_credentials")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=url,
        SHAREDSTATE_REDIS_OPTIONS={"username": "other", "password": "other"},
        SHAREDSTATE_KEY="k" * 32,
    )
    if url.startswith("rediss+cluster://") and redis_version() < (6, 0):
        with pytest.raises(ConfigError, match="needs redis-py 6"):  # (see check())
            SharedState(app)
        return
    shared = SharedState(app)  # touches no network
    assert "s3cret" not in repr(shared)
    if "sentinel" in url:  # the master's connections log in with the URL's
        kwargs = shared.state().backend.client.connection_pool.connection_kwargs
        assert kwargs["password"] == "s3cret", kwargs
