"""The example app under real gunicorn: exact counts under load, and real faults.

Every test drives real worker processes over HTTP from concurrent clients, with
real signals; every load is bounded in count and time.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import pid_alive, server_pids, sigstop, wait_for
from servers import ROOT, LoadProgress, Server, start_gunicorn

CONF = os.path.join(ROOT, "example_app", "gunicorn.conf.py")


def gunicorn(servers: list[Server], run_dir: str, *args: str, **kwargs: object) -> Server:
    server = start_gunicorn(run_dir, *args, **kwargs)  # type: ignore[arg-type]
    servers.append(server)
    return server


def statuses(responses: list) -> dict[int, int]:  # type: ignore[type-arg]
    counts: dict[int, int] = {}
    for r in responses:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def hits(server: Server) -> int:
    return int(server.get("/stats").json()["hits"])


def test_exact_counts_and_cart(servers: list[Server], run_dir: str) -> None:
    """4 workers, 32 clients, 5,000 counter requests and 500 cart additions:
    the counter is exactly 5,000 and every acknowledged item is in the cart once."""
    server = gunicorn(servers, run_dir, "-c", CONF, "-w", "4")
    items = [f"item-{i}" for i in range(500)]
    requests = [("GET", "/", None)] * 5000 + [("POST", "/cart", {"item": i}) for i in items]
    random.Random(7).shuffle(requests)
    responses = server.load(requests, concurrency=32)
    assert statuses(responses) == {200: 5500}
    assert hits(server) == 5000
    cart = server.get("/cart").json()["cart"]
    assert sorted(cart) == sorted(items)
    # Exact counts only mean something if several processes counted: this load's
    # own responses name the workers that made them.
    assert len({r.worker for r in responses}) >= 2


def test_worker_recycling(servers: list[Server], run_dir: str) -> None:
    """--max-requests 40 with jitter during 3,000 requests: exact, no 5xx, never reset."""
    server = gunicorn(
        servers, run_dir, "-w", "4", "--max-requests", "40", "--max-requests-jitter", "20"
    )
    responses = server.load([("GET", "/", None)] * 3000, concurrency=32)
    assert statuses(responses) == {200: 3000}
    # Each response carries the new count: a reset would repeat small numbers.
    assert sorted(int(r.body) for r in responses) == list(range(1, 3001))
    assert hits(server) == 3000
    assert "Worker failed to boot" not in server.log()
    # A worker restarts after at most 60 requests: 3,000 make at least 46 restarts.
    assert server.log().count("Autorestarting worker") >= 40


def test_sigkilled_workers(servers: list[Server], run_dir: str) -> None:
    """SIGKILL a random worker every 200 ms under load: every acknowledged request is
    counted exactly once, and no worker hangs on a lock a killed one held."""
    server = gunicorn(servers, run_dir, "-w", "4", "--timeout", "10")
    stop = threading.Event()
    killed: list[float] = []

    def kill_workers() -> None:
        rng = random.Random(3)
        deadline = time.monotonic() + 20
        while not stop.wait(0.2) and time.monotonic() < deadline:
            workers = server.children()
            if workers:
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(time.monotonic())
                except ProcessLookupError:
                    pass

    killer = threading.Thread(target=kill_workers)
    killer.start()
    try:
        rids = [str(i) for i in range(3000)]
        responses = server.load([("POST", f"/record/{rid}", None) for rid in rids], 32)
    finally:
        stop.set()
        killer.join(30)
    # The kills came during the load.
    first, last = min(r.started for r in responses), max(r.ended for r in responses)
    assert sum(first < t < last for t in killed) >= 5
    acknowledged = {rid for rid, r in zip(rids, responses, strict=True) if r.status == 200}
    assert len(acknowledged) > 1000
    # 0: the connection of a killed worker's request broke. A 500 would be a
    # LockTimeout: a worker left waiting on a killed worker's atomic block.
    assert set(statuses(responses)) <= {200, 0}, statuses(responses)
    assert not [r.error for r in responses if "timed out" in r.error]  # none hung
    recorded = server.get("/recorded").json()
    assert acknowledged <= set(recorded["ids"])  # every acknowledged request counted
    assert recorded["count"] == len(recorded["ids"])  # and none counted twice
    assert "WORKER TIMEOUT" not in server.log()


def test_timeout_kill_inside_atomic(servers: list[Server], run_dir: str) -> None:
    """A worker killed by gunicorn's --timeout inside an atomic block: the others take
    the block at once, and none of the killed block's writes is visible."""
    server = gunicorn(
        servers,
        run_dir,
        *("-w", "2", "--timeout", "2", "--graceful-timeout", "1"),
        env={"FLASK_SHAREDSTATE_TIMEOUT": "10"},
    )
    assert server.request("POST", "/cart", {"item": "before"}).status == 200
    slow = server.get("/slow-atomic?seconds=60", timeout=60)
    assert slow.status in (0, 500, 502)  # the worker was killed mid-request
    assert "WORKER TIMEOUT" in server.log()
    after = server.request("POST", "/cart", {"item": "after"}, timeout=30)
    # Had the killed block kept its claim, this block would have waited 10 s
    # (SHAREDSTATE_TIMEOUT) and failed with LockTimeout (500).
    assert after.status == 200
    assert after.seconds < 5
    assert server.get("/cart").json()["cart"] == ["before", "after"]
    assert server.get("/key/partial").json() == {"partial": None}


def test_state_server_killed_under_load(servers: list[Server], run_dir: str) -> None:
    """SIGKILL the persistent state server while 16 clients count: every request gets
    200 or a quick 503 (none hangs), a new server serves the rest of the same load,
    and every acknowledged increment is counted, none twice."""
    timeout = 2.0
    env = {
        "FLASK_SHAREDSTATE_TIMEOUT": str(timeout),
        "FLASK_SHAREDSTATE_PERSIST_PATH": os.path.join(run_dir, "state.journal"),
    }
    server = gunicorn(servers, run_dir, "-w", "4", "--timeout", "60", env=env)
    first = server.get("/")
    assert (first.status, first.body) == (200, b"1\n")
    (old,) = server_pids(run_dir)
    killed_at: list[float] = []

    def kill_server(load: LoadProgress) -> None:
        load.wait(lambda done: len(done) >= 300, "300 requests before the kill")
        os.kill(old, signal.SIGKILL)
        killed_at.append(time.monotonic())
        load.wait(
            lambda done: sum(r.status == 200 and r.started > killed_at[0] for r in done) >= 300,
            "300 requests served after the kill",
        )

    responses = server.load_during("GET", "/", kill_server, concurrency=16)
    (kill,) = killed_at
    ok = [r for r in responses if r.status == 200]
    unavailable = [r for r in responses if r.status == 503]
    print(f"{len(responses)} requests, {len(unavailable)} got 503")
    # The kill fell inside the load: requests were answered before it and after it.
    assert any(r.ended < kill for r in ok)
    assert any(r.started > kill for r in ok)
    assert statuses(responses).keys() <= {200, 503}, statuses(responses)
    assert all(b"shared state unavailable" in r.body for r in unavailable)
    # None hung: an operation waits at most the connect (1 x timeout) plus the
    # reply (2 x); a request may also queue behind up to 3 others in its worker.
    assert max(r.seconds for r in responses) < 4 * 3 * timeout
    assert "WORKER TIMEOUT" not in server.log()
    # The old server is gone and one new one serves.
    assert not pid_alive(old)
    (new,) = server_pids(run_dir)
    assert new != old
    # Every acknowledged increment is counted once; a 503 may or may not have been
    # applied (its reply was lost), so it can add at most one each.
    values = [1] + [int(r.body) for r in ok]
    assert len(set(values)) == len(values)  # no count handed out twice: no reset
    total = hits(server)
    assert len(values) <= total <= len(values) + len(unavailable)
    assert max(values) <= total


def test_hup_reload_keeps_state(servers: list[Server], run_dir: str) -> None:
    """kill -HUP the master while 32 clients count: old and new workers both answer
    during the load, the state server stays, and the count is exact."""
    server = gunicorn(servers, run_dir, "-c", CONF, "-w", "4")
    (state_server,) = server_pids(run_dir)
    old_workers = set(wait_for(lambda: len(w := server.children()) == 4 and w))
    hup_at: list[float] = []

    def reload(load: LoadProgress) -> None:
        load.wait(lambda done: len(done) >= 300, "300 requests before the HUP")
        os.kill(server.pid, signal.SIGHUP)
        hup_at.append(time.monotonic())
        load.wait(
            lambda done: sum(r.worker not in old_workers for r in done) >= 300,
            "300 requests answered by the new workers",
        )

    responses = server.load_during("GET", "/", reload, concurrency=32)
    (hup,) = hup_at
    assert statuses(responses) == {200: len(responses)}
    # The HUP fell inside the load: old workers answered before it, new ones after.
    assert any(r.ended < hup and r.worker in old_workers for r in responses)
    assert any(r.started > hup and r.worker not in old_workers for r in responses)
    # Each response carries the new count: exact, no reset, none counted twice.
    assert sorted(int(r.body) for r in responses) == list(range(1, len(responses) + 1))
    wait_for(lambda: not (set(server.children()) & old_workers), timeout=30)
    assert server_pids(run_dir) == [state_server]
    assert hits(server) == len(responses)


@pytest.mark.parametrize(
    ("sig", "hooks"),
    [
        (signal.SIGTERM, True),
        (signal.SIGTERM, False),
        (signal.SIGINT, True),
        (signal.SIGQUIT, False),
        (signal.SIGKILL, True),
        (signal.SIGKILL, False),
    ],
)
def test_no_state_server_outlives_gunicorn(
    servers: list[Server], run_dir: str, sig: int, hooks: bool
) -> None:
    """However gunicorn stops, the state server it used is gone within five seconds."""
    args = ["-c", CONF] if hooks else []
    # A short --timeout makes orphaned workers notice a SIGKILLed master sooner.
    server = gunicorn(servers, run_dir, *args, "-w", "2", "--timeout", "4")
    assert server.get("/").status == 200
    (state_server,) = server_pids(run_dir)
    workers = server.children()
    server.stop(sig)
    start = time.monotonic()
    wait_for(lambda: not pid_alive(state_server), timeout=5)
    assert time.monotonic() - start < 5
    if sig == signal.SIGKILL:  # orphaned workers notice their master is gone
        for worker in workers:
            wait_for(lambda worker=worker: not pid_alive(worker), timeout=30)
    assert not os.path.exists(os.path.join(run_dir, "state.sock"))


def test_hooks_start_the_server_in_the_masters_name(servers: list[Server], run_dir: str) -> None:
    """With the hooks, the server runs before any request, owned by the master."""
    server = gunicorn(servers, run_dir, "-c", CONF, "-w", "2")
    (state_server,) = server_pids(run_dir)
    with open(f"/proc/{state_server}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert cmdline[cmdline.index(b"--owner-pid") + 1] == str(server.pid).encode()
    assert hits(server) == 0  # defaults applied by the hook


def test_startup_stampede(servers: list[Server], run_dir: str) -> None:
    """-w 16, cold: all 16 workers make their first use of the state at the same
    instant; one server starts, every worker counts into it, no error."""
    race_dir = os.path.join(run_dir, "race")
    os.mkdir(race_dir)
    gate_path = os.path.join(race_dir, "gate")
    env = {"FSS_RACE_DIR": race_dir}
    # --timeout: a worker waits at the gate until all 16 have arrived.
    server = gunicorn(servers, run_dir, "-w", "16", "--timeout", "120", env=env)
    wait_for(lambda: len(server.children()) == 16, timeout=60)
    assert server_pids(run_dir) == []  # cold: no worker has used the state yet
    with open(gate_path, "wb") as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(server.get, "/race", timeout=120) for _ in range(16)]
            # A worker waiting at the gate takes no other request: 16 arrive only
            # when each of the 16 requests is in a different worker.
            wait_for(
                lambda: sum(n.startswith("arrived-") for n in os.listdir(race_dir)) == 16,
                timeout=60,
            )
            assert server_pids(run_dir) == []  # nobody has used the state yet
            fcntl.flock(gate, fcntl.LOCK_UN)  # open the gate: 16 first uses at once
            responses = [f.result(timeout=150) for f in futures]
    assert statuses(responses) == {200: 16}, [r.body for r in responses]
    answers = [r.json() for r in responses]
    assert len({r.worker for r in responses}) == 16
    # They raced: every worker started its first use before any first use ended,
    # i.e. while no server was running yet for any of them.
    first_end = min(a["ended"] for a in answers)
    last_start = max(a["started"] for a in answers)
    print(f"the first of 16 first uses ended {first_end - last_start:.3f}s after the last began")
    assert all(a["started"] < first_end for a in answers), sorted(
        round(a["started"] - first_end, 4) for a in answers
    )
    # One server, one state: it counted each worker once, and it is the one running.
    assert sorted(a["racers"] for a in answers) == list(range(1, 17))
    (state_server,) = server_pids(run_dir)
    assert {a["server"] for a in answers} == {state_server}


def test_flags_are_seen_by_every_worker(servers: list[Server], run_dir: str) -> None:
    """A flag set through one worker changes what every worker answers."""
    server = gunicorn(servers, run_dir, "-c", CONF, "-w", "4")
    before = server.load([("GET", "/hello", None)] * 40, concurrency=8)
    assert all(r.body.startswith(b"hello") for r in before)
    assert server.request("PUT", "/flags/shout", True).json() == {"shout": True}
    answers: set[bytes] = set()
    for _ in range(20):  # until several workers have answered (one may take a whole batch)
        after = server.load([("GET", "/hello", None)] * 40, concurrency=16)
        assert all(r.body.startswith(b"HELLO") for r in after)
        answers |= {r.body for r in after}
        if len(answers) >= 3:
            break
    assert len(answers) >= 3


def test_rate_limit_across_workers(servers: list[Server], run_dir: str) -> None:
    """The per-client limit holds across workers: exactly RATE_LIMIT requests pass."""
    server = gunicorn(servers, run_dir, "-w", "4", env={"FLASK_RATE_LIMIT": "25"})
    requests = [("GET", "/api/quote", None)] * 60
    responses = server.load(requests, concurrency=16)
    assert statuses(responses) == {200: 25, 429: 35}


def test_stopped_state_server_fails_fast_then_recovers(servers: list[Server], run_dir: str) -> None:
    """A state server that stops answering (SIGSTOP) turns requests into quick 503s,
    never hung workers; once it answers again, so does the app."""
    server = gunicorn(
        servers, run_dir, "-w", "4", "--timeout", "30", env={"FLASK_SHAREDSTATE_TIMEOUT": "1"}
    )
    assert server.get("/").status == 200
    (state_server,) = server_pids(run_dir)
    sigstop(state_server)
    try:
        responses = server.load([("GET", "/", None)] * 4, concurrency=4)
    finally:
        os.kill(state_server, signal.SIGCONT)
    assert statuses(responses) == {503: 4}
    # A reply waits at most 2 x SHAREDSTATE_TIMEOUT (1 s), a reconnect 1 x; a
    # worker that got two of the four requests answers the second after both.
    # Hung workers would wait for gunicorn's --timeout (30 s).
    assert max(r.seconds for r in responses) < 2 * (2 + 1) * 1 + 4
    wait_for(lambda: server.get("/").status == 200, timeout=30)
    assert statuses(server.load([("GET", "/", None)] * 100, concurrency=16)) == {200: 100}
    assert "WORKER TIMEOUT" not in server.log()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-k", "gthread", "--threads", "4"], id="gthread"),
        pytest.param(["--preload"], id="preload"),
        pytest.param(["-k", "gevent", "--worker-connections", "50"], id="gevent"),
    ],
)
def test_worker_types(servers: list[Server], run_dir: str, args: list[str]) -> None:
    """Threaded, preloaded and gevent workers count exactly and keep the cart whole."""
    server = gunicorn(servers, run_dir, "-w", "4", *args)
    items = [f"item-{i}" for i in range(200)]
    requests = [("GET", "/", None)] * 2000 + [("POST", "/cart", {"item": i}) for i in items]
    random.Random(11).shuffle(requests)
    responses = server.load(requests, concurrency=32)
    assert statuses(responses) == {200: 2200}
    assert hits(server) == 2000
    assert sorted(server.get("/cart").json()["cart"]) == sorted(items)
    assert len(server_pids(run_dir)) == 1
