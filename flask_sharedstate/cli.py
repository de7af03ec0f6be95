"""``flask sharedstate``: inspect and manage a running app's shared state.

Registered through the ``flask.commands`` entry point, as Flask documents for
extension commands; nothing imports this module. Every command uses the app's
own configuration and works on the server that is running for it; none
starts one, except ``serve``, which runs it in the foreground (for systemd or
supervisord).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pickle
import signal
import sys
import tempfile
import time
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, ScriptInfo

from .backends.manager import ManagerBackend
from .backends.redis import RedisBackend
from .config import manager_unsupported
from .errors import SharedStateError
from .extension import AppState
from .operations import MISSING, Direct


def _load_app() -> None:
    """Load the app before any command: a ConfigError of its SharedState (a wrong key, or a
    backend this platform lacks) is one line that says what to do, not a traceback."""
    try:
        click.get_current_context().ensure_object(ScriptInfo).load_app()
    except SharedStateError as exc:
        raise click.ClickException(str(exc)) from None


sharedstate = AppGroup(
    "sharedstate", help="Inspect and manage the app's shared state.", callback=_load_app
)

DUMP_FORMAT = "flask-sharedstate"
DUMP_VERSION = 1


def _state() -> AppState:
    try:
        state: AppState = current_app.extensions["sharedstate"]
    except KeyError:
        raise click.ClickException(
            "this app does not use Flask-SharedState: call SharedState(app) or"
            " shared.init_app(app) in the app factory."
        ) from None
    if isinstance(state.backend, ManagerBackend):
        # Work on the running server; never start one from a command.
        state.backend.may_start = False
    return state


def _manager(what: str) -> tuple[AppState, ManagerBackend]:
    state = _state()
    if not isinstance(state.backend, ManagerBackend):
        raise click.ClickException(f"the {state.backend.name!r} backend has no server to {what}")
    return state, state.backend


def _ops() -> Direct:
    return _state().direct


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


def _run(func: Any, *args: Any) -> Any:
    try:
        return func(*args)
    except (SharedStateError, KeyError, TypeError, ValueError) as exc:
        raise _fail(exc) from None


def _show(value: Any) -> str:
    try:
        if _json_safe(value):
            return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        pass
    return repr(value)


def _json_safe(value: Any) -> bool:
    """Whether JSON holds ``value`` exactly (a tuple, set or int dict key would change)."""
    try:
        back = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return False
    return bool(back == value) and _same_shape(back, value)


def _same_shape(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return all(_same_shape(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return all(_same_shape(x, y) for x, y in zip(a, b, strict=True))
    return True


def _echo_read_cache(report: dict[str, Any] | None, size: int) -> None:
    """The workers' read caches: hit rate in total and per worker, as they last reported."""
    if report is None:
        click.echo("read cache:  off (no version table: TCP, or see the server's log)")
        return
    if not size:
        click.echo("read cache:  off in this app (SHAREDSTATE_CLIENT_CACHE = 0)")
    workers = report.get("workers") or {}
    hits = sum(w["hits"] for w in workers.values())
    misses = sum(w["misses"] for w in workers.values())
    if not workers:
        click.echo("read cache:  no worker has reported yet")
        return
    click.echo(
        f"read cache:  {_rate(hits, misses)} hits ({hits} hits, {misses} misses,"
        f" {len(workers)} processes)"
    )
    for pid, counts in sorted(workers.items()):
        click.echo(f"  pid {pid}: {_rate(counts['hits'], counts['misses'])} hits")


def _rate(hits: int, misses: int) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def _redis_info(backend: RedisBackend, namespace: str, timeout: float) -> tuple[Any, str]:
    """INFO of the Redis that holds the namespace, and (on a cluster) which node that is.

    On a cluster that is the master of the namespace's hash slot, not whichever
    node redis-py would ask by default.
    """
    import redis

    from .backends.redis_client import unavailable
    from .backends.redis_cluster import ClusterClient

    client = backend.client
    try:
        if not isinstance(client, ClusterClient):
            return client.info(), ""
        key = "{" + namespace + "}:"
        node = client.get_node_from_key(key)
        where = f", at {node.host}:{node.port} (the master of slot {client.keyslot(key)})"
        return client.info(target_nodes=node), where
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise _fail(unavailable(exc, backend.address, "info", timeout, namespace)) from None


@sharedstate.command()
def status() -> None:
    """Show the server's address, pid, uptime, keys, memory, clients and persistence."""
    state = _state()
    backend = state.backend
    click.echo(f"backend:     {backend.name}")
    click.echo(f"address:     {backend.address}")
    click.echo(f"namespace:   {state.settings.namespace}")
    unsupported = manager_unsupported()
    if unsupported is not None:
        click.echo(
            f"platform:    {unsupported}: 'memory' (one process) and 'redis' work here,"
            " 'manager' does not"
        )
    if not isinstance(backend, (RedisBackend, ManagerBackend)):
        click.echo("server:      none: each process holds its own state")
        click.echo(f"keys:        {_run(_ops().length)} (in this command's own process)")
        return
    if isinstance(backend, RedisBackend):
        info, node = _redis_info(backend, state.settings.namespace, state.settings.timeout)
        click.echo(
            f"server:      redis {info.get('redis_version')}, up {info.get('uptime_in_seconds')}s"
            + node
        )
        click.echo(f"keys:        {_run(_ops().length)}")
        click.echo(f"memory:      {info.get('used_memory_human')}")
        click.echo(f"clients:     {info.get('connected_clients')}")
        click.echo(f"persistence: as Redis is configured (aof_enabled={info.get('aof_enabled')})")
        return
    info = _run(backend.call, "info")
    click.echo(f"server pid:  {info['pid']}")
    click.echo(f"uptime:      {info['uptime']:.0f}s")
    click.echo(f"keys:        {info['keys']}")
    memory = info.get("memory")
    click.echo(f"memory:      {memory / 2**20:.1f} MiB" if memory else "memory:      unknown")
    click.echo(f"clients:     {info['clients']}")
    _echo_read_cache(info.get("read_cache"), state.settings.client_cache)
    persistence = info.get("persistence")
    if persistence is None:
        click.echo("persistence: off (memory only)")
    else:
        ago = time.time() - persistence["last_fsync"]
        click.echo(
            f"persistence: {persistence['path']} ({persistence['size']} bytes, fsync"
            f" {persistence['fsync']}, last fsync {ago:.1f}s ago,"
            f" {persistence['compactions']} compactions)"
        )


@sharedstate.command()
@click.argument("key")
def get(key: str) -> None:
    """Print the value of KEY (as JSON where JSON can hold it)."""
    value = _run(_ops().get, key)
    if value is MISSING:
        raise click.ClickException(f"no key {key!r}")
    click.echo(_show(value))


@sharedstate.command("set")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=float, help="Expire the key after this many seconds.")
def set_(key: str, value: str, ttl: float | None) -> None:
    """Set KEY to VALUE, given as JSON: 42, 1.5, '"text"', '[1, 2]', '{"a": true}'."""
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        raise click.BadParameter(
            f"{value!r} is not JSON; a string needs quotes inside the shell's: '\"{value}\"'",
            param_hint="VALUE",
        ) from None
    _run(_ops().set, key, decoded, ttl)


@sharedstate.command("del")
@click.argument("key")
def delete(key: str) -> None:
    """Delete KEY."""
    if not _run(_ops().delete, key):
        raise click.ClickException(f"no key {key!r}")


@sharedstate.command()
@click.argument("pattern", default="*")
def keys(pattern: str) -> None:
    """List the keys, or those matching PATTERN (shell-style: 'rate:*')."""
    for key in sorted(_run(_ops().keys)):
        if fnmatch.fnmatchcase(key, pattern):
            click.echo(key)


def _collect() -> dict[str, Any]:
    ops = _ops()
    items = dict(_run(ops.items))
    ttls = {}
    for key in items:
        try:
            remaining = ops.ttl(key)
        except KeyError:
            continue  # expired meanwhile
        if remaining is not None:
            ttls[key] = remaining
    return {
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "namespace": _state().settings.namespace,
        "data": items,
        "ttl": ttls,
    }


@sharedstate.command()
@click.argument("file", type=click.Path(dir_okay=False, writable=True), required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "pickle"]),
    default="json",
    show_default=True,
    help="pickle holds any value; JSON is readable and portable.",
)
def dump(file: str | None, fmt: str) -> None:
    """Write every key, value and ttl to FILE (default: standard output)."""
    snapshot = _collect()
    if fmt == "json":
        bad = sorted(k for k, v in snapshot["data"].items() if not _json_safe(v))
        if bad:
            kinds = ", ".join(f"{k!r} ({type(snapshot['data'][k]).__name__})" for k in bad[:5])
            raise click.ClickException(
                f"JSON cannot hold the values of {len(bad)} keys exactly: {kinds}. Use"
                " --format pickle."
            )
        data = json.dumps(snapshot, indent=2, ensure_ascii=False).encode() + b"\n"
    else:
        if file is None and sys.stdout.isatty():
            raise click.ClickException("a pickle dump goes to a FILE, not the terminal")
        data = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
    if file is None:
        click.echo(data, nl=False)  # bytes go to the binary standard output
    else:
        try:
            _write_private(file, data)
        except OSError as exc:
            raise click.ClickException(f"cannot write {file}: {exc.strerror}") from None
        click.echo(f"dumped {len(snapshot['data'])} keys to {file}", err=True)


def _write_private(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once, in a file born 0600 (the state may hold
    secrets) under a name no one can guess (so no planted symlink is followed)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@sharedstate.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def load(file: str) -> None:
    """Set every key of a FILE made by 'dump' (JSON or pickle; only load files you trust)."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        snapshot = json.loads(raw) if raw.lstrip()[:1] == b"{" else pickle.loads(raw)
    except Exception as exc:
        raise click.ClickException(f"{file} is not a dump: {type(exc).__name__}: {exc}") from None
    if not isinstance(snapshot, dict) or snapshot.get("format") != DUMP_FORMAT:
        raise click.ClickException(f"{file} is not a Flask-SharedState dump")
    if snapshot.get("version", 0) > DUMP_VERSION:
        raise click.ClickException(f"{file} was dumped by a newer Flask-SharedState")
    data, ttls = snapshot["data"], snapshot.get("ttl", {})
    ops = _ops()
    _run(ops.set_many, {k: v for k, v in data.items() if k not in ttls})
    for key, remaining in ttls.items():
        _run(ops.set, key, data[key], max(remaining, 0.001))
    click.echo(f"loaded {len(data)} keys from {file}", err=True)


@sharedstate.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear(yes: bool) -> None:
    """Delete every key of the app's namespace."""
    count = _run(_ops().length)
    if not yes:
        click.confirm(f"Delete all {count} keys of {_state().backend.address}?", abort=True)
    _run(_ops().clear)
    click.echo(f"deleted {count} keys", err=True)


@sharedstate.command()
def serve() -> None:
    """Run the state server in the foreground, logging to stderr, until SIGTERM or Ctrl-C."""
    from .server.__main__ import log_to_stderr, parse
    from .server.__main__ import serve as run_server

    state, backend = _manager("serve")
    launcher = backend.launcher
    deadline = time.monotonic() + state.settings.timeout
    key = _run(launcher.key)
    election = contextlib.ExitStack()
    try:
        # Hold the election while checking and binding (so no worker starts a server
        # meanwhile), and let it go once we listen.
        election.enter_context(launcher.election(deadline))
        pid = backend.running_server(key, deadline)
        if pid is not None:
            raise click.ClickException(
                f"a state server (pid {pid}) already runs at {backend.address}"
            )
        launcher.remove_stale_socket()
    except SharedStateError as exc:
        election.close()
        raise click.ClickException(
            f"a state server already runs at {backend.address}: {exc}"
        ) from None
    except BaseException:
        election.close()
        raise
    args = parse(launcher.arguments(owner=None))
    log_to_stderr()
    messages: list[str] = []
    try:
        code = run_server(args, key, messages.append, election.close)
    finally:
        election.close()
    if code != 0:
        if messages == ["in-use"]:  # another server holds the address's pid file
            messages = [f"a state server already runs at {backend.address}"]
        raise click.ClickException(" ".join(messages) or "the server did not start")


@sharedstate.command()
def stop() -> None:
    """Stop the running state server (it saves first, if it persists)."""
    _, backend = _manager("stop")
    pid = _run(backend.call, "info")["pid"]
    backend.close()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            click.echo(f"stopped the state server (pid {pid})", err=True)
            return
        time.sleep(0.02)
    raise click.ClickException(f"the state server (pid {pid}) did not stop within 10s")
