"""A full disk under SHAREDSTATE_PERSIST_PATH: refused writes, nothing half-applied, no loss.

Each test mounts a small tmpfs of its own (which needs root, as the tests have here and in
CI) and puts the persistence file on it, with a real state server started through the app.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from flask_sharedstate import NotPersisted, SharedState, SharedStateUnavailable
from flask_sharedstate.backends.base import pack

import workers
from conftest import kill_servers, pid_alive, server_pids, wait_for

DISK_SIZE = 2 * 1024 * 1024
FULL = "No space left on device"


@pytest.fixture
def small_disk(run_dir: str) -> Iterator[str]:
    """A 2 MiB tmpfs mounted in the test's folder; unmounted (after its servers are
    killed) whatever happens."""
    with mounted(run_dir, DISK_SIZE) as mount:
        yield mount


@contextlib.contextmanager
def mounted(run_dir: str, size: int) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip(
            "the disk-full tests mount a small tmpfs, and only root may mount one: run"
            " them as root (CI does)"
        )
    mount = os.path.join(run_dir, "disk")
    os.mkdir(mount)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", mount],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {mount}, so no full disk to test on: {done.stderr}")
    try:
        yield mount
    finally:
        kill_servers(run_dir)  # their open journal would keep the mount busy
        if subprocess.run(["umount", mount], check=False).returncode != 0:
            subprocess.run(["umount", "-l", mount], check=False)


def on_disk(run_dir: str, disk: str, fsync: str) -> SharedState:
    return workers.make_shared(
        os.path.join(run_dir, "app.sock"),
        SHAREDSTATE_PERSIST_PATH=os.path.join(disk, "state.db"),
        SHAREDSTATE_FSYNC=fsync,
    )


def fill(disk: str) -> str:
    """Fill ``disk`` to the last byte with a filler file; return its path."""
    path = os.path.join(disk, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(os.statvfs(disk).f_blocks + 10):
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            raise AssertionError(f"{disk} never filled up")
        try:  # the last partial page, byte by byte
            for _ in range(4096):
                os.write(fd, b"\0")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def fill_last_page(shared: SharedState) -> None:
    """Write until the journal's last, partly used page of the full disk is used up too."""
    for i in range(4096):
        try:
            shared.set("page", i)
        except NotPersisted:
            return
    raise AssertionError("writes never failed on the full disk")


def stop_server(shared: SharedState, how: signal.Signals) -> None:
    pid = workers.server_pid(shared)
    os.kill(pid, how)
    wait_for(lambda: not pid_alive(pid), timeout=10)


def write_everything(shared: SharedState) -> None:
    """One of each kind of write: incr, set, set_many, delete, an atomic block, clear."""
    shared.incr("n")
    shared.set("a", 1)
    shared.set_many({"b": 2, "c": 3})
    del shared.dict["b"]
    with shared.atomic():
        shared.dict["c"] = shared.dict["c"] + 1
        shared.dict["d"] = [4]
    shared.dict.clear()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_full_disk_refuses_writes_whole_and_loses_nothing(
    run_dir: str, small_disk: str, fsync: str, how: signal.Signals
) -> None:
    """On a full disk every kind of write raises NotPersisted naming the OS's reason and
    changes nothing (a retried incr counts once; locks and atomic blocks still work); once
    space returns writes go on, and a restart restores every acknowledged write."""
    shared = on_disk(run_dir, small_disk, fsync)
    for _ in range(5):
        shared.incr("n")
    shared.set_many({"a": "one", "b": {"two": [2]}})
    shared.set("ttl", "x", ttl=300)
    lock = shared.lock("held")
    assert lock.acquire(timeout=1)

    filler = fill(small_disk)
    fill_last_page(shared)
    before = shared.dict.copy()
    assert before["n"] == 5
    attempts = [
        lambda: shared.incr("n"),
        lambda: shared.incr("n"),  # the retry of a refused incr
        lambda: shared.set("a", "changed"),
        lambda: shared.set_many({"a": 1, "b": 2, "new": 3}),
        lambda: shared.dict.pop("a"),
        lambda: shared.expire("a", 60),
        lambda: shared.dict.clear(),
        lambda: shared.set("big", b"x" * 100_000),
    ]
    for attempt in attempts:
        with pytest.raises(NotPersisted, match=FULL) as info:
            attempt()
        assert "nothing" in str(info.value)
        assert shared.dict.copy() == before
    with pytest.raises(NotPersisted, match=FULL):
        with shared.atomic():
            shared.dict["n"] = shared.dict["n"] + 100
            shared.dict["new"] = "block"
    assert shared.dict.copy() == before
    # Locks and the atomic block's slot are not journaled: they still work.
    assert lock.locked()
    lock.release()
    assert lock.acquire(timeout=1)
    lock.release()
    # New default keys are refused whole too (the connection sends them on connect).
    shared.state().backend.set_defaults([("fresh", pack("fresh", 7)), ("n", pack("n", 0))])
    with pytest.raises(NotPersisted, match=FULL):
        shared.get("n")

    # Some room, but not enough for a large value: it is refused (a partial write,
    # cut back), while a small incr fits and counts exactly once.
    os.truncate(filler, os.path.getsize(filler) - 64 * 1024)
    with pytest.raises(NotPersisted, match=FULL):
        shared.set("big", b"x" * 300_000)
    assert shared.incr("n") == 6
    assert "big" not in shared.dict

    os.unlink(filler)
    expected = shared.dict.copy()
    assert expected == {**before, "n": 6, "fresh": 7}
    write_everything(shared)
    for i in range(20):
        shared.incr("n")
        shared.set(f"k{i}", {"i": i})
    shared.set("big", b"y" * 300_000)
    shared.set("ttl", "x", ttl=300)
    with shared.atomic():
        shared.dict["k0"] = shared.dict["k0"] | {"atomic": True}
    expected = shared.dict.copy()
    assert expected["n"] == 20 and expected["k0"] == {"i": 0, "atomic": True}

    stop_server(shared, how)
    assert shared.dict.copy() == expected  # a new server, restored from the file
    remaining = shared.ttl("ttl")
    assert remaining is not None and 200 < remaining <= 300
    shared.state().backend.close()


def test_full_disk_at_start_is_a_clear_error(run_dir: str, small_disk: str) -> None:
    """A server that cannot create its file on a full disk tells the app why; once space
    returns it starts, and what it is told survives a restart."""
    filler = fill(small_disk)
    shared = on_disk(run_dir, small_disk, "always")
    with pytest.raises(SharedStateUnavailable, match=FULL) as info:
        shared.incr("n")
    assert os.path.join(small_disk, "state.db") in str(info.value)
    assert server_pids(run_dir) == []
    os.unlink(filler)
    assert shared.incr("n") == 1
    shared.set("k", "v")
    stop_server(shared, signal.SIGKILL)
    assert shared.get("n") == 1 and shared.get("k") == "v"
    shared.state().backend.close()


def test_compaction_on_a_full_disk_leaves_the_journal_and_the_space(run_dir: str) -> None:
    """A compaction that cannot fit on the disk leaves the journal intact and no .compact
    file taking the space: small writes go on; with space back it compacts, and a restart
    restores everything."""
    with mounted(run_dir, 16 * 1024 * 1024) as disk:
        shared = on_disk(run_dir, disk, "everysec")
        path = os.path.join(disk, "state.db")
        shared.set("big", b"a" * 1_500_000)
        shared.set("big", b"b" * 1_500_000)  # 3 MB of journal, below the threshold
        filler = fill(disk)
        os.truncate(filler, os.path.getsize(filler) - 1_400_000)
        written = 0
        while os.path.getsize(path) < 4 * 1024 * 1024 + 100_000:  # past the threshold
            shared.set(f"k{written}", b"c" * 1000)
            written += 1
            assert written < 2000, "the journal never reached the compaction threshold"
        log = os.path.join(run_dir, "app.sock.log")
        wait_for(lambda: "compaction of" in read(log), timeout=20)
        assert "the journal is intact" in read(log)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # it retries each second: never leaves its file
            assert not os.path.exists(path + ".compact")
            time.sleep(0.05)
        for i in range(20):  # the space it did not take is there for the clients
            shared.set(f"small{i}", i)
        assert shared.state().backend.call("info")["persistence"]["compactions"] == 0

        os.unlink(filler)
        wait_for(lambda: shared.state().backend.call("info")["persistence"]["compactions"], 60)
        assert os.path.getsize(path) < 4 * 1024 * 1024
        expected = shared.dict.copy()
        assert len(expected) == written + 21
        stop_server(shared, signal.SIGKILL)
        assert shared.dict.copy() == expected
        shared.state().backend.close()


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()
