"""Adversarial probes of the redis backend's direct path, per-block claims and URLs.

Real redis-servers on loopback (the session's one, or one of the test's own),
real signals; each test stops what it starts, whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis as redis_client

from flask_sharedstate import ConfigError, LockTimeout, SharedState, SharedStateUnavailable
from flask_sharedstate.backends.redis_client import redact, redis_version

from conftest import free_port, make_app, start_redis, stop_process


def test_odd_keys_values_and_a_unicode_namespace_read_as_redis_py_reads_them(
    redis_url: str, run_dir: str
) -> None:
    """The direct path's GET and EVALSHA frame keys with CRLF, $ and * in them, non-ASCII
    text, empty and large values and big or negative ints exactly as execute_command
    does: each value written reads back, and sits under the key redis-py would name."""
    app = make_app("redis", run_dir, SHAREDSTATE_NAMESPACE="ns-é☃-" + os.path.basename(run_dir))
    shared = SharedState(app)
    values: dict[str, Any] = {
        "a\r\nb": "x",
        "$3\r\nGET": b"",
        "*2\r\n$3": "",
        "é☃\U0001f600": "é☃" * 1000,
        "big": 2**63 - 1,
        "neg": -(2**63),
        "huger": 2**70,  # (a pickle, not a Redis integer)
        "float": -1.5e300,
        "bytes": bytes(range(256)) * 4000,  # about 1 MB
        "": "empty key",
    }
    with app.app_context():
        for key, value in values.items():
            shared.set(key, value)
        for key, value in values.items():
            assert shared.get(key) == value, key
        assert shared.incr("neg", -0) == -(2**63)
        backend: Any = shared.state().backend
        prefix = backend._prefix
    plain = redis_client.Redis.from_url(redis_url)
    try:
        for key in values:  # the same key names as execute_command packs them
            assert plain.exists(prefix + key) == 1, key
    finally:
        plain.close()


def test_an_interrupt_between_a_get_and_its_reply_leaves_no_reply_for_the_next(
    redis_url: str, run_dir: str
) -> None:
    """A KeyboardInterrupt (a signal's handler) while a get waits for its reply
    drops that connection: after Redis answers again, the next get of another key
    reads its own value, not the interrupted one's."""
    port = free_port()
    proc = start_redis(port, run_dir)
    app = make_app("redis", run_dir, SHAREDSTATE_TIMEOUT=30.0)
    app.config["SHAREDSTATE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    shared = SharedState(app)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with app.app_context():
            shared.set("first", "first value")
            shared.set("second", "second value")
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.5)
                with pytest.raises(KeyboardInterrupt):
                    shared.get("first")  # sent; its reply comes after the interrupt
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                os.kill(proc.pid, signal.SIGCONT)
            for _ in range(5):
                assert shared.get("second") == "second value"
            assert shared.get("first") == "first value"
    finally:
        signal.signal(signal.SIGALRM, previous)
        stop_process(proc)


def test_a_block_whose_first_read_timed_out_does_not_take_the_open_blocks_abort(
    redis_url: str, run_dir: str
) -> None:
    """Two asyncio tasks of one thread: the first holds an atomic block open, the
    second's block waits for it and times out (LockTimeout); then the first block
    raises, and its abort drops its own claims at once (before: the abort went to
    the second block's token, and the first block's claims stayed until the lease)."""
    app = make_app("redis", run_dir, SHAREDSTATE_LEASE=30.0)
    shared = SharedState(app)

    class Boom(Exception):
        pass

    async def first(opened: asyncio.Event, second_done: asyncio.Event) -> None:
        with shared.atomic(timeout=5):
            shared.dict.get("a")
            opened.set()
            await second_done.wait()
            raise Boom

    async def second(opened: asyncio.Event, second_done: asyncio.Event) -> None:
        await opened.wait()
        try:
            with pytest.raises(LockTimeout), shared.atomic(timeout=0.5):
                shared.dict.get("b")  # waits for the first block (the loop with it)
        finally:
            second_done.set()

    async def main() -> None:
        opened, second_done = asyncio.Event(), asyncio.Event()
        results = await asyncio.gather(
            first(opened, second_done), second(opened, second_done), return_exceptions=True
        )
        assert isinstance(results[0], Boom), results
        assert results[1] is None, results

    with app.app_context():
        asyncio.run(main())
        backend: Any = shared.state().backend
        plain = redis_client.Redis.from_url(redis_url)
        try:
            # No block holds the namespace's slot: a plain write goes through at once.
            assert plain.hget(backend._txn, "owner") is None
        finally:
            plain.close()
        shared.set("a", 1)  # (SHAREDSTATE_TIMEOUT would raise LockTimeout if claimed)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://s3cr%2Fet@127.0.0.1:{port}",
        "rediss+cluster://s3cr%2Fet@127.0.0.1:{port}",
    ],
)
def test_a_cluster_password_given_alone_is_never_shown(url: str, run_dir: str) -> None:
    """A cluster URL's lone user information is read as the password (redis://secret@host):
    neither redact, a ConfigError, the SharedStateUnavailable of an unreachable
    cluster nor the backend's repr shows it (before: all of them did)."""
    port = free_port()  # nothing listens there
    url = url.format(port=port)
    assert "s3cr" not in redact(url)
    with pytest.raises(ConfigError) as refused:
        SharedState(make_app("redis", run_dir, SHAREDSTATE_REDIS_URL=url + "/0"))
    assert "s3cr" not in str(refused.value)
    app = make_app("redis", run_dir, SHAREDSTATE_REDIS_URL=url, SHAREDSTATE_TIMEOUT=1.0)
    if url.startswith("rediss"):
        app.config["SHAREDSTATE_REDIS_OPTIONS"] = {"ssl_cert_reqs": "none"}
        if redis_version() < (6, 0):  # (refused there: see redis_client.check)
            with pytest.raises(ConfigError, match="needs redis-py 6") as old:
                SharedState(app)
            assert "s3cr" not in str(old.value)
            return
    shared = SharedState(app)
    with app.app_context():
        with pytest.raises(SharedStateUnavailable) as down:
            shared.get("k")
        backend = shared.state().backend
        assert "s3cr" not in str(down.value)
        assert "s3cr" not in repr(backend) + str(getattr(backend, "address", ""))


@pytest.mark.parametrize(
    "url",
    [
        "rediss+cluster://s3cret@n1:6379?ssl_ca_certs=/certs/a@b.pem",
        "rediss://user:s3cret@h:6380/0?ssl_ca_certs=/certs/a@b.pem",
        "rediss+sentinel://:s3cret@s1:1,s2:2/svc?ssl_certfile=/c@d.pem&ssl_keyfile=/k@e.pem",
        "redis://:s3@cret@h:6379/0",
    ],
)
def test_a_password_stays_masked_when_the_query_holds_an_at_sign(
    url: str, redis_url: str, run_dir: str
) -> None:
    """An @ in the query (a certificate's path) does not move where the user information
    ends: the password is masked in redact and in init_app's ConfigError (before: the
    split went to the query's @, and 'rediss+cluster://s3cret@n1:***@b.pem' showed it)."""
    assert "s3" not in redact(url)
    assert "cret" not in redact(url)
    app = make_app("redis", run_dir, SHAREDSTATE_REDIS_URL=url)
    app.config["SHAREDSTATE_REDIS_OPTIONS"] = {"ssl_check_hostnam": True}  # a misspelt name
    with pytest.raises(ConfigError) as refused:
        SharedState(app)
    assert "cret" not in str(refused.value)


def test_tls_cluster_needs_a_redis_py_that_checks_host_names(
    redis_url: str, run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before redis-py 6 its cluster client drops ssl_check_hostname (nodes' names would go
    unchecked): rediss+cluster:// is refused at init_app there, with what to upgrade
    (the installed redis-py is made to say 5.2.1; the refusal reads only its version)."""
    monkeypatch.setattr(redis_client, "__version__", "5.2.1")
    app = make_app("redis", run_dir, SHAREDSTATE_REDIS_URL="rediss+cluster://127.0.0.1:1")
    with pytest.raises(ConfigError, match="needs redis-py 6 or later.*redis>=6"):
        SharedState(app)
    app = make_app(
        "redis", run_dir, name="plain", SHAREDSTATE_REDIS_URL="redis+cluster://127.0.0.1:1"
    )
    SharedState(app)  # a plain cluster has no host names to check


def test_a_moving_window_hit_in_a_block_that_is_gone_leaves_it(
    redis_url: str, run_dir: str
) -> None:
    """A thread whose open block ended without it being told (an exception between the
    block's first read and the caller learning its token): a moving-window hit raises
    AtomicBlockLost once, and the next hit is a block of its own again (before: every
    later hit of that thread joined the dead block and raised AtomicBlockLost)."""
    app = make_app("redis", run_dir, name="gone")
    shared = SharedState(app)
    try:
        backend = shared.state().backend
        session = backend._session()
        session.block = session.begin()  # a block this thread opened and never heard of again
        with pytest.raises(RuntimeError, match="lost its claim"):
            backend.op_window_acquire("w", 5, 60.0, 1, 1000.0)
        assert backend.op_window_acquire("w", 5, 60.0, 1, 1000.0) is True
    finally:
        shared.state().backend.close()


@pytest.mark.parametrize("raw", ["6380#ab", "6380/ab", "6380?ab"])
def test_a_password_with_a_raw_reserved_character_is_refused_not_misread(
    raw: str, redis_url: str, run_dir: str
) -> None:
    """redis://:6380#ab@host:port (a password with an unencoded # / or ?) is refused
    at init_app with how to encode it; before, the URL parsed as host 'localhost',
    port 6380, no password, and the app went to another server than the one named."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    url = f"redis://:{raw}@127.0.0.1:{port}/0"
    app = make_app("redis", run_dir, SHAREDSTATE_REDIS_URL=url)
    with pytest.raises(ConfigError, match="percent-encoded") as refused:
        SharedState(app)
    assert raw not in str(refused.value)


@pytest.mark.parametrize("kind", ["manager", "redis", "redis-cluster"])
def test_a_moving_window_inside_an_open_atomic_block_answers_as_on_the_manager(
    kind: str, request: pytest.FixtureRequest, run_dir: str
) -> None:
    """A moving-window hit (limits' acquire_entry) inside this thread's open atomic
    block answers at once, as on the manager: hits recorded whether the block then
    commits or raises, the limit kept (before, on Redis: the hit waited for the
    thread's own block, SHAREDSTATE_TIMEOUT, then raised LockTimeout)."""
    from flask_sharedstate.limiter import SharedStateStorage

    if kind != "manager":
        request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
    app = make_app(kind, run_dir, SHAREDSTATE_TIMEOUT=3.0)
    shared = SharedState(app)
    storage = SharedStateStorage()

    class Boom(Exception):
        pass

    answers: list[Any] = []
    with app.app_context():
        with shared.atomic():
            shared.dict["other"] = shared.dict.get("other", 0) + 1  # the block's claim
            answers += [storage.acquire_entry("w", 3, 60), storage.acquire_entry("w", 3, 60)]
        with pytest.raises(Boom), shared.atomic():
            shared.dict["other"] = shared.dict.get("other", 0) + 1
            answers += [storage.acquire_entry("w", 3, 60), storage.acquire_entry("w", 3, 60)]
            raise Boom
        answers.append(storage.acquire_entry("w", 3, 60))
        assert answers == [True, True, True, False, False]
        assert storage.get_moving_window("w", 3, 60)[1] == 3
        assert shared.get("other") == 1  # (the block that raised wrote nothing)
        shared.set("other", 5)  # no claim left


def _lend(pool: Any) -> Any:
    """A connection of ``pool``, by redis-py's public API (the command's name before 5.3)."""
    return pool.get_connection("GET") if redis_version() < (5, 3) else pool.get_connection()


def test_a_full_connection_pool_is_waited_for_then_says_so(redis_url: str, run_dir: str) -> None:
    """With SHAREDSTATE_REDIS_OPTIONS max_connections=1 and the one connection lent: a
    write waits for it and goes through once it is back; kept past SHAREDSTATE_TIMEOUT,
    the write fails naming max_connections and saying it was not sent."""
    app = make_app(
        "redis",
        run_dir,
        SHAREDSTATE_TIMEOUT=3.0,
        SHAREDSTATE_REDIS_OPTIONS={"max_connections": 1},
    )
    shared = SharedState(app)
    with app.app_context():
        shared.set("k", "v")
        pool = shared.state().backend.client.connection_pool  # type: ignore[attr-defined]
        held = _lend(pool)  # the only one
        done: list[Any] = []

        def writer() -> None:
            with app.app_context():
                shared.set("k", "w")
                done.append(True)

        thread = threading.Thread(target=writer)
        try:
            thread.start()
            time.sleep(1.0)
            assert not done  # it cannot have been sent: it waits for the connection
        finally:
            pool.release(held)
            thread.join(30)
        assert done == [True]
        assert shared.get("k") == "w"

        held = _lend(pool)
        try:
            began = time.monotonic()
            with pytest.raises(SharedStateUnavailable) as full:
                shared.set("k", "x")
            assert time.monotonic() - began >= 2.0  # it waited (about 3 s), not at once
        finally:
            pool.release(held)
        assert "max_connections" in str(full.value), full.value
        assert "was not sent" in str(full.value), full.value
        assert shared.get("k") == "w"  # (indeed not applied)


@pytest.mark.parametrize("kind", ["manager", "redis"])
def test_a_child_forked_inside_an_atomic_block_cannot_commit_the_parents_block(
    kind: str, request: pytest.FixtureRequest, run_dir: str
) -> None:
    """A process forked inside an open atomic block: the child's commit of the block it
    inherited fails (AtomicBlockLost, nothing written), and the parent's block goes on
    and commits, as on the manager (before, on Redis: the child's commit took the
    parent's claims and wrote, and the parent's commit was AtomicBlockLost)."""
    from flask_sharedstate import AtomicBlockLost

    if kind == "redis":
        request.getfixturevalue("redis_url")
    app = make_app(kind, run_dir, SHAREDSTATE_TIMEOUT=5.0)
    shared = SharedState(app)
    parent = os.getpid()
    pid = -1
    code = 3  # (the child's: 0 refused, 1 committed)
    try:
        with app.app_context():
            shared.set("x", "before")
            try:
                with shared.atomic():
                    assert shared.dict["x"] == "before"
                    pid = os.fork()
                    if pid == 0:
                        shared.dict["x"] = "child"  # then the inherited block commits
                    else:
                        _, status = os.waitpid(pid, 0)
                        shared.dict["x"] = "parent"
            except AtomicBlockLost:
                if os.getpid() == parent:
                    raise
                code = 0
            else:
                code = 1
            if os.getpid() == parent:
                assert os.waitstatus_to_exitcode(status) == 0, "the child's commit went through"
                assert shared.get("x") == "parent"
    finally:
        if os.getpid() != parent:  # pragma: no cover - the child
            os._exit(code)


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        ("redis+sentinel://127.0.0.1:1/m?sentinel_kwargs=x", {}, "SHAREDSTATE_REDIS_OPTIONS"),
        ("redis://127.0.0.1:1/0?sentinel_kwargs=x", {}, "SHAREDSTATE_REDIS_OPTIONS"),
        ("redis+sentinel://127.0.0.1:1/m", {"sentinel_kwargs": {"pasword": "x"}}, "'password'"),
    ],
)
def test_a_misplaced_or_misspelt_sentinel_argument_is_refused_at_init_app(
    url: str, options: dict[str, Any], says: str, redis_url: str, run_dir: str
) -> None:
    """sentinel_kwargs in the URL's query, or a name redis-py does not take inside
    sentinel_kwargs, is a ConfigError at init_app that says what to write (before: a
    bare ValueError or TypeError from redis-py at init_app, or at the first request)."""
    app = make_app("redis", run_dir, SHAREDSTATE_REDIS_URL=url, SHAREDSTATE_REDIS_OPTIONS=options)
    with pytest.raises(ConfigError, match=says):
        SharedState(app)
    for fine in ({"ssl": False}, {"password": "p", "ssl_cert_reqs": "none"}):
        options = {"sentinel_kwargs": fine}
        app = make_app(
            "redis",
            run_dir,
            SHAREDSTATE_REDIS_URL="rediss+sentinel://127.0.0.1:1/m",
            SHAREDSTATE_REDIS_OPTIONS=options,
        )
        SharedState(app)  # (nothing is connected to before the first request)


def test_a_first_read_of_a_value_not_signed_leaves_no_claim(redis_url: str, run_dir: str) -> None:
    """An atomic block whose first read meets a value this app did not sign raises
    ValueError and claims nothing after (before: its claims, the namespace's block slot
    with them, stayed until the lease: the block's abort had no session id to send)."""
    app = make_app("redis", run_dir, SHAREDSTATE_LEASE=30.0)
    shared = SharedState(app)
    with app.app_context():
        backend: Any = shared.state().backend
        plain = redis_client.Redis.from_url(redis_url)
        try:
            plain.set(backend._prefix + "bad", b"\x80not signed")
            with pytest.raises(ValueError, match="not signed"), shared.atomic():
                shared.dict.get("bad")
            assert plain.hget(backend._txn, "owner") is None
        finally:
            plain.close()


GEVENT_APP = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from flask import Flask
from flask_sharedstate import SharedState
app = Flask("g")
app.config.update(SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL=sys.argv[1],
                  SHAREDSTATE_NAMESPACE=sys.argv[2], SHAREDSTATE_KEY="k" * 32,
                  SHAREDSTATE_TIMEOUT=20.0, SHAREDSTATE_LEASE=5.0,
                  SHAREDSTATE_REDIS_OPTIONS={"max_connections": 60})
shared = SharedState(app)
def work():
    with app.app_context():
        for _ in range(10):
            shared.incr("plain")
            with shared.atomic():
                shared.dict["cart"] = shared.dict.get("cart", 0) + 1
                gevent.sleep(0)
            with shared.lock("L"):
                shared.dict["locked"] = shared.dict.get("locked", 0) + 1
                gevent.sleep(0)
gevent.joinall([gevent.spawn(work) for _ in range(50)], timeout=120, raise_error=True)
with app.app_context():
    print(shared.get("plain"), shared.get("cart"), shared.get("locked"))
"""


def test_gevent_greenlets_share_the_pool_and_lose_no_update(redis_url: str, run_dir: str) -> None:
    """Under gevent's monkey patching, 50 greenlets of one process (each its own
    session: thread-locals are greenlet-locals) doing plain increments, atomic blocks
    and locked updates on the direct path lose none of their 500 updates each."""
    pytest.importorskip("gevent")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_APP, redis_url, "gevent-" + os.path.basename(run_dir)],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["500", "500", "500"], done.stdout
