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
* Compaction writes the live state aside (``PATH.compact``), fsyncs it, appends
  the changes made meanwhile, renames it over the file and fsyncs the folder:
  at every moment the file on disk is a complete, valid journal. Clients wait
  only for the final append and rename.
* A torn last record (a crash mid-write) is cut off with a warning. A bad
  record with data after it, a foreign file or a newer format version stops
  the server with :exc:`PersistenceError`, and the file is left as it was.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
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

#: Compact when the journal is this much larger than the last compacted file...
GROWTH_FACTOR = 2.0
#: ...and at least this large.
MIN_COMPACT_SIZE = 4 * 1024 * 1024

Record = tuple[Any, ...]


class PersistenceError(Exception):
    """The persistence file cannot be used; the message names it and says what to do."""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} in a journal record")


def encode_record(body: Record) -> bytes:
    data = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    return _RECORD.pack(len(data), zlib.crc32(data)) + data


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
        record = _NoGlobals(io.BytesIO(body)).load()
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
        self.size = 0
        self.base_size = 0
        self.dirty = False
        self.last_fsync = time.time()
        self.compactions = 0
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
            if valid_end == 0:
                os.ftruncate(self.fd, 0)
                os.write(self.fd, header())
                valid_end = HEADER_SIZE
            else:
                os.ftruncate(self.fd, valid_end)
            os.fsync(self.fd)
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
        os.write(fd, header())
        os.fsync(fd)
        _fsync_folder(self.path)
        os.close(fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = self.base_size = HEADER_SIZE

    # -- writing ---------------------------------------------------------------------

    def append(self, records: Iterable[Record]) -> None:
        data = b"".join(encode_record(r) for r in records)
        if not data:
            return
        _write_all(self.fd, data)
        self.size += len(data)
        if self._pending is not None:
            self._pending.append(data)
        if self.fsync_policy == "always":
            os.fsync(self.fd)
            self.last_fsync = time.time()
        else:
            self.dirty = True

    def sync(self) -> None:
        """fsync now if anything was written since the last one (``everysec`` calls it)."""
        if self.dirty and self.fd >= 0:
            self.dirty = False
            os.fsync(self.fd)
            self.last_fsync = time.time()

    def wants_compaction(self) -> bool:
        return (
            self._pending is None
            and self.size >= MIN_COMPACT_SIZE
            and self.size >= GROWTH_FACTOR * self.base_size
        )

    # -- compaction --------------------------------------------------------------------

    def begin_compaction(self) -> None:
        """Start remembering new records; call with the store's lock held."""
        self._pending = []

    def write_compacted(self, snapshot: Iterable[Record]) -> str:
        """Write ``snapshot`` aside and fsync it; no lock needed. Returns the file's path."""
        aside = self.path + ".compact"
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            buffer = bytearray(header())
            for record in snapshot:
                buffer += encode_record(record)
                if len(buffer) >= 1 << 20:
                    _write_all(fd, bytes(buffer))
                    buffer.clear()
            _write_all(fd, bytes(buffer))
            os.fsync(fd)
        finally:
            os.close(fd)
        return aside

    def finish_compaction(self, aside: str) -> None:
        """Append what came meanwhile, fsync, rename over the file; with the store's lock held."""
        pending = self._pending or []
        self._pending = None
        fd = os.open(aside, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            for data in pending:
                _write_all(fd, data)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        os.replace(aside, self.path)
        _fsync_folder(self.path)
        old, self.fd = self.fd, fd
        os.close(old)
        self.size = self.base_size = size
        self.dirty = False
        self.compactions += 1

    def abandon_compaction(self) -> None:
        self._pending = None
        try:
            os.unlink(self.path + ".compact")
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_folder(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
