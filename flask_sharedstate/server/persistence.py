"""The persistence file: an append-only journal of writes, compacted by snapshots.

File format (one file, so that a backup is one copy)::

    MAGIC (18 bytes) | version (2 bytes, big-endian) | record | record | ...
    record = length (4 bytes) | crc32 of body (4 bytes) | body (a pickle of a tuple)

A body is one of::

    ("put", namespace, key, value, deadline)   deadline: wall-clock seconds, or None
    ("del", namespace, key)
    ("clear", namespace)
    ("default", namespace, key)                a default key was applied once

Bodies hold only str, int, float, bytes, None and tuples; they are read with
an unpickler that refuses every global, so a file cannot run code.

Guarantees:

* Every change is written (``os.write``) before the client is answered, so a
  killed server loses nothing; ``fsync`` decides what a power cut may lose:
  ``always`` syncs before answering, ``everysec`` once a second, ``no`` never.
* A change that cannot be written whole (a full disk), or in ``always`` mode
  synced, is cut off the file again and raises :exc:`NotPersisted`: the store
  undoes it and the client is told that nothing was written.
* A failed ``everysec`` fsync cannot be undone: the writes of the last second
  may then be in the OS's cache only. It is logged, and writes are refused
  (:exc:`NotPersisted`) until the whole state has been written afresh and
  synced (a compaction, tried each second); reads go on.
* Compaction writes the live state aside (``PATH.compact``), fsyncs it, appends
  the changes made meanwhile, renames it over the file and fsyncs the folder:
  at every moment the file on disk is a complete, valid journal. Clients wait
  only for the final append and rename. It runs when the file has grown past
  :data:`GROWTH_FACTOR` times the live state (and :data:`MIN_COMPACT_SIZE`),
  also right after a start, so the file stays a bounded multiple of the state.
  A compaction that fails (a full disk) removes its file and leaves the
  journal as it was.
* A torn last record (a crash mid-write) is cut off with a warning. A bad
  record with data after it, a foreign file or a newer format version stops
  the server with :exc:`PersistenceError`, and the file is left as it was.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("flask_sharedstate.server")

MAGIC = b"FLASK-SHAREDSTATE\n"
VERSION = 1
_PREFIX = struct.Struct("!H")
_RECORD = struct.Struct("!II")
HEADER_SIZE = len(MAGIC) + _PREFIX.size

#: Compact when the journal is this much larger than the live state...
GROWTH_FACTOR = 2.0
#: ...and at least this large. Past twice that threshold, writers wait for it
#: (briefly), so the file stays below about 2 x max(MIN_COMPACT_SIZE, 2 x live state).
MIN_COMPACT_SIZE = 4 * 1024 * 1024

Record = tuple[Any, ...]


class PersistenceError(Exception):
    """The persistence file cannot be used; the message names it and says what to do."""


class NotPersisted(Exception):
    """A change could not be written to the journal; it was cut off again, and undone."""


def _reason(exc: OSError) -> str:
    """The OS's reason, and what to do about the common ones."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free space on that disk, or raise the quota)"
    return reason


class NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} where only plain data may be")


def encode_record(body: Record) -> bytes:
    data = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    return _RECORD.pack(len(data), zlib.crc32(data)) + data


def estimated_size(records: list[Record]) -> int:
    """About how many bytes ``records`` take in a file, without encoding them."""
    return sum(64 + (len(r[3]) if r[0] == "put" and type(r[3]) is bytes else 0) for r in records)


def header() -> bytes:
    return MAGIC + _PREFIX.pack(VERSION)


def read_journal(path: str) -> tuple[list[Record], int, bool]:
    """Read every record of ``path``.

    Returns the records, the offset where the valid data ends, and whether a
    torn last record follows it. Raises :exc:`PersistenceError` for a file
    that is not ours, of a newer version, or damaged before its end.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            return [], 0, bool(data)  # torn while the header was being written
        raise PersistenceError(
            f"{path} is not a Flask-SharedState persistence file. Point"
            " SHAREDSTATE_PERSIST_PATH at another path, or move this file away."
        )
    if len(data) < HEADER_SIZE:
        return [], 0, True
    (version,) = _PREFIX.unpack_from(data, len(MAGIC))
    if version > VERSION:
        raise PersistenceError(
            f"{path} was written by a newer Flask-SharedState (format {version}; this one"
            f" reads {VERSION}). Upgrade Flask-SharedState, or move the file away."
        )
    records: list[Record] = []
    offset = HEADER_SIZE
    end = len(data)
    while offset < end:
        if offset + _RECORD.size > end:
            return records, offset, True
        size, crc = _RECORD.unpack_from(data, offset)
        body_end = offset + _RECORD.size + size
        if body_end > end:
            return records, offset, True
        body = data[offset + _RECORD.size : body_end]
        record = _decode(body) if zlib.crc32(body) == crc else None
        if record is None:
            if body_end == end:
                return records, offset, True  # the last record, torn mid-write
            raise PersistenceError(
                f"{path} is damaged at byte {offset} (a record with data after it does"
                " not check out). Restore it from a backup, or move it away to start"
                " empty; the server will not overwrite it."
            )
        records.append(record)
        offset = body_end
    return records, offset, False


def _decode(body: bytes) -> Record | None:
    try:
        record = NoGlobals(io.BytesIO(body)).load()
    except Exception:  # noqa: BLE001 - any failure means a damaged record
        return None
    if type(record) is not tuple or not record or record[0] not in _KINDS:
        return None
    return record


_KINDS = frozenset(("put", "del", "clear", "default"))


class Journal:
    """The open persistence file of a running server.

    :meth:`append` is called with the store's lock held, after each operation
    that changed something, before the reply goes out.
    """

    def __init__(self, path: str, fsync: str) -> None:
        self.path = path
        self.fsync_policy = fsync
        self.fd = -1
        #: where the last whole record ends: the file is cut back here after a failed write
        self.size = 0
        #: the live state's size in the file (estimated after a start, exact after a
        #: compaction): the base of the compaction threshold
        self.base_size = 0
        self.dirty = False
        self.last_fsync = time.time()
        self.compactions = 0
        #: compactions failed in a row, and when to try the next one (time.monotonic)
        self.failed_compactions = 0
        self._retry_at = 0.0
        #: why writes are refused until the file is rewritten (a failed fsync), or None
        self.broken: str | None = None
        #: set when a compaction is due, to wake the thread that runs it
        self.due = threading.Event()
        #: while a compaction runs: the records written meanwhile, for the new file
        self._pending: list[bytes] | None = None

    # -- opening -------------------------------------------------------------------

    def load(self) -> Iterator[Record]:
        """Check and read the file (creating it if absent); yield its records."""
        folder = os.path.dirname(self.path) or "."
        if not os.path.isdir(folder):
            raise PersistenceError(
                f"the folder of SHAREDSTATE_PERSIST_PATH {self.path} does not exist; create it."
            )
        if not os.path.exists(self.path):
            self._create()
            return iter(())
        if not os.path.isfile(self.path) or not os.access(self.path, os.R_OK | os.W_OK):
            raise PersistenceError(
                f"SHAREDSTATE_PERSIST_PATH {self.path} is not a file this user can read and"
                " write; point it at one, or fix its permissions."
            )
        try:
            records, valid_end, torn = read_journal(self.path)
        except OSError as exc:
            raise PersistenceError(
                f"cannot read SHAREDSTATE_PERSIST_PATH {self.path}: {exc.strerror}"
            ) from None
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise PersistenceError(
                f"cannot open SHAREDSTATE_PERSIST_PATH {self.path} for writing: {exc.strerror}"
            ) from None
        if torn:
            log.warning(
                "%s: cut off a torn last record at byte %d (a crash in the middle of a"
                " write); restored everything before it",
                self.path,
                valid_end,
            )
        if torn or valid_end == 0:
            try:
                os.ftruncate(self.fd, valid_end)
                if valid_end == 0:  # empty, or torn in the header: start it afresh
                    _write_all(self.fd, header())
                    valid_end = HEADER_SIZE
                os.fsync(self.fd)
            except OSError as exc:
                os.close(self.fd)
                self.fd = -1
                raise PersistenceError(
                    f"cannot write to SHAREDSTATE_PERSIST_PATH {self.path}: {_reason(exc)}"
                ) from None
        self.size = self.base_size = valid_end
        return iter(records)

    def _create(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PersistenceError(
                f"cannot create SHAREDSTATE_PERSIST_PATH {self.path}: {exc.strerror}. Point it"
                " at a writable folder."
            ) from None
        try:
            _write_all(fd, header())
            os.fsync(fd)
            _fsync_folder(self.path)
        except OSError as exc:
            os.close(fd)
            os.unlink(self.path)  # leave nothing half-made behind
            raise PersistenceError(
                f"cannot create SHAREDSTATE_PERSIST_PATH {self.path}: {_reason(exc)}"
            ) from None
        os.close(fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = self.base_size = HEADER_SIZE

    # -- writing ---------------------------------------------------------------------

    def append(self, records: Iterable[Record]) -> None:
        """Write ``records`` whole (and sync them, for ``always``), or raise NotPersisted.

        On failure the file is cut back to its last whole record, so that the
        caller can undo the change and later writes follow a valid journal.
        """
        data = b"".join(encode_record(r) for r in records)
        if not data:
            return
        if self.broken is not None:
            raise NotPersisted(
                f"the state server cannot persist to {self.path}: {self.broken}. Writes"
                " are refused until it has rewritten the file, which it tries each"
                " second; nothing of this operation was written"
            )
        try:
            _write_all(self.fd, data)
            if self.fsync_policy == "always":
                os.fsync(self.fd)
                self.last_fsync = time.time()
        except OSError as exc:
            self._cut_back()
            raise NotPersisted(
                f"the state server could not write to {self.path}: {_reason(exc)};"
                " nothing of this operation was written"
            ) from None
        self.size += len(data)
        if self._pending is not None:
            self._pending.append(data)
        if self.fsync_policy == "everysec":
            self.dirty = True
        if self.wants_compaction():
            self.due.set()

    def _cut_back(self) -> None:
        """Cut off what a failed write left after the last whole record."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            # A partial record stays at the end: refuse writes until a compaction
            # has replaced the file.
            self._fail(f"cannot cut off a partial write: {exc.strerror}")

    def _fail(self, reason: str) -> None:
        self.broken = reason
        self.due.set()
        log.error(
            "%s: %s. Writes are refused until the whole state has been written to the"
            " file afresh; the server tries that each second.",
            self.path,
            reason,
        )

    def sync(self) -> None:
        """fsync now if anything was written since the last one (``everysec`` calls it).

        A failure cannot be undone (those writes were acknowledged): it is
        logged, and writes are refused until the file has been rewritten.
        """
        fd = self.fd
        if self.dirty and fd >= 0 and self.broken is None:
            self.dirty = False
            try:
                os.fsync(fd)
            except OSError as exc:
                if fd != self.fd:
                    return  # a compaction swapped (and synced) the file meanwhile
                self._fail(
                    f"fsync failed ({_reason(exc)}); the writes acknowledged since"
                    f" {time.ctime(self.last_fsync)} may be in the OS's cache only, and"
                    " lost to a power cut or OS crash"
                )
                return
            self.last_fsync = time.time()

    def threshold(self) -> float:
        """The file size past which a compaction is due."""
        return max(MIN_COMPACT_SIZE, GROWTH_FACTOR * self.base_size)

    def behind(self) -> bool:
        """True while the file is past twice its threshold and a compaction is due or running."""
        return self.size >= 2 * self.threshold() and (
            self._pending is not None or self.due.is_set()
        )

    def wants_compaction(self) -> bool:
        if self._pending is not None or self.fd < 0:
            return False
        if self.broken is not None:
            return True  # writes wait for it: try each second
        return self.size >= self.threshold() and time.monotonic() >= self._retry_at

    # -- compaction --------------------------------------------------------------------

    def begin_compaction(self) -> None:
        """Start remembering new records; call with the store's lock held."""
        self._pending = []

    def write_compacted(self, snapshot: list[Record]) -> tuple[str, int]:
        """Write ``snapshot`` aside and fsync it; no lock needed.

        Returns the file's path and size. On failure the file is removed: a full
        disk is not made fuller.
        """
        aside = self.path + ".compact"
        estimate = estimated_size(snapshot)
        disk = os.statvfs(os.path.dirname(self.path) or ".")
        if disk.f_bavail * disk.f_frsize < estimate:
            # Do not take the last free bytes that the clients' writes need.
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} for about {estimate} bytes")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            buffer = bytearray(header())
            size = 0
            for record in snapshot:
                buffer += encode_record(record)
                if len(buffer) >= 1 << 20:
                    _write_all(fd, bytes(buffer))
                    size += len(buffer)
                    buffer.clear()
            _write_all(fd, bytes(buffer))
            size += len(buffer)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(aside)
            raise
        os.close(fd)
        return aside, size

    def finish_compaction(self, aside: str, live_size: int) -> None:
        """Append what came meanwhile, fsync, rename over the file; with the store's lock held.

        ``live_size`` is the snapshot's size: the base of the next threshold.
        """
        pending = self._pending or []
        self._pending = None
        if self.fd < 0:  # closed meanwhile: the server is stopping
            _unlink(aside)
            return
        fd = os.open(aside, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            for data in pending:
                _write_all(fd, data)
            os.fsync(fd)
            size = os.fstat(fd).st_size
            os.replace(aside, self.path)
        except BaseException:
            os.close(fd)
            _unlink(aside)
            raise
        # From here on the new file is the journal, whatever happens.
        old, self.fd = self.fd, fd
        os.close(old)
        self.size = size
        self.base_size = live_size
        self.dirty = False
        self.last_fsync = time.time()
        self.compactions += 1
        self.failed_compactions = 0
        self._retry_at = 0.0
        self.due.clear()
        was_broken, self.broken = self.broken, None
        try:
            _fsync_folder(self.path)
        except OSError as exc:  # the rename might not survive a power cut
            self._fail(f"fsync of the folder after a compaction failed ({_reason(exc)})")
            return
        if was_broken is not None:
            log.warning("%s rewritten and synced: writes are accepted again", self.path)

    def abandon_compaction(self) -> None:
        """Forget a failed compaction; the next waits longer, up to a minute."""
        self._pending = None
        self.due.clear()
        self.failed_compactions += 1
        self._retry_at = time.monotonic() + min(60, 2**self.failed_compactions)
        _unlink(self.path + ".compact")

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                log.error("%s: the last fsync failed: %s", self.path, _reason(exc))
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_folder(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
