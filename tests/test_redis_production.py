"""The redis backend against Redis as it is run in production: TLS, ACL users, Sentinel.

Every server is a real redis-server on a loopback port, started by the test and
stopped by pid (the ``redises`` fixture), whatever happens.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_client

from flask_sharedstate import AuthenticationError, ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.backends.redis_client import redis_version

from conftest import free_port, make_app, stop_process, wait_for
from servers import ROOT, LoadProgress, Server, start_gunicorn

# -- servers ---------------------------------------------------------------------------------


@pytest.fixture
def redises() -> Iterator[list[subprocess.Popen[bytes]]]:
    """redis-server processes a test starts; each stopped by its pid at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc)


def spawn_redis(
    started: list[subprocess.Popen[bytes]],
    folder: str,
    name: str,
    args: list[str],
    client: Callable[[], Any],
) -> subprocess.Popen[bytes]:
    """Start ``redis-server ARGS`` (its log in ``folder``) and wait until ``client()`` pings."""
    server = shutil.which("redis-server")
    assert server is not None, "the redis tests need redis-server"
    log = os.path.join(folder, f"{name}.log")
    proc = subprocess.Popen(
        [server, *args, "--logfile", log], stdout=subprocess.DEVNULL, cwd=folder
    )
    started.append(proc)

    def pings() -> bool:
        if proc.poll() is not None:
            return True
        conn = client()
        try:
            return bool(conn.ping())
        except redis_client.RedisError:
            return False
        finally:
            conn.close()

    wait_for(pings, timeout=20, interval=0.05)
    if proc.poll() is not None:
        with open(log) as f:
            raise RuntimeError(f"redis-server {name} exited at start:\n{f.read()[-2000:]}")
    return proc


def plain_args(port: int, folder: str) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"] + [
        "--dir",
        folder,
        # A replica's first sync at once: a master waits 5 s by default for more replicas.
        "--repl-diskless-sync-delay",
        "0",
    ]


def use_everything(shared: SharedState) -> None:
    """Every kind of operation once: values, numbers, scan, a lock, an atomic block."""
    shared.set("v", {"a": [1]})
    assert shared.get("v") == {"a": [1]}
    assert shared.incr("n") == 1
    assert shared.setdefault("d", 5) == 5
    assert len(shared.dict) == 3
    with shared.lock("l"):
        pass
    with shared.atomic():
        shared.dict["v"] = {"a": [1, 2]}
    assert shared.get("v") == {"a": [1, 2]}
    assert shared.delete("v") is True


# -- TLS ---------------------------------------------------------------------------------------


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: str, name: str) -> None:
    openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def make_leaf(folder: str, ca: str, name: str, extensions: str) -> None:
    openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    with open(os.path.join(folder, f"{name}.ext"), "w") as f:
        f.write(
            "basicConstraints=critical,CA:FALSE\nauthorityKeyIdentifier=keyid\n"
            "keyUsage=critical,digitalSignature\n" + extensions + "\n"
        )
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


def start_tls_redis(
    folder: str, redises: list[subprocess.Popen[bytes]], auth_clients: str
) -> dict[str, str]:
    """A redis-server that speaks TLS only (no plain port); ``auth_clients`` is its
    ``tls-auth-clients`` (``yes``: a client certificate is required; ``optional``).

    Its certificate is for the name ``localhost`` only (not ``127.0.0.1``), from the
    test's own CA; ``other-ca`` signed nothing of it.
    """
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_leaf(folder, "ca", "server", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth")
    make_leaf(folder, "ca", "client", "extendedKeyUsage=clientAuth")
    files = {name: os.path.join(folder, name) for name in os.listdir(folder)}
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--tls-cert-file", files["server.crt"], "--tls-key-file", files["server.key"]]
    args += ["--tls-ca-cert-file", files["ca.crt"], "--tls-auth-clients", auth_clients]
    named = {name.replace(".", "_"): path for name, path in files.items()}
    spawn_redis(
        redises,
        folder,
        "tls",
        [*args, "--dir", folder],
        lambda: tls_client(port, named, socket_timeout=2),
    )
    return {"port": str(port), **named}


def tls_client(port: int, files: dict[str, str], **kwargs: Any) -> Any:
    """A plain redis-py client of a TLS-only server at localhost:``port``, with the
    client certificate (``files``: ``ca_crt``, ``client_crt``, ``client_key``)."""
    kwargs.setdefault("socket_timeout", 5)
    return redis_client.Redis(
        host="localhost",
        port=port,
        ssl=True,
        ssl_ca_certs=files["ca_crt"],
        ssl_certfile=files["client_crt"],
        ssl_keyfile=files["client_key"],
        **kwargs,
    )


@pytest.fixture
def tls_redis(tmp_path: Any, redises: list[subprocess.Popen[bytes]]) -> dict[str, str]:
    """A TLS-only redis-server that requires client certificates."""
    return start_tls_redis(str(tmp_path), redises, "yes")


def tls_app(run_dir: str, url: str, **config: Any) -> SharedState:
    app = make_app("redis", run_dir, name="tls", SHAREDSTATE_TIMEOUT=2.0)
    app.config["SHAREDSTATE_REDIS_URL"] = url
    app.config.update(config)
    return SharedState(app, defaults={"d": 5})


def test_tls_with_ca_and_client_certificate_as_url_parameters(
    tls_redis: dict[str, str], run_dir: str, redis_url: str
) -> None:
    """rediss://localhost with the CA, client certificate and key as redis-py URL
    parameters: every kind of operation works over TLS (the server has no plain port)."""
    t = tls_redis
    url = (
        f"rediss://localhost:{t['port']}/0?ssl_ca_certs={t['ca_crt']}"
        f"&ssl_certfile={t['client_crt']}&ssl_keyfile={t['client_key']}"
    )
    shared = tls_app(run_dir, url)
    try:
        use_everything(shared)
    finally:
        shared.state().backend.close()


def test_tls_with_options_dict(tls_redis: dict[str, str], run_dir: str, redis_url: str) -> None:
    """The same files given in SHAREDSTATE_REDIS_OPTIONS (a dict of redis-py arguments)."""
    t = tls_redis
    options = {
        "ssl_ca_certs": t["ca_crt"],
        "ssl_certfile": t["client_crt"],
        "ssl_keyfile": t["client_key"],
    }
    shared = tls_app(
        run_dir, f"rediss://localhost:{t['port']}/0", SHAREDSTATE_REDIS_OPTIONS=options
    )
    try:
        use_everything(shared)
    finally:
        shared.state().backend.close()


def test_tls_server_with_optional_client_certificates(
    tmp_path: Any, redises: list[subprocess.Popen[bytes]], run_dir: str, redis_url: str
) -> None:
    """tls-auth-clients optional: the CA alone is enough (no client certificate), and
    the server's certificate is still checked (another CA is refused)."""
    t = start_tls_redis(str(tmp_path), redises, "optional")
    shared = tls_app(run_dir, f"rediss://localhost:{t['port']}/0?ssl_ca_certs={t['ca_crt']}")
    other = tls_app(run_dir, f"rediss://localhost:{t['port']}/0?ssl_ca_certs={t['other-ca_crt']}")
    try:
        use_everything(shared)
        with pytest.raises(SharedStateUnavailable, match="certificate verify failed"):
            other.get("k")
    finally:
        shared.state().backend.close()
        other.state().backend.close()


@pytest.mark.parametrize(
    "case, host, change, says",
    [
        ("wrong CA", "localhost", {"ssl_ca_certs": "other-ca_crt"}, "certificate verify failed"),
        ("hostname mismatch", "127.0.0.1", {}, "mismatch"),
        ("no client certificate", "localhost", {"ssl_certfile": None, "ssl_keyfile": None}, "TLS"),
    ],
)
def test_tls_refusals_are_clear_and_bounded(
    tls_redis: dict[str, str],
    run_dir: str,
    redis_url: str,
    case: str,
    host: str,
    change: dict[str, Any],
    says: str,
) -> None:
    """A certificate from another CA, a name the certificate is not for, or no client
    certificate: SharedStateUnavailable naming the TLS problem, within the timeout."""
    t = tls_redis
    options: dict[str, Any] = {
        "ssl_ca_certs": t["ca_crt"],
        "ssl_certfile": t["client_crt"],
        "ssl_keyfile": t["client_key"],
    }
    for name, value in change.items():
        options[name] = t[value] if value else None
    shared = tls_app(run_dir, f"rediss://{host}:{t['port']}/0", SHAREDSTATE_REDIS_OPTIONS=options)
    try:
        for operation in (lambda: shared.get("k"), lambda: shared.incr("k")):
            start = time.monotonic()
            with pytest.raises(SharedStateUnavailable) as info:
                operation()
            took = time.monotonic() - start
            message = str(info.value)
            assert says.lower() in message.lower(), message
            assert "TLS" in message, message  # and says what to check
            assert took < 2 * 2.0 + 1, took  # the timeout is 2 s: never a hang
    finally:
        shared.state().backend.close()


# -- ACL users --------------------------------------------------------------------------------


@pytest.fixture
def acl(redis_url: str) -> Iterator[Callable[..., str]]:
    """``acl(name, *rules)`` makes an ACL user on the session's Redis (deleted at the end)
    and returns the URL that logs in as it."""
    admin = redis_client.Redis.from_url(redis_url)
    made: list[str] = []

    def make(name: str, *rules: str) -> str:
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw-" + name, *rules)
        made.append(name)
        return redis_url.replace("redis://", f"redis://{name}:pw-{name}@")

    yield make
    for name in made:
        admin.execute_command("ACL", "DELUSER", name)
    admin.close()


def everything_allowed(namespace: str) -> list[str]:
    from flask_sharedstate.backends.redis_client import COMMANDS

    return [f"~{{{namespace}}}:*", *["+" + c for c in COMMANDS.split()]]


def acl_app(run_dir: str, url: str, name: str = "acl") -> SharedState:
    app = make_app("redis", run_dir, name=name, SHAREDSTATE_TIMEOUT=2.0)
    app.config["SHAREDSTATE_REDIS_URL"] = url
    return SharedState(app, defaults={"d": 5})


def test_acl_user_with_the_documented_commands_can_do_everything(
    acl: Callable[..., str], run_dir: str
) -> None:
    """An ACL user allowed exactly the commands the docs list, on its namespace's keys
    only, runs every kind of operation."""
    namespace = f"acl-{os.path.basename(run_dir)}"
    shared = acl_app(run_dir, acl("fss-app", *everything_allowed(namespace)))
    try:
        use_everything(shared)
    finally:
        shared.state().backend.close()


@pytest.mark.parametrize("missing", ["evalsha", "scan", "get", "set"])
def test_acl_user_lacking_a_command_is_told_which(
    acl: Callable[..., str], run_dir: str, missing: str
) -> None:
    """A user without one of the needed commands gets, at first use of it, a
    SharedStateUnavailable naming the command (or the script that runs it) and the
    ACL SETUSER line that grants all the backend needs."""
    namespace = f"acl-{os.path.basename(run_dir)}"
    rules = [r for r in everything_allowed(namespace) if r != "+" + missing]
    shared = acl_app(run_dir, acl("fss-lacking", *rules))
    use = {
        "evalsha": lambda: shared.incr("n"),
        "scan": lambda: len(shared.dict),
        "set": lambda: shared.set("k", 1),  # run only by a Lua script
    }
    try:
        with pytest.raises(SharedStateUnavailable) as info:
            use.get(missing, lambda: shared.get("k"))()
        message = str(info.value)
        named = f"'{missing}'" if missing != "set" else "script"  # Redis names no command
        assert "NOPERM" in message and named in message, message
        assert "ACL SETUSER" in message and "+evalsha" in message, message
        assert "pw-fss-lacking" not in message
    finally:
        shared.state().backend.close()


def test_acl_user_outside_its_keys_is_told(acl: Callable[..., str], run_dir: str) -> None:
    """A user whose key pattern does not cover the namespace is told so, by NOPERM."""
    shared = acl_app(run_dir, acl("fss-keys", "~other:*", *everything_allowed("x")[1:]))
    try:
        with pytest.raises(SharedStateUnavailable, match="NOPERM.*ACL SETUSER"):
            shared.get("k")
    finally:
        shared.state().backend.close()


def documented_acl_line() -> list[str]:
    """The words of the ``ACL SETUSER`` line in docs/redis.md's "ACL users" section."""
    with open(os.path.join(ROOT, "docs", "redis.md"), encoding="utf-8") as file:
        section = file.read().split("## ACL users", 1)[1]
    words = section.split("```", 2)[1].split()
    assert words[:3] == ["ACL", "SETUSER", "app"], words
    return words


def test_the_documented_acl_user_runs_everything_and_the_status_command(
    redis_url: str, run_dir: str
) -> None:
    """The ACL user exactly as docs/redis.md makes it (its name, password and namespace
    put in) runs every kind of operation and ``flask sharedstate status``; the NOPERM
    message grants the same commands as the docs."""
    from flask_sharedstate.backends.redis_client import COMMANDS
    from flask_sharedstate.cli import sharedstate

    namespace = f"acl-{os.path.basename(run_dir)}"
    words = documented_acl_line()
    assert {w for w in words if w.startswith("+")} == {"+" + c for c in COMMANDS.split()}
    mine = {"app": "fss-documented", ">PASSWORD": ">pw-documented"}
    line = [mine.get(w, w.replace("{myapp}", "{" + namespace + "}")) for w in words]
    assert f"~{{{namespace}}}:*" in line, line
    admin = redis_client.Redis.from_url(redis_url)
    shared = None
    try:
        admin.execute_command(*line)
        url = redis_url.replace("redis://", "redis://fss-documented:pw-documented@")
        app = make_app("redis", run_dir, name="documented")
        app.config.update(SHAREDSTATE_REDIS_URL=url, SHAREDSTATE_NAMESPACE=namespace)
        shared = SharedState(app, defaults={"d": 5})
        use_everything(shared)
        shared.set("hits", 3)
        result = app.test_cli_runner().invoke(sharedstate, ["status"])
        assert result.exit_code == 0, result.output
        assert "server:      redis " in result.output, result.output
        assert "NOPERM" not in result.output, result.output
    finally:
        if shared is not None:
            shared.state().backend.close()
        admin.execute_command("ACL", "DELUSER", "fss-documented")
        admin.close()


def test_wrong_password_is_an_authentication_error(acl: Callable[..., str], run_dir: str) -> None:
    """A wrong password: AuthenticationError (a SharedStateUnavailable) that says to
    check the credentials, at once, without the password."""
    url = acl("fss-user", *everything_allowed("x")).replace("pw-fss-user", "not-the-password")
    shared = acl_app(run_dir, url)
    try:
        start = time.monotonic()
        with pytest.raises(AuthenticationError, match="refused the credentials") as info:
            shared.get("k")
        assert time.monotonic() - start < 2.0
        assert "not-the-password" not in str(info.value)
    finally:
        shared.state().backend.close()


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, options, says",
    [
        ("redis://h/0", {"socket_timeout": 30}, "'socket_timeout'.*SHAREDSTATE_TIMEOUT"),
        ("redis://h/0", {"retry_on_timeout": True}, "'retry_on_timeout'.*not be sent again"),
        ("redis://h/0?socket_timeout=30", None, "SHAREDSTATE_REDIS_URL: 'socket_timeout'"),
        ("redis://h/0?health_check_interval=5", None, "'health_check_interval'"),
        ("redis://h/0", {"decode_responses": True}, "'decode_responses'"),
        ("redis://h/0", "ssl_ca_certs=/x", "expected a dict"),
        ("redis://h/0", {"sentinel_kwargs": {}}, "'sentinel_kwargs' is for redis\\+sentinel"),
        ("redis+sentinel://h:1/svc", {"sentinel_kwargs": {"retry": 1}}, "'retry'.*sentinel"),
        ("redis+sentinel://h:1,h:x/svc", None, "'h:x' is not a sentinel"),
        ("redis+sentinel://:secret@h:1", None, "names no service"),
        (
            "redis+cluster://h:1",
            {"ssl_ca_certs": "/ca.pem"},
            "'ssl_ca_certs'.*need rediss\\+cluster",
        ),
        ("redis+cluster://h:1", {"ssl_min_version": 2}, "'ssl_min_version'"),
        ("redis+cluster://h", None, "host:port"),
        ("redis+cl://h:1", None, "redis\\+cluster://host:port"),
        ("rediss://h/0", {"ssl_ca_cert": "/x"}, "'ssl_ca_cert'.*did you mean 'ssl_ca_certs'"),
        ("redis://h/0?ssl_ca_certs=/x", None, "URL: 'ssl_ca_certs'.*need rediss"),
        ("redis+sentinel://h:1/s", {"ssl_certfile": "/x"}, "'ssl_certfile'.*need rediss"),
    ],
)
def test_redis_options_are_checked_at_init_app(url: str, options: Any, says: str) -> None:
    """Options the backend's guarantees rest on are refused by name, in the dict and in
    the URL; a bad Sentinel URL says how to write one; no password is shown."""
    from flask import Flask

    app = Flask("options")
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL=url,
        SHAREDSTATE_REDIS_OPTIONS=options,
        SHAREDSTATE_KEY="k" * 32,
    )
    with pytest.raises(ConfigError, match=says) as info:
        SharedState(app)
    assert "secret" not in str(info.value)


# -- Sentinel ---------------------------------------------------------------------------------

SERVICE = "fss-service"


def start_sentinels(
    folder: str,
    redises: list[subprocess.Popen[bytes]],
    password: str | None = None,
    sentinel_password: str | None = None,
) -> dict[str, Any]:
    """One master, one replica and three sentinels (quorum 2) on loopback ports, each
    sentinel knowing the replica and the two other sentinels. ``password`` is the
    master's and the replica's, ``sentinel_password`` the sentinels' own."""
    master_port, replica_port = free_port(), free_port()
    auth = ["--requirepass", password, "--masterauth", password] if password else []

    def data(port: int) -> Callable[[], Any]:
        return lambda: redis_client.Redis(port=port, password=password, socket_timeout=2)

    def sentinel(port: int, **kwargs: Any) -> Any:
        return redis_client.Redis(port=port, password=sentinel_password, socket_timeout=2, **kwargs)

    master = spawn_redis(
        redises, folder, "master", [*plain_args(master_port, folder), *auth], data(master_port)
    )
    replica_args = [*plain_args(replica_port, folder), *auth]
    replica_args += ["--replicaof", "127.0.0.1", str(master_port)]
    replica = spawn_redis(redises, folder, "replica", replica_args, data(replica_port))
    sentinel_ports = [free_port() for _ in range(3)]
    # Each sentinel is told its own id, the replica and the other sentinels, as a
    # rewritten sentinel.conf would: else they learn them from hello messages and
    # INFO in 4-5 s, which every test would wait for.
    ids = {port: os.urandom(20).hex() for port in sentinel_ports}
    for port in sentinel_ports:
        conf = os.path.join(folder, f"sentinel-{port}.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel myid {ids[port]}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
                f"sentinel known-replica {SERVICE} 127.0.0.1 {replica_port}\n"
            )
            for other in sentinel_ports:
                if other != port:
                    f.write(f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other} {ids[other]}\n")
            if password:
                f.write(f"sentinel auth-pass {SERVICE} {password}\n")
            if sentinel_password:
                f.write(f"requirepass {sentinel_password}\n")
        spawn_redis(
            redises, folder, f"sentinel-{port}", [conf, "--sentinel"], lambda p=port: sentinel(p)
        )

    def ready() -> bool:
        for port in sentinel_ports:
            client = sentinel(port, decode_responses=True)
            try:
                state = client.sentinel_master(SERVICE)
                replicas = client.sentinel_slaves(SERVICE)
            finally:
                client.close()
            if int(state["num-other-sentinels"]) < 2 or not any(
                r["port"] == replica_port and "s_down" not in r["flags"] for r in replicas
            ):
                return False
        return True

    wait_for(ready, timeout=30, interval=0.2)
    replica_client = data(replica_port)()
    try:
        wait_for(
            lambda: replica_client.info("replication")["master_link_status"] == "up", timeout=20
        )
    finally:
        replica_client.close()
    hosts = ",".join(f"127.0.0.1:{p}" for p in sentinel_ports)
    return {
        "hosts": hosts,
        "url": f"redis+sentinel://{hosts}/{SERVICE}",
        "master": master,
        "master_port": master_port,
        "replica": replica,
        "replica_port": replica_port,
        "sentinel_ports": sentinel_ports,
    }


@pytest.fixture
def sentinel_setup(tmp_path: Any, redises: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """A master, a replica and three sentinels, without passwords."""
    return start_sentinels(str(tmp_path), redises)


def test_sentinel_with_passwords_for_the_master_and_the_sentinels(
    tmp_path: Any, redises: list[subprocess.Popen[bytes]], run_dir: str, redis_url: str
) -> None:
    """The URL's password is the master's (and, as in ``limits``, the sentinels');
    sentinel_kwargs gives the sentinels their own. A wrong one says which."""
    s = start_sentinels(str(tmp_path), redises, password="data-pw", sentinel_password="s-pw")

    def app(url: str, options: dict[str, Any] | None) -> SharedState:
        app = make_app("redis", run_dir, name="sentinel-auth", SHAREDSTATE_TIMEOUT=2.0)
        app.config.update(SHAREDSTATE_REDIS_URL=url, SHAREDSTATE_REDIS_OPTIONS=options)
        return SharedState(app, defaults={"d": 5})

    url = f"redis+sentinel://:data-pw@{s['hosts']}/{SERVICE}"
    good = app(url, {"sentinel_kwargs": {"password": "s-pw"}})
    try:
        use_everything(good)
        assert good.get("d") == 5
    finally:
        good.state().backend.close()
    for says, bad_url, sentinel_password in [
        ("A sentinel refused the password", url, "wrong"),
        ("refused the credentials", url.replace("data-pw", "wrong"), "s-pw"),
    ]:
        options = {"sentinel_kwargs": {"password": sentinel_password}}
        bad = app(bad_url, options)
        try:
            start = time.monotonic()
            with pytest.raises(SharedStateUnavailable) as info:
                bad.get("k")
            message = str(info.value)
            assert time.monotonic() - start < 2 * 2.0 + 1
            assert "wrong" not in message.replace("WRONGPASS", ""), message
            assert len(message) < 1000, message  # readable, not a dump of clients
            assert says in message, message
        finally:
            bad.state().backend.close()


def master_port_now(sentinel_ports: list[int]) -> int | None:
    """The master's port as the first sentinel that answers says, or None."""
    for port in sentinel_ports:
        client = redis_client.Redis(port=port, socket_timeout=1)
        try:
            return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])
        except redis_client.RedisError:
            continue
        finally:
            client.close()
    return None


def test_sentinel_failover_under_gunicorn_load(
    servers: list[Server], run_dir: str, sentinel_setup: dict[str, Any]
) -> None:
    """The master SIGKILLed under load from gunicorn -w 4 on redis+sentinel://: requests
    answer 503 (never hang) only around the failover, then 200 from the promoted replica,
    with the same workers; the counter's losses are those of asynchronous replication."""
    s = sentinel_setup
    timeout = 1.0
    env = {
        "FLASK_SHAREDSTATE_BACKEND": "redis",
        "FLASK_SHAREDSTATE_REDIS_URL": s["url"],
        "FLASK_SHAREDSTATE_NAMESPACE": "failover",
        "FLASK_SHAREDSTATE_TIMEOUT": str(timeout),
        "FLASK_SHAREDSTATE_KEY": "test-key-for-signing-values",
    }
    server = start_gunicorn(run_dir, "-w", "4", "--timeout", "60", env=env, name="sentinel")
    servers.append(server)
    assert server.get("/").status == 200
    workers = sorted(server.children())
    times: dict[str, float] = {}

    def fault(progress: LoadProgress) -> None:
        progress.wait(lambda rs: sum(r.status == 200 for r in rs) >= 200, "200 successes")
        times["kill"] = time.monotonic()
        s["master"].send_signal(signal.SIGKILL)
        s["master"].wait(10)
        wait_for(
            lambda: master_port_now(s["sentinel_ports"]) == s["replica_port"],
            timeout=30,
            interval=0.05,
        )
        times["promoted"] = time.monotonic()
        progress.wait(
            lambda rs: sum(r.status == 200 and r.started > times["promoted"] for r in rs) >= 200,
            "200 successes after the failover",
        )

    responses = server.load_during("GET", "/", fault, concurrency=8, seconds=90)
    kill, promoted = times["kill"], times["promoted"]
    ok = [r for r in responses if r.status == 200]
    failed = [r for r in responses if r.status != 200]
    # The kill happened during the load: successes before it and after the promotion.
    assert any(r.ended < kill for r in ok) and any(r.started > promoted for r in ok)
    assert {r.status for r in failed} <= {503}, {(r.status, r.error) for r in failed}
    assert failed, "no request failed: was the master really killed under load?"
    # Never a hang: each request answered within a few timeouts.
    slowest = max(r.seconds for r in responses)
    assert slowest < 4 * timeout + 2, slowest
    # Failures only between the kill and the promotion (plus requests then in flight).
    assert min(r.started for r in failed) >= kill - (4 * timeout + 2)
    assert max(r.ended for r in failed) <= promoted + 4 * timeout + 2
    assert sorted(server.children()) == workers  # no worker was restarted
    # Acknowledged increments (and the first request's) against the counter on the new master.
    final = int(redis_client.Redis(port=s["replica_port"]).get("{failover}:k:hits") or 0)
    acknowledged = [1] + [int(r.body) for r in ok]
    duplicated = len(acknowledged) - len(set(acknowledged))
    print(
        f"failover: {len(acknowledged)} acknowledged, {len(failed)} refused (503), final"
        f" counter {final}, {duplicated} values acknowledged twice (increments the replica"
        f" had not received), 503s for {max(r.ended for r in failed) - kill:.2f}s after the"
        f" kill, promotion {promoted - kill:.2f}s after it, slowest answer {slowest:.2f}s"
    )
    # Nothing was applied that no request asked for; what an asynchronous replica may
    # lose is the increments acknowledged just before the kill that it had not received
    # (their values are then handed out again).
    assert final <= len(acknowledged) + len(failed)
    assert final >= max(acknowledged) >= len(set(acknowledged))


def test_sentinel_pool_waits_for_a_connection(
    sentinel_setup: dict[str, Any], run_dir: str, redis_url: str
) -> None:
    """Over Sentinel with max_connections=1 and the one connection lent, a write waits
    for it and goes through once it is back; kept past SHAREDSTATE_TIMEOUT, the write
    fails saying the pool was in use and that it was not sent."""
    app = make_app("redis", run_dir, name="sentinel-pool", SHAREDSTATE_TIMEOUT=3.0)
    app.config.update(
        SHAREDSTATE_REDIS_URL=sentinel_setup["url"],
        SHAREDSTATE_REDIS_OPTIONS={"max_connections": 1},
    )
    shared = SharedState(app)
    pool = shared.state().backend.client.connection_pool  # type: ignore[attr-defined]

    def lend() -> Any:  # redis-py's public pool API (the command's name before 5.3)
        return pool.get_connection("GET") if redis_version() < (5, 3) else pool.get_connection()

    try:
        with app.app_context():
            shared.set("k", "v")
            done: list[bool] = []

            def writer() -> None:
                with app.app_context():
                    shared.set("k", "w")
                    done.append(True)

            held = lend()
            thread = threading.Thread(target=writer)
            try:
                thread.start()
                time.sleep(1.0)
                assert not done  # it waits for the one connection
            finally:
                pool.release(held)
                thread.join(30)
            assert done == [True]
            assert shared.get("k") == "w"
            held = lend()
            try:
                with pytest.raises(SharedStateUnavailable) as full:
                    shared.set("k", "x")
            finally:
                pool.release(held)
            assert "pool was in use" in str(full.value), full.value
            assert "was not sent" in str(full.value), full.value
            assert shared.get("k") == "w"
    finally:
        shared.state().backend.close()
