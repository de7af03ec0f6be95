"""The version table: the state server's word to its clients' read caches.

A file beside the unix socket (``<socket>.versions``), mapped into memory by
the server (which alone writes it) and by every worker (read only). It holds
a header and one counter per *slot*; a key's slot is a hash of its namespace
and name that every process computes alike (crc32, never Python's ``hash``).

The store bumps a key's slot, under its lock, with every change to the key,
before the change is acknowledged. A worker that read a value with its slot's
version may answer a later read of that key itself while the slot still holds
that version: no change can have been acknowledged since. See
``backends/client_cache.py`` for the reading side and its other conditions.

Header (little words of 8 bytes, native order):

====  ==========================================================================
0     magic
1     layout version
2     slot count (a power of two)
3     instance id: random, new for every server and after every ``clear``; 0 when
      no server stands behind the table
4     heartbeat: the server's ``time.monotonic()`` (a double), a few times a second
5-7   reserved
====  ==========================================================================

A new server reuses the file in place (workers keep their old mapping: a new
inode would never reach them) and writes its instance id before it serves
anyone, so no worker validates an old server's values against it. The file is
never shrunk: a worker's mapping past the end would fault.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import time
import zlib

log = logging.getLogger("flask_sharedstate.server")

MAGIC = int.from_bytes(b"FSSVERS1", "little")
LAYOUT = 1
HEADER_WORDS = 8
MAGIC_WORD, LAYOUT_WORD, SLOTS_WORD, INSTANCE_WORD, HEARTBEAT_WORD = range(5)
#: Slots: enough that unrelated keys rarely share one (sharing costs a round trip, never
#: a wrong value); 512 KiB of page cache shared by the server and its workers.
SLOTS = 1 << 16
#: How often the server writes its heartbeat.
HEARTBEAT_INTERVAL = 0.1
#: A worker trusts the table only while its heartbeat is younger than this: a dead
#: or stopped server is noticed within it (reads then go to the server).
HEARTBEAT_BOUND = 1.0
#: ``read_versioned``'s size limit that sends every value.
MAX_LIMIT = 1 << 62


def table_path(socket_path: str) -> str:
    return socket_path + ".versions"


def table_size(slots: int = SLOTS) -> int:
    return (HEADER_WORDS + slots) * 8


def slot_of(namespace: str, key: str, slots: int = SLOTS) -> int:
    """The word index of ``key``'s counter: the same in every process."""
    return _slot(namespace_seed(namespace), key, slots)


def namespace_seed(namespace: str) -> int:
    return zlib.crc32(namespace.encode("utf-8", "surrogatepass"))


def _slot(seed: int, key: str, slots: int) -> int:
    return HEADER_WORDS + (zlib.crc32(key.encode("utf-8", "surrogatepass"), seed) & (slots - 1))


def new_instance() -> int:
    return int.from_bytes(os.urandom(8), "little") or 1


class VersionTable:
    """The server's side: create (or reuse) the file, bump slots, beat."""

    def __init__(self, path: str, fd: int, mapping: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self.words = memoryview(mapping).cast("Q")
        self.floats = memoryview(mapping).cast("d")
        self.slots = SLOTS
        #: this server's instance id (changed by clear(), under the store's lock)
        self.instance = 0
        #: whether open() made the file (it was not there, or empty): no worker maps it
        self.created = False
        self._seeds: dict[str, int] = {}

    @classmethod
    def open(cls, path: str) -> VersionTable | None:
        """Create or reuse the table at ``path``; None (and a warning) if it cannot be.

        Never through a symbolic link; only a regular file of this user's, 0600.
        Without a table the server serves as before and workers read through.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            log.warning("no read cache for the workers: cannot open %s (%s)", path, reason)
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                log.warning("no read cache for the workers: %s is not this user's file", path)
                os.close(fd)
                return None
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            created = info.st_size == 0
            size = table_size()
            if info.st_size < size:  # never shrink it: a mapping past the end faults
                os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            log.warning("no read cache for the workers: cannot map %s (%s)", path, exc)
            os.close(fd)
            return None
        table = cls(path, fd, mapping)
        table.created = created
        table._take_over()
        return table

    def _take_over(self) -> None:
        """Make the header this layout's and this server's: before serving anyone."""
        words, floats = self.words, self.floats
        words[INSTANCE_WORD] = 0  # while the header is rewritten, nobody trusts it
        words[MAGIC_WORD] = MAGIC
        words[LAYOUT_WORD] = LAYOUT
        words[SLOTS_WORD] = self.slots
        floats[HEARTBEAT_WORD] = time.monotonic()
        self.instance = new_instance()
        words[INSTANCE_WORD] = self.instance

    # -- called with the store's lock held --------------------------------------------

    def _seed(self, namespace: str) -> int:
        seed = self._seeds.get(namespace)
        if seed is None:
            seed = self._seeds[namespace] = namespace_seed(namespace)
        return seed

    def bump(self, namespace: str, key: str) -> None:
        words = self.words
        slot = _slot(self._seed(namespace), key, self.slots)
        words[slot] = (words[slot] + 1) & 0xFFFFFFFFFFFFFFFF

    def version(self, namespace: str, key: str) -> tuple[int, int]:
        """``(slot, version)`` of ``key`` now."""
        slot = _slot(self._seed(namespace), key, self.slots)
        return slot, self.words[slot]

    def renew(self) -> None:
        """A new instance id: every value any worker holds is invalid at once (``clear``)."""
        self.instance = new_instance()
        self.words[INSTANCE_WORD] = self.instance

    def retire(self) -> None:
        """The server stops (or leaves this file): nobody may trust it until a server takes
        it over."""
        if self.words[INSTANCE_WORD] == self.instance:  # not a successor's
            self.words[INSTANCE_WORD] = 0

    # -- the heartbeat, and the file's watch -------------------------------------------

    def beat(self) -> None:
        self.floats[HEARTBEAT_WORD] = time.monotonic()

    def close(self) -> None:
        """Let go of the file (its mapping stays until nothing refers to it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def moved(self) -> bool:
        """Whether the path no longer names this file (deleted, or replaced)."""
        try:
            return os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell: look again later
