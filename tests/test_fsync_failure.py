"""A failing fsync under SHAREDSTATE_PERSIST_PATH (a disk that accepts writes it cannot keep).

The persistence file lies on a small ext4 file system in a sparse image file that lies on
a small tmpfs, mounted through a loop device. Filling the tmpfs makes the loop device fail
its writes: ext4 still accepts ``write`` (into the page cache), but ``fsync`` fails, as on
a thin-provisioned or failing disk. Unmounting and mounting the image again drops the page
cache, so what a restarted server reads is what reached the "disk". Needs root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from flask_sharedstate import NotPersisted, SharedState

import workers
from conftest import server_pids, wait_for

OUTER_SIZE = 8 * 1024 * 1024
#: The image's block size: one tmpfs page, so that a block of the image is kept
#: ("backed") exactly when it was written itself (mkfs picks 1 KiB blocks for so small an
#: image: four blocks in one page, and a new block could land in a page that a
#: neighbour had already filled, so a write "failed" or not by chance).
BLOCK_SIZE = os.sysconf("SC_PAGE_SIZE")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


class FailingDisk:
    """The image, its mount point, and the tmpfs under it."""

    def __init__(self, run_dir: str) -> None:
        self.outer = os.path.join(run_dir, "outer")
        self.image = os.path.join(self.outer, "disk.img")
        self.mount = os.path.join(run_dir, "disk")
        self.filler = os.path.join(self.outer, "filler")

    def mount_image(self) -> None:
        # noinit_itable: no kernel thread zeroing inode tables in the image meanwhile
        options = "loop,errors=continue,noinit_itable"
        done = run("mount", "-o", options, self.image, self.mount)
        if done.returncode != 0:
            raise RuntimeError(f"cannot mount {self.image}: {done.stderr}")

    def remount(self) -> None:
        """Unmount and mount the image again: the page cache of the file is gone."""
        done = umount_when_released(self.mount)
        assert done.returncode == 0, f"{done.stderr}{run('fuser', '-vm', self.mount).stderr}"
        self.mount_image()

    def fill(self) -> None:
        """Fill the tmpfs under the image: writes to the image's free blocks now fail.

        What was written so far is written back first, so that the blocks in use are
        kept and every block written later needs a page the tmpfs has not got.
        """
        done = run("sync", "-f", self.mount)
        assert done.returncode == 0, done.stderr
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (65536, BLOCK_SIZE, 1):  # to the last page
                for _ in range(OUTER_SIZE // chunk + 10):
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break
                else:
                    raise AssertionError(f"{self.outer} never filled up")
        finally:
            os.close(fd)
        assert self.free_pages() == 0

    def free_pages(self) -> int:
        return os.statvfs(self.outer).f_bfree

    def free(self) -> None:
        os.unlink(self.filler)


@pytest.fixture
def failing_disk(run_dir: str) -> Iterator[FailingDisk]:
    """An ext4 image on an 8 MiB tmpfs, loop-mounted; unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("the fsync-failure tests mount a tmpfs and a loop device: run them as root")
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("the fsync-failure tests need mkfs.ext4 and losetup (e2fsprogs, mount)")
    disk = FailingDisk(run_dir)
    os.mkdir(disk.outer)
    os.mkdir(disk.mount)
    with contextlib.ExitStack() as cleanup:
        done = run("mount", "-t", "tmpfs", "-o", f"size={OUTER_SIZE}", "tmpfs", disk.outer)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs at {disk.outer}: {done.stderr}")
        cleanup.callback(unmount, disk.outer)
        with open(disk.image, "wb") as f:
            f.truncate(64 * 1024 * 1024)  # sparse: far larger than the tmpfs under it
        options = "lazy_itable_init=1,lazy_journal_init=1"
        done = run(
            "mkfs.ext4",
            *("-q", "-F", "-b", str(BLOCK_SIZE), "-O", "^has_journal", "-E", options),
            disk.image,
        )
        assert done.returncode == 0, done.stderr
        try:
            disk.mount_image()
        except RuntimeError as exc:
            pytest.skip(f"no loop device to test a failing fsync on: {exc}")
        cleanup.callback(unmount, disk.mount)
        cleanup.callback(kill_servers_of, run_dir)  # first: their open files keep mounts busy
        yield disk


def unmount(path: str) -> None:
    if umount_when_released(path).returncode != 0:
        run("umount", "-l", path)  # last resort: the loop device goes when its files do


def umount_when_released(path: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """umount ``path``, retried while it is busy (a killed process may still be exiting)."""
    deadline = time.monotonic() + timeout
    while True:
        done = run("umount", path)
        if done.returncode == 0 or "busy" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(0.05)


def kill_servers_of(run_dir: str) -> None:
    for pid in server_pids(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: exited(pid), timeout=10)


def exited(pid: int) -> bool:
    """True once every thread of ``pid`` has exited, and so closed its files.

    A killed process's main thread turns zombie (what ``pid_alive`` looks at) while
    its other threads may still be exiting, one of them stuck in an fsync of the
    failing disk: until they are gone the mount is busy.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone (or going: ESRCH while it is reaped)
        return True
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/stat") as f:
                state = f.read().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state not in "ZX":
            return False
    return True


def on_disk(run_dir: str, disk: FailingDisk, fsync: str) -> SharedState:
    return workers.make_shared(
        os.path.join(run_dir, "app.sock"),
        SHAREDSTATE_PERSIST_PATH=os.path.join(disk.mount, "state.db"),
        SHAREDSTATE_FSYNC=fsync,
    )


def stop_and_remount(shared: SharedState, disk: FailingDisk) -> None:
    pid = workers.server_pid(shared)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: exited(pid), timeout=10)
    shared.state().backend.close()
    disk.remount()


def test_failed_fsync_in_always_mode_is_not_persisted(
    run_dir: str, failing_disk: FailingDisk
) -> None:
    """fsync=always: a write whose fsync fails raises NotPersisted and is undone (a retried
    incr counts once); once the disk keeps writes again, every acknowledged write is read
    back from the disk itself after a restart."""
    shared = on_disk(run_dir, failing_disk, "always")
    for _ in range(5):
        shared.incr("n")
    shared.set("a", {"x": 1})
    failing_disk.fill()
    # Writes within the file's last block, which the disk keeps, still succeed.
    acknowledged, first = refused_incr(shared)
    assert "nothing of this operation was written" in str(first)
    before = shared.dict.copy()
    assert before["n"] == acknowledged >= 5
    # Each later write is either refused and changes nothing, or acknowledged and counted
    # once (the kernel may yet find room for a block): both are the guarantee, and what was
    # acknowledged must come back from the disk after the remount below.
    for _ in range(3):
        try:
            acknowledged = shared.incr("n")
        except NotPersisted as exc:
            assert "nothing of this operation was written" in str(exc)
        assert shared.get("n") == acknowledged
    try:
        shared.set_many({"a": 2, "b": 3})
    except NotPersisted:
        assert shared.get_many(["a", "b"]) == {"a": before["a"], "b": before.get("b")}
    failing_disk.free()
    assert shared.incr("n") == acknowledged + 1
    shared.set("b", [1, 2])
    expected = shared.dict.copy()
    stop_and_remount(shared, failing_disk)
    assert shared.dict.copy() == expected
    shared.state().backend.close()


def test_failed_fsync_in_everysec_mode_stops_writes_until_rewritten(
    run_dir: str, failing_disk: FailingDisk
) -> None:
    """fsync=everysec: writes acknowledged before a failed fsync cannot be taken back; the
    server logs it, refuses writes (reads go on) until it has rewritten the whole state to
    a synced file, and then nothing acknowledged is missing from the disk."""
    shared = on_disk(run_dir, failing_disk, "everysec")
    for i in range(5):
        shared.set(f"k{i}", i)
    failing_disk.fill()
    acknowledged = 0
    refused = None
    deadline = time.monotonic() + 30
    while refused is None and time.monotonic() < deadline:
        try:
            acknowledged = shared.incr("n")
        except NotPersisted as exc:
            refused = exc
        time.sleep(0.01)
    with open(os.path.join(run_dir, "app.sock.log")) as f:
        logged = f.read()
    context = f"{failing_disk.free_pages()} pages free in the tmpfs; the server's log:\n{logged}"
    assert refused is not None, f"writes were never refused after the fsync failed: {context}"
    assert "fsync failed" in str(refused), context
    assert "fsync failed" in logged, context
    assert acknowledged >= 1  # some writes were acknowledged before the failed fsync
    assert shared.get("n") == acknowledged  # reads go on
    with pytest.raises(NotPersisted):
        shared.incr("n")  # still refused: the disk is still full
    failing_disk.free()
    # The server rewrites the state (each second it tries) and takes writes again.
    wait_for(lambda: incr_once(shared), timeout=30, interval=0.2)
    acknowledged += 1
    shared.set("after", "yes")
    expected = shared.dict.copy()
    assert expected["n"] == acknowledged
    stop_and_remount(shared, failing_disk)
    assert shared.dict.copy() == expected
    shared.state().backend.close()


def refused_incr(shared: SharedState) -> tuple[int, NotPersisted]:
    """incr n until an incr is refused (when its record needs a block past the file's last);
    return the last value acknowledged and the refusal.

    Every later incr of n (below 256) has a record of the same size, so it too needs that
    new block: with a different write here, an incr could still fit in the room it left.
    """
    acknowledged = shared.get("n")
    while acknowledged < 255:  # a block holds about a hundred such records
        try:
            acknowledged = shared.incr("n")
        except NotPersisted as exc:
            return acknowledged, exc
    raise AssertionError("writes were never refused after the disk filled")


def incr_once(shared: SharedState) -> bool:
    try:
        shared.incr("n")
    except NotPersisted:
        return False
    return True
