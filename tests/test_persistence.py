"""SHAREDSTATE_PERSIST_PATH: the journal, crash recovery, damaged files, compaction."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from flask_sharedstate import SharedState, SharedStateUnavailable
from flask_sharedstate.server import persistence
from flask_sharedstate.server.persistence import Journal, PersistenceError
from flask_sharedstate.server.store import Store

import workers
from conftest import pid_alive, server_pids, wait_for
from servers import Server, start_gunicorn


def persistent(run_dir: str, fsync: str = "everysec", **config: object) -> SharedState:
    return workers.make_shared(
        os.path.join(run_dir, "app.sock"),
        SHAREDSTATE_PERSIST_PATH=os.path.join(run_dir, "state.db"),
        SHAREDSTATE_FSYNC=fsync,
        **config,
    )


def kill_server(shared: SharedState) -> int:
    pid = workers.server_pid(shared)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), timeout=10)
    return pid


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the file format ------------------------------------------------------------------


def write_journal(path: str, records: list[tuple[object, ...]]) -> list[int]:
    """Write a journal; return the offset where each record starts."""
    offsets = []
    with open(path, "wb") as f:
        f.write(persistence.header())
        for record in records:
            offsets.append(f.tell())
            f.write(persistence.encode_record(record))
    return offsets


RECORDS = [("put", "ns", f"k{i}", i, None) for i in range(5)] + [("del", "ns", "k0")]


def test_truncated_last_record_restores_everything_before(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal cut at every byte offset of its last record restores all earlier records,
    with a warning, and keeps accepting writes after them."""
    folder = str(tmp_path)
    original = os.path.join(folder, "full.db")
    offsets = write_journal(original, RECORDS)
    data = file_bytes(original)
    last = offsets[-1]
    for cut in range(last, len(data)):
        path = os.path.join(folder, f"cut{cut}.db")
        with open(path, "wb") as f:
            f.write(data[:cut])
        journal = Journal(path, "no")
        store = Store()
        caplog.clear()
        assert store.restore(journal.load()) == 5  # k0..k4: the del was torn off
        if cut > last:
            assert "torn last record" in caplog.text
        journal.append([("put", "ns", "after", 1, None)])
        journal.close()
        records, _, torn = persistence.read_journal(path)
        assert not torn and records == RECORDS[:-1] + [("put", "ns", "after", 1, None)]
        os.unlink(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("corrupt", "damaged at byte"),
        ("foreign", "not a Flask-SharedState persistence file"),
        ("newer", "newer Flask-SharedState"),
        ("globals", "damaged at byte"),
    ],
)
def test_damaged_files_are_refused_and_left_alone(
    tmp_path: object, damage: str, message: str
) -> None:
    """A corrupt record, a foreign file, a newer format or a record that would load a
    global each raise PersistenceError naming the file; the file keeps its bytes."""
    path = os.path.join(str(tmp_path), "state.db")
    offsets = write_journal(path, RECORDS)
    data = bytearray(file_bytes(path))
    if damage == "corrupt":
        data[offsets[2] + 10] ^= 0xFF
    elif damage == "foreign":
        data = bytearray(b"SQLite format 3\x00" + bytes(200))
    elif damage == "newer":
        data[len(persistence.MAGIC) + 1] = persistence.VERSION + 1
    else:
        import pickle
        import struct
        import zlib

        evil = pickle.dumps(("put", "ns", "k", os.system, None))
        record = struct.pack("!II", len(evil), zlib.crc32(evil)) + evil
        data[offsets[1] : offsets[1]] = record
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(PersistenceError, match=message) as info:
        list(Journal(path, "no").load())
    assert path in str(info.value)
    assert file_bytes(path) == bytes(data)


def test_server_refuses_a_damaged_file(run_dir: str) -> None:
    """The app's first use fails with SharedStateUnavailable naming the file and what to
    do; the server does not start and the file is untouched."""
    path = os.path.join(run_dir, "state.db")
    with open(path, "wb") as f:
        f.write(b"this is somebody else's file\n")
    before = file_bytes(path)
    shared = persistent(run_dir)
    with pytest.raises(SharedStateUnavailable, match="not a Flask-SharedState") as info:
        shared.incr("n")
    assert path in str(info.value)
    assert file_bytes(path) == before
    assert server_pids(run_dir) == []


def test_unwritable_path_is_refused(run_dir: str) -> None:
    """A path in a missing folder, or one that is a folder, gives a clear error."""
    missing = workers.make_shared(
        os.path.join(run_dir, "a.sock"),
        SHAREDSTATE_PERSIST_PATH=os.path.join(run_dir, "no", "such", "state.db"),
    )
    with pytest.raises(SharedStateUnavailable, match="does not exist; create it"):
        missing.incr("n")
    os.mkdir(os.path.join(run_dir, "folder.db"))
    folder = workers.make_shared(
        os.path.join(run_dir, "b.sock"),
        SHAREDSTATE_PERSIST_PATH=os.path.join(run_dir, "folder.db"),
    )
    with pytest.raises(SharedStateUnavailable, match="folder.db"):
        folder.incr("n")


# -- recovery ---------------------------------------------------------------------------


def test_state_ttls_and_defaults_survive_a_restart(run_dir: str) -> None:
    """Values, TTLs (as absolute deadlines) and applied defaults survive SIGKILL of the
    server; locks do not; keys that expired while it was down stay gone."""
    shared = persistent(run_dir, SHAREDSTATE_TIMEOUT=5.0)
    shared.state().backend.set_defaults([("gone", 1)])
    shared.set_many({"n": 41, "doc": {"a": [1, 2]}})
    shared.incr("n")
    shared.set("session", "x", ttl=30)
    shared.set("short", "y", ttl=0.3)
    del shared.dict["gone"]
    shared.lock("held").acquire()
    with shared.atomic():
        shared.dict["doc"]["a"].append(3)
    old = kill_server(shared)
    time.sleep(0.4)
    assert shared.get("n") == 42  # a new server, restored from the file
    assert workers.server_pid(shared) != old
    assert shared.get("doc") == {"a": [1, 2, 3]}
    remaining = shared.ttl("session")
    assert remaining is not None and 25 < remaining < 30
    assert "short" not in shared.dict
    assert "gone" not in shared.dict  # a deleted default is not set again
    assert not shared.lock("held").locked()
    shared.state().backend.close()


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_acknowledged_writes_survive_sigkill(run_dir: str, fsync: str) -> None:
    """A writer doing acknowledged incr and set while the server is SIGKILLed at random
    moments, many rounds: nothing acknowledged is lost (everysec: within its bound)."""
    shared = persistent(run_dir, fsync, SHAREDSTATE_TIMEOUT=5.0)
    rng = random.Random(fsync)
    acknowledged = 0
    sets: dict[str, int] = {}
    worst_loss = 0
    for _round in range(8):
        pid = workers.server_pid(shared)
        killed = threading.Event()

        def kill_later(pid: int = pid, killed: threading.Event = killed) -> None:
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(pid, signal.SIGKILL)
            killed.set()

        killer = threading.Thread(target=kill_later)
        killer.start()
        deadline = time.monotonic() + 10
        while not killed.is_set() and time.monotonic() < deadline:
            try:
                acknowledged = shared.incr("n")
                key = f"k{acknowledged % 50}"
                shared.set(key, acknowledged)
                sets[key] = acknowledged
            except SharedStateUnavailable:
                break  # the request was in flight when the server died
        killer.join(10)
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=10)
        restored = shared.get("n")  # starts a new server from the file
        loss = acknowledged - restored
        worst_loss = max(worst_loss, loss)
        # SIGKILL spares what was written to the OS: every policy keeps all of it; a
        # power cut could take up to about a second under everysec.
        assert loss <= 0, f"round {_round}: acknowledged {acknowledged}, restored {restored}"
        for key, value in sets.items():
            assert shared.get(key) >= value
        acknowledged = restored
    assert worst_loss <= 0
    shared.state().backend.close()


def test_whole_app_restart_keeps_the_counter(run_dir: str) -> None:
    """gunicorn stopped and started again finds the counter where it was."""
    env = {
        "FLASK_SHAREDSTATE_PERSIST_PATH": os.path.join(run_dir, "state.db"),
        "FLASK_SHAREDSTATE_FSYNC": "everysec",
    }
    servers: list[Server] = []
    try:
        first = start_gunicorn(run_dir, "-w", "4", env=env, name="first")
        servers.append(first)
        responses = first.load([("GET", "/", None)] * 500, concurrency=16)
        assert {r.status for r in responses} == {200}
        (state_server,) = server_pids(run_dir)
        first.stop(signal.SIGTERM)
        wait_for(lambda: not pid_alive(state_server), timeout=5)
        second = start_gunicorn(run_dir, "-w", "4", env=env, name="second")
        servers.append(second)
        assert second.get("/stats").json()["hits"] == 500
        second.load([("GET", "/", None)] * 100, concurrency=16)
        assert second.get("/stats").json()["hits"] == 600
    finally:
        for server in servers:
            if not server.stopped:
                server.stop(signal.SIGKILL)


def test_compaction_bounds_the_journal(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 writes: the journal is compacted as it grows and never gets far past the
    threshold; the state restored from it equals the live state."""
    shared = persistent(run_dir, "no")
    path = os.path.join(run_dir, "state.db")
    rng = random.Random(5)
    largest = 0
    for i in range(100_000):
        if i % 3:
            shared.incr(f"counter{rng.randrange(100)}")
        else:
            shared.set(f"value{rng.randrange(1000)}", {"i": i, "pad": "x" * 20})
        if i % 2000 == 0:
            largest = max(largest, os.path.getsize(path))
    info = shared.state().backend.call("info")
    assert info["persistence"]["compactions"] >= 1
    # Compaction starts past MIN_COMPACT_SIZE and runs within a second or so.
    assert largest < 3 * persistence.MIN_COMPACT_SIZE
    live = shared.dict.copy()
    kill_server(shared)
    assert shared.dict.copy() == live
    shared.state().backend.close()


def test_persistence_needs_the_manager_backend() -> None:
    """PERSIST_PATH with the memory or redis backend is a ConfigError saying why."""
    from flask import Flask

    from flask_sharedstate import ConfigError

    for backend, url in (("memory", None), ("redis", "redis://127.0.0.1:1/0")):
        app = Flask("p")
        app.config.update(
            SHAREDSTATE_BACKEND=backend,
            SHAREDSTATE_REDIS_URL=url,
            SHAREDSTATE_PERSIST_PATH="state.db",
        )
        with pytest.raises(ConfigError, match="SHAREDSTATE_PERSIST_PATH"):
            SharedState(app)


def test_a_server_with_other_persistence_is_not_used(run_dir: str) -> None:
    """An app that persists does not silently use a running server that does not."""
    plain = workers.make_shared(os.path.join(run_dir, "app.sock"))
    plain.set("k", 1)
    shared = persistent(run_dir)
    with pytest.raises(SharedStateUnavailable, match="flask sharedstate stop"):
        shared.get("k")
    plain.state().backend.close()


def test_journal_stays_bounded_across_restarts(run_dir: str) -> None:
    """One ~200 KB key rewritten many times across several SIGKILL restarts: the file
    stays below 2 x max(MIN_COMPACT_SIZE, 2 x the live state) plus one write, and every
    restart restores the last acknowledged version."""
    shared = persistent(run_dir, "no")
    path = os.path.join(run_dir, "state.db")
    pad = "x" * 200_000
    live = len(persistence.encode_record(("put", "worker_app", "blob", pack_blob(0, pad), None)))
    bound = 2 * max(persistence.MIN_COMPACT_SIZE, 2 * live) + live
    largest = 0
    version = 0
    for _round in range(6):
        for _ in range(60):
            version += 1
            shared.set("blob", {"v": version, "pad": pad})
            largest = max(largest, os.path.getsize(path))
        kill_server(shared)
        assert shared.get("blob")["v"] == version  # a new server, restored from the file
        largest = max(largest, os.path.getsize(path))
    assert largest <= bound, f"the journal reached {largest} bytes (bound {bound})"
    shared.state().backend.close()


def pack_blob(version: int, pad: str) -> bytes:
    from flask_sharedstate.backends.base import pack

    return pack("blob", {"v": version, "pad": pad})


def test_a_relative_persist_path_gets_its_instance_folder(run_dir: str) -> None:
    """A relative SHAREDSTATE_PERSIST_PATH works though the instance folder does not exist:
    init_app creates it, as Flask-SQLAlchemy does for SQLite; the server log stays clean."""
    from flask import Flask

    instance = os.path.join(run_dir, "project", "instance")
    app = Flask("persist_app", instance_path=instance)
    app.config.update(
        SHAREDSTATE_SOCKET=os.path.join(run_dir, "app.sock"),
        SHAREDSTATE_PERSIST_PATH="data/state.db",
    )
    shared = SharedState(app)
    with app.app_context():
        try:
            assert shared.incr("n") == 1
        finally:
            shared.state().backend.close()
    assert os.path.isfile(os.path.join(instance, "data", "state.db"))
    with open(os.path.join(run_dir, "app.sock.log")) as f:
        assert "Traceback" not in f.read()


def test_a_persist_path_in_a_missing_folder_says_so(run_dir: str) -> None:
    """An absolute SHAREDSTATE_PERSIST_PATH in a missing folder fails each call with the
    server's own words, once each, and no traceback in the server log."""
    from flask import Flask

    app = Flask("persist_app")
    missing = os.path.join(run_dir, "missing", "state.db")
    app.config.update(
        SHAREDSTATE_SOCKET=os.path.join(run_dir, "app.sock"),
        SHAREDSTATE_PERSIST_PATH=missing,
        SHAREDSTATE_TIMEOUT=2,
    )
    shared = SharedState(app)
    with app.app_context():
        for _ in range(3):
            with pytest.raises(SharedStateUnavailable) as info:
                shared.incr("n")
            message = str(info.value)
            assert f"the folder of SHAREDSTATE_PERSIST_PATH {missing} does not exist" in message
            assert "error " not in message and ".." not in message
    assert not os.path.exists(os.path.dirname(missing))  # an absolute path is the user's
    with open(os.path.join(run_dir, "app.sock.log")) as f:
        assert "Traceback" not in f.read()


def test_a_server_whose_starter_stopped_waiting_logs_no_traceback(run_dir: str) -> None:
    """A server that cannot start and finds its starter gone (the ready pipe closed) logs
    why in one line, without a BrokenPipeError traceback."""
    import subprocess
    import sys

    ready_r, ready_w = os.pipe()
    os.close(ready_r)  # the starter gave up waiting
    missing = os.path.join(run_dir, "missing", "state.db")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flask_sharedstate.server", "--unix"]
            + [os.path.join(run_dir, "s.sock"), "--ready-fd", str(ready_w)]
            + ["--persist", missing],
            input=b"k" * 32,
            pass_fds=(ready_w,),
            capture_output=True,
            timeout=60,
        )
    finally:
        os.close(ready_w)
    log = proc.stderr.decode()
    assert proc.returncode == 2
    assert "Traceback" not in log and "BrokenPipeError" not in log
    assert f"it was told: error the folder of SHAREDSTATE_PERSIST_PATH {missing}" in log
