"""The redis backend on Redis Cluster: what only a cluster has (slots that move).

The conformance suite, the Hypothesis model and the process races run on the
cluster too (the ``redis-cluster`` variant of the backend fixtures). Here: the
namespace's hash slot migrated to another master under a running app, the
migration window itself (ASK and TRYAGAIN), and the URL.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_client

from flask_sharedstate import ConfigError, SharedState, SharedStateUnavailable
from flask_sharedstate.backends.redis_cluster import parse_url

from conftest import cluster_ports, cluster_procs, free_port, make_app, sigstop, time_unanswered


class Cluster:
    """Direct clients of each node, to look at and move slots as an operator would."""

    def __init__(self, ports: list[int]) -> None:
        self.nodes = {port: redis_client.Redis(port=port) for port in ports}
        self.ids = {
            port: node.execute_command("CLUSTER", "MYID").decode()
            for port, node in self.nodes.items()
        }

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()

    def slot_of(self, namespace: str) -> int:
        node = next(iter(self.nodes.values()))
        return int(node.execute_command("CLUSTER", "KEYSLOT", "{" + namespace + "}:k:x"))

    def owner(self, slot: int) -> int:
        """The port of the master that owns ``slot``, as every node agrees."""
        owners = set()
        for node in self.nodes.values():
            for start, end, master, *_ in node.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    owners.add(int(master[1]))
        assert len(owners) == 1, f"the nodes disagree on slot {slot}: {owners}"
        return owners.pop()

    def errors(self, port: int, kind: str) -> int:
        """How many ``kind`` (MOVED, ASK, TRYAGAIN) error replies the node has sent."""
        stats = self.nodes[port].info("errorstats").get(f"errorstat_{kind}", {})
        if isinstance(stats, str):  # redis-py before 5.1: "count=N" unparsed
            stats = dict(item.split("=", 1) for item in stats.split(","))
        return int(stats.get("count", 0))

    def open_window(self, slot: int, source: int, target: int) -> None:
        """Start migrating ``slot``: IMPORTING on the target, MIGRATING on the source."""
        self.nodes[target].execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source]
        )
        self.nodes[source].execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[target]
        )

    def move_keys(self, slot: int, source: int, target: int, count: int = 1000) -> list[bytes]:
        """MIGRATE up to ``count`` of the slot's keys from source to target."""
        keys: list[bytes] = self.nodes[source].execute_command(
            "CLUSTER", "GETKEYSINSLOT", slot, count
        )
        if keys:
            self.nodes[source].execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 10000, "KEYS", *keys
            )
        return keys

    def close_window(self, slot: int, target: int) -> None:
        """Give the slot to the target, on every master (the target first)."""
        order = [target, *[p for p in self.nodes if p != target]]
        for port in order:
            self.nodes[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[target])

    def migrate(self, slot: int, target: int) -> None:
        """Move ``slot`` and all its keys to ``target`` (what redis-cli --cluster reshard does)."""
        source = self.owner(slot)
        self.open_window(slot, source, target)
        while self.move_keys(slot, source, target):
            pass
        self.close_window(slot, target)


@pytest.fixture
def cluster(redis_cluster_url: str) -> Iterator[Cluster]:
    nodes = Cluster(list(cluster_ports))
    yield nodes
    nodes.close()


@pytest.fixture
def app_on_cluster(redis_cluster_url: str, run_dir: str) -> Iterator[tuple[Any, SharedState]]:
    # A long timeout: a write waits out a migration window for up to this long.
    app = make_app("redis-cluster", run_dir, name="moving", SHAREDSTATE_TIMEOUT=10.0)
    shared = SharedState(app, defaults={"visits": 0})
    yield app, shared
    shared.state().backend.close()


def test_slot_migration_is_followed_and_loses_nothing(
    cluster: Cluster, app_on_cluster: tuple[Any, SharedState]
) -> None:
    """The namespace's slot moved to another master under a running app: reads,
    writes, a held lock and an open atomic block all carry on (MOVED followed), and
    every value is still there."""
    app, shared = app_on_cluster
    namespace = app.config["SHAREDSTATE_NAMESPACE"]
    slot = cluster.slot_of(namespace)
    source = cluster.owner(slot)
    target = next(p for p in cluster.nodes if p != source)
    shared.set_many({"cart": ["a"], "n": 41, "f": 0.5})
    shared.incr("visits")
    lock = shared.lock("job")
    assert lock.acquire(timeout=1)
    block = shared.atomic(timeout=3)
    block.__enter__()
    shared.dict["cart"].append("b")  # read (claimed) before the move, written after
    moved_before = cluster.errors(source, "MOVED")

    cluster.migrate(slot, target)

    assert cluster.owner(slot) == target
    assert cluster.nodes[target].exists("{" + namespace + "}:k:n")
    block.__exit__(None, None, None)  # the commit follows the slot
    assert shared.get("cart") == ["a", "b"]
    assert shared.incr("n") == 42
    assert shared.get("f") == 0.5 and shared.get("visits") == 1
    assert lock.locked()
    other: list[bool] = []

    def try_lock() -> None:
        with app.app_context():
            other.append(shared.lock("job").acquire(blocking=False))

    thread = threading.Thread(target=try_lock)
    thread.start()
    thread.join(20)
    assert other == [False]  # still held by its owner, for another thread
    lock.release()
    with shared.lock("job"):
        shared.set("after", True)
    with shared.atomic(timeout=3):
        shared.dict["n"] += 1
    assert sorted(shared.dict) == ["after", "cart", "f", "n", "visits"]
    assert shared.get("n") == 43
    assert cluster.errors(source, "MOVED") > moved_before  # the old master redirected us


def test_writes_wait_out_the_migration_window(
    cluster: Cluster, app_on_cluster: tuple[Any, SharedState]
) -> None:
    """While the slot's keys are half moved, one-key reads are served (ASK followed);
    what touches several keys (every write, with the atomic block's key; get_many)
    is refused by Redis (TRYAGAIN: not run) and waits until the migration ends,
    then runs once."""
    app, shared = app_on_cluster
    namespace = app.config["SHAREDSTATE_NAMESPACE"]
    slot = cluster.slot_of(namespace)
    source = cluster.owner(slot)
    target = next(p for p in cluster.nodes if p != source)
    shared.set_many({"a": 1, "b": 2, "n": 0})
    results: dict[str, Any] = {}

    def run(name: str, *args: Any) -> None:
        with app.app_context():
            try:
                results[name] = getattr(shared, name)(*args)
            except BaseException as exc:  # noqa: BLE001 - shown by the assertions below
                results[name] = exc

    threads = [
        threading.Thread(target=run, args=("incr", "n")),
        threading.Thread(target=run, args=("get_many", ["a", "b", "n"])),
    ]
    cluster.open_window(slot, source, target)
    try:
        assert cluster.move_keys(slot, source, target, count=1)  # one key over, the rest not
        asks = cluster.errors(source, "ASK")
        tryagains = cluster.errors(target, "TRYAGAIN")
        assert [shared.get("a"), shared.get("b"), shared.get("n")] == [1, 2, 0]
        assert cluster.errors(source, "ASK") > asks  # the moved key was asked for on the target
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while cluster.errors(target, "TRYAGAIN") < tryagains + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.errors(target, "TRYAGAIN") >= tryagains + 2  # both refused, not run
        time.sleep(1.5)  # past redis-py's own few retries (16 within ~0.5 s)
        assert results == {}  # and both still wait (SHAREDSTATE_TIMEOUT is 10 s)
        while cluster.move_keys(slot, source, target):
            pass
    finally:
        cluster.close_window(slot, target)
    for thread in threads:
        thread.join(20)
    assert results["incr"] == 1
    assert results["get_many"] in ({"a": 1, "b": 2, "n": 0}, {"a": 1, "b": 2, "n": 1})
    assert shared.get_many(["a", "b", "n"]) == {"a": 1, "b": 2, "n": 1}  # the incr ran once


def test_a_window_longer_than_the_timeout_fails_and_applies_nothing(
    cluster: Cluster, redis_cluster_url: str, run_dir: str
) -> None:
    """A write refused (TRYAGAIN) for longer than SHAREDSTATE_TIMEOUT fails with
    SharedStateUnavailable that says why, and was not applied."""
    app = make_app("redis-cluster", run_dir, name="stuck", SHAREDSTATE_TIMEOUT=1.0)
    shared = SharedState(app)
    namespace = app.config["SHAREDSTATE_NAMESPACE"]
    slot = cluster.slot_of(namespace)
    source = cluster.owner(slot)
    target = next(p for p in cluster.nodes if p != source)
    try:
        shared.set_many({"a": 1, "n": 0})
        cluster.open_window(slot, source, target)
        try:
            cluster.move_keys(slot, source, target, count=1)
            with pytest.raises(SharedStateUnavailable, match="being migrated"):
                shared.incr("n")
        finally:
            while cluster.move_keys(slot, source, target):
                pass
            cluster.close_window(slot, target)
        assert shared.get("n") == 0
        assert shared.incr("n") == 1
    finally:
        shared.state().backend.close()


def test_cluster_url_errors() -> None:
    """A malformed redis+cluster:// URL is a ConfigError that shows the right form
    and never the password."""
    from flask import Flask

    for url, expected in [
        ("redis+cluster://", "but '' is not host:port"),
        ("redis+cluster://h1:7000,h2", "but 'h2' is not host:port"),
        ("redis+cluster://h1:7000/1", "with no database, path or options"),
        ("redis+cluster://:s3cret@h1:99999", "but 'h1:99999' is not host:port"),
    ]:
        app = Flask("bad_url")
        app.config.update(
            SHAREDSTATE_BACKEND="redis",
            SHAREDSTATE_REDIS_URL=url,
            SHAREDSTATE_KEY="test-key-for-signing-values",
        )
        with pytest.raises(ConfigError, match=expected) as info:
            SharedState(app)
        assert "s3cret" not in str(info.value)
    app = Flask("good_url")  # a good one touches no network at init_app, shows no password
    app.config.update(
        SHAREDSTATE_BACKEND="redis",
        SHAREDSTATE_REDIS_URL="redis+cluster://user:s3cret@127.0.0.1:1,[::1]:2",
        SHAREDSTATE_KEY="test-key-for-signing-values",
    )
    shared = SharedState(app)
    assert "redis+cluster://user:***@127.0.0.1:1,[::1]:2" in repr(shared)
    assert "s3cret" not in repr(shared)
    assert parse_url("redis+cluster://user:s%40cret@127.0.0.1:1,[::1]:2") == (
        [("127.0.0.1", 1), ("::1", 2)],
        "user",
        "s@cret",
    )
    assert parse_url("redis+cluster://s3cret@h:1") == ([("h", 1)], None, "s3cret")


def test_cluster_takes_the_redis_options(cluster: Cluster, run_dir: str) -> None:
    """SHAREDSTATE_REDIS_OPTIONS reach every node's connections on redis+cluster://
    (here a client name that the slot's master lists)."""
    app = make_app("redis-cluster", run_dir, name="named")
    app.config["SHAREDSTATE_REDIS_OPTIONS"] = {"client_name": "fss-options-test"}
    shared = SharedState(app)
    try:
        shared.set("x", 1)
        assert shared.incr("x") == 2
        master = cluster.owner(cluster.slot_of(app.config["SHAREDSTATE_NAMESPACE"]))
        clients = cluster.nodes[master].execute_command("CLIENT", "LIST")
        text = clients.decode() if isinstance(clients, bytes) else str(clients)
        assert "name=fss-options-test" in text
    finally:
        shared.state().backend.close()


def test_unreachable_cluster_boots_then_fails_fast(redis_cluster_url: str, run_dir: str) -> None:
    """An app whose cluster is down boots, and each operation fails with
    SharedStateUnavailable instead of hanging or crashing init_app."""
    app = make_app("redis-cluster", run_dir, name="down", SHAREDSTATE_TIMEOUT=1.0)
    app.config["SHAREDSTATE_REDIS_URL"] = f"redis+cluster://127.0.0.1:{free_port()}"
    shared = SharedState(app)
    try:
        start = time.monotonic()
        with pytest.raises(SharedStateUnavailable, match="redis\\+cluster://127.0.0.1"):
            shared.get("x")
        with pytest.raises(SharedStateUnavailable):
            shared.set("x", 1)
        assert time.monotonic() - start < 30
    finally:
        shared.state().backend.close()


def test_stopped_master_fails_each_operation_within_the_timeout(
    cluster: Cluster, redis_cluster_url: str, run_dir: str
) -> None:
    """The master of the namespace's slot SIGSTOPped for a moment: reads, writes and a
    first connection raise SharedStateUnavailable after about SHAREDSTATE_TIMEOUT, and
    no write is sent twice."""
    timeout = 1.0
    app = make_app("redis-cluster", run_dir, name="paused", SHAREDSTATE_TIMEOUT=timeout)
    shared = SharedState(app, defaults={"d": 1})
    fresh = SharedState(
        make_app("redis-cluster", run_dir, name="paused", SHAREDSTATE_TIMEOUT=timeout)
    )
    assert shared.incr("n") == 1  # connected
    owner = cluster.owner(cluster.slot_of(app.config["SHAREDSTATE_NAMESPACE"]))
    proc = cluster_procs[owner]
    took: dict[str, float] = {}
    # Stopped for a few seconds only: well under cluster-node-timeout (15 s), so
    # the other masters never mark it failed and the session's cluster stays ok.
    sigstop(proc.pid)
    try:
        time_unanswered(
            [
                ("get", lambda: shared.get("n")),
                ("incr", lambda: shared.incr("n")),
                ("first connection", lambda: fresh.get("n")),
            ],
            took,
        )
    finally:
        proc.send_signal(signal.SIGCONT)
    try:
        assert shared.get("n") in (1, 2)  # the incr ran at most once, when Redis woke
        assert shared.incr("n") in (2, 3)
    finally:
        shared.state().backend.close()
        fresh.state().backend.close()
    assert all(took[name] >= 0.9 * timeout for name in took), took  # it did wait for Redis
    assert all(took[name] < 4 * timeout for name in took), took


def test_slot_moved_back_and_forth_under_load_loses_nothing(
    cluster: Cluster, app_on_cluster: tuple[Any, SharedState]
) -> None:
    """Threads incr and append in atomic blocks while the namespace's slot migrates to
    another master and back, one key at a time: every acknowledged write is there,
    once, and the load did meet MOVED, ASK and TRYAGAIN."""
    app, shared = app_on_cluster
    namespace = app.config["SHAREDSTATE_NAMESPACE"]
    slot = cluster.slot_of(namespace)
    home = cluster.owner(slot)
    away = next(p for p in cluster.nodes if p != home)
    shared.set_many({"n": 0, "items": []})
    before = {
        kind: sum(cluster.errors(p, kind) for p in cluster.nodes)
        for kind in ("MOVED", "ASK", "TRYAGAIN")
    }
    stop = threading.Event()
    acked: dict[str, int] = {}
    failures: list[BaseException] = []

    def incr(name: str) -> None:
        with app.app_context():
            done = 0
            try:
                for _ in range(5000):
                    if stop.is_set():
                        break
                    shared.incr("n")
                    done += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
            acked[name] = done

    def append(name: str) -> None:
        with app.app_context():
            done = 0
            try:
                for i in range(2000):
                    if stop.is_set():
                        break
                    with shared.atomic():
                        shared.dict["items"].append(i)
                    done += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
            acked[name] = done

    threads = [threading.Thread(target=incr, args=(f"incr{i}",)) for i in range(3)]
    threads.append(threading.Thread(target=append, args=("append",)))
    for thread in threads:
        thread.start()
    try:
        for source, target in ((home, away), (away, home)):
            time.sleep(0.5)  # load on the settled slot first
            cluster.open_window(slot, source, target)
            try:
                for _ in range(100):  # a key at a time, the window open a while
                    if not cluster.move_keys(slot, source, target, count=1):
                        break
                    time.sleep(0.2)
            finally:
                while cluster.move_keys(slot, source, target):
                    pass
                cluster.close_window(slot, target)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures
    assert cluster.owner(slot) == home
    assert shared.get("n") == sum(acked[f"incr{i}"] for i in range(3))
    assert len(shared.get("items")) == acked["append"]
    after = {
        kind: sum(cluster.errors(p, kind) for p in cluster.nodes)
        for kind in ("MOVED", "ASK", "TRYAGAIN")
    }
    assert all(after[kind] > before[kind] for kind in after), (before, after)
    assert min(acked.values()) > 0


def test_namespaces_spread_over_the_masters(
    cluster: Cluster, redis_cluster_url: str, run_dir: str
) -> None:
    """One namespace's keys all live on one master; apps with other namespaces can
    live on other masters (how load is spread), and stay apart."""
    owners: dict[int, str] = {}
    for i in range(200):  # names hash evenly: two masters are found in a few tries
        namespace = f"{os.path.basename(run_dir)}-part-{i}"
        owners.setdefault(cluster.owner(cluster.slot_of(namespace)), namespace)
        if len(owners) == 2:
            break
    assert len(owners) == 2
    apps = []
    try:
        for port, namespace in owners.items():
            app = make_app("redis-cluster", run_dir, name=f"spread{port}")
            app.config["SHAREDSTATE_NAMESPACE"] = namespace
            shared = SharedState(app)
            apps.append(shared)
            shared.set_many({f"k{j}": j for j in range(20)})
            with shared.lock("l"), shared.atomic():
                shared.dict["k0"] = namespace
            keys = cluster.nodes[port].keys("{" + namespace + "}:*")
            assert len(keys) == 20  # every value here; the lock and block are gone
            for other in cluster.nodes:
                if other != port:
                    assert cluster.nodes[other].keys("{" + namespace + "}:*") == []
        assert [shared.get("k0") for shared in apps] == list(owners.values())
        assert [len(shared.dict) for shared in apps] == [20, 20]
    finally:
        for shared in apps:
            shared.state().backend.close()
