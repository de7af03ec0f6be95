"""The redis backend against a real redis-server: scale-out, outages, configuration.

The conformance suite (test_conformance.py) and the process races
(test_processes.py) run on Redis too; this file holds what only Redis has.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import redis as redis_client

from flask_sharedstate import ConfigError, SharedState, SharedStateUnavailable

from conftest import free_port, make_app, start_redis, stop_process, wait_for
from servers import Server, start_gunicorn


def redis_env(url: str, namespace: str) -> dict[str, str]:
    return {
        "FLASK_SHAREDSTATE_BACKEND": "redis",
        "FLASK_SHAREDSTATE_REDIS_URL": url,
        "FLASK_SHAREDSTATE_NAMESPACE": namespace,
        "FLASK_SHAREDSTATE_TIMEOUT": "1",
    }


def test_two_gunicorn_masters_share_one_counter(
    servers: list[Server], run_dir: str, redis_url: str
) -> None:
    """Two apps in two gunicorn masters (two machines, as far as they know) count
    into one Redis counter, exactly, under concurrent load on both."""
    env = redis_env(redis_url, os.path.basename(run_dir))
    one = start_gunicorn(run_dir, "-w", "3", env=env, name="one")
    servers.append(one)
    two = start_gunicorn(run_dir, "-w", "3", env=env, name="two")
    servers.append(two)
    results: dict[str, list] = {}  # type: ignore[type-arg]

    def load_two() -> None:
        results["two"] = two.load([("GET", "/", None)] * 2500, concurrency=16)

    import threading

    other = threading.Thread(target=load_two)
    other.start()
    results["one"] = one.load([("GET", "/", None)] * 2500, concurrency=16)
    other.join(300)
    assert all(r.status == 200 for r in results["one"] + results["two"])
    assert one.get("/stats").json()["hits"] == 5000
    assert two.get("/stats").json()["hits"] == 5000
    counts = sorted(int(r.body) for r in results["one"] + results["two"])
    assert counts == list(range(1, 5001))  # every increment seen exactly once


@pytest.fixture
def own_redis(tmp_path: object) -> Iterator[dict[str, object]]:
    """A redis-server of this test's own, which the test stops and starts again."""
    port = free_port()
    state: dict[str, object] = {"port": port, "url": f"redis://127.0.0.1:{port}/0"}

    def start() -> None:
        state["proc"] = start_redis(port, str(tmp_path))

    def stop() -> None:
        proc = state["proc"]
        proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait(10)  # type: ignore[attr-defined]

    state["start"], state["stop"] = start, stop
    start()
    yield state
    stop_process(state["proc"])


def test_redis_outage_fails_fast_then_recovers(
    servers: list[Server], run_dir: str, own_redis: dict[str, object]
) -> None:
    """Redis killed under use: requests fail fast with 503 (SharedStateUnavailable);
    once it is back, the same workers serve again, defaults restored."""
    server = start_gunicorn(
        run_dir, "-w", "2", env=redis_env(str(own_redis["url"]), "outage"), name="outage"
    )
    servers.append(server)
    assert server.get("/").status == 200
    assert server.request("POST", "/cart", {"item": "a"}).status == 200
    workers = sorted(server.children())
    own_redis["stop"]()  # type: ignore[operator]
    down = server.load([("GET", "/", None)] * 8, concurrency=4)
    assert {r.status for r in down} == {503}
    assert max(r.seconds for r in down) < 2 * 2 * 1 + 2
    own_redis["start"]()  # type: ignore[operator]
    wait_for(lambda: server.get("/").status == 200, timeout=10)
    assert server.request("POST", "/cart", {"item": "b"}).status == 200  # cart default back
    assert server.get("/cart").json() == {"cart": ["b"]}  # a new, empty Redis
    assert sorted(server.children()) == workers  # no worker was restarted


def test_scan_pages_and_namespaces(run_dir: str, redis_url: str) -> None:
    """len and iteration page through SCAN and see only their own namespace."""
    one = SharedState(make_app("redis", run_dir, name="one"))
    other = SharedState(make_app("redis", run_dir, name="other"))
    try:
        one.set_many({f"k{i}": i for i in range(2500)})
        other.set("k0", "other")
        assert len(one.dict) == 2500
        assert sorted(one.dict, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(2500)]
        assert len(other.dict) == 1 and other.get("k0") == "other"
        one.dict.clear()
        assert len(one.dict) == 0 and other.get("k0") == "other"
    finally:
        one.state().backend.close()
        other.state().backend.close()


def test_values_keep_their_types_in_redis(redis_url: str, run_dir: str) -> None:
    """ints stay INCRBY-able text, floats stay floats after INCRBYFLOAT, others pickles."""
    shared = SharedState(make_app("redis", run_dir, name="types"))
    client = redis_client.Redis.from_url(redis_url)
    try:
        shared.set("i", 41)
        assert shared.incr("i") == 42
        key = next(iter(client.scan_iter(match="*:k:i")))
        assert client.get(key) == b"42"
        assert client.incrby(key, 1) == 43  # plain Redis can work on it too
        shared.set("f", 2.5)
        assert shared.incr("f", 0.5) == 3.0 and type(shared.get("f")) is float
        assert shared.incr("i", 0.5) == 43.5
        shared.set("s", "text")
        with pytest.raises(TypeError, match="'s'"):
            shared.incr("s")
    finally:
        client.close()
        shared.state().backend.close()


def test_redis_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing URL, a bad URL and a missing client library each say what to do,
    and a password never shows in the address."""
    from flask import Flask

    app = Flask("cfg")
    app.config["SHAREDSTATE_BACKEND"] = "redis"
    with pytest.raises(ConfigError, match="SHAREDSTATE_REDIS_URL"):
        SharedState(app)
    app = Flask("cfg")
    app.config.update(
        SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL="redis://u:hunter2@127.0.0.1:1/0"
    )
    app.config["SHAREDSTATE_TIMEOUT"] = 0.5
    shared = SharedState(app)
    with pytest.raises(SharedStateUnavailable) as info:
        shared.incr("k")
    assert "hunter2" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    assert "hunter2" not in repr(app.extensions["sharedstate"].settings)
    monkeypatch.setitem(__import__("sys").modules, "redis", None)
    app = Flask("cfg")
    app.config.update(SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match=r"Flask-SharedState\[redis\]"):
        SharedState(app)
