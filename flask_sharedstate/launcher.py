"""Starting the embedded state server: election, arguments, stale sockets, the key.

The public seam between the app's side and the server process, used by the
``manager`` backend (when the first use finds no server), by ``flask
sharedstate serve`` and by the gunicorn hooks:

* **Election.** Whoever cannot connect takes an ``flock`` on the address's
  ``.lock`` file (:meth:`ServerLauncher.election`), tries once more, and only
  then removes a stale socket file and starts a server. The kernel drops the
  ``flock`` of a process that dies, so a crashed starter never blocks the
  next one, and however many processes race, one server starts.
* **A fresh process.** The server is a new interpreter started with every
  descriptor closed, in a session of its own, and it detaches from its
  starter: killing or recycling the worker that started it does not touch it.
  It stops when its *owner* is gone (see :func:`owner_process`).
* **The key** goes to the server over a pipe, never on its command line.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from .config import Settings, runtime_dir
from .errors import ConfigError, SharedStateUnavailable
from .server import processes


def _parent_is_gunicorn() -> bool:
    """Whether this process is a gunicorn worker, forked by the master that is its parent."""
    parent = os.getppid()
    command = processes.command_line(parent)  # from /proc, or from ps
    if command is not None:
        return "gunicorn" in command
    # Unknown (no /proc, no ps): ask gunicorn. A worker's SIGTERM handler is a method
    # of its Worker, which knows the master's pid.
    worker = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    base = sys.modules.get("gunicorn.workers.base")
    return base is not None and isinstance(worker, base.Worker) and worker.ppid == parent


def owner_process() -> int:
    """The process whose end should end a server that this process starts.

    A worker of a pre-fork server is recycled at will, so its parent owns the
    state server: the gunicorn master, the Werkzeug reloader's watcher, the
    uWSGI master, or the parent of a :mod:`multiprocessing` child. Any other
    process (a script, ``flask run`` without the reloader, a gunicorn master
    using the state before it forks) owns the server itself.
    """
    parent = os.getppid()
    if parent > 1:
        if "gunicorn" in sys.modules and _parent_is_gunicorn():
            return parent
        if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
            return parent
        if multiprocessing.parent_process() is not None:
            return parent
        uwsgi = sys.modules.get("uwsgi")
        if uwsgi is not None and hasattr(uwsgi, "masterpid") and uwsgi.masterpid() > 0:
            return int(uwsgi.masterpid())
    return os.getpid()


def python_executable() -> str:
    """The Python interpreter to run the state server with.

    Usually ``sys.executable``; under uWSGI that is the uwsgi binary, so look
    for the interpreter of this environment instead.
    """
    if os.path.basename(sys.executable).startswith(("python", "pypy")):
        return sys.executable
    version = sys.version_info
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix)):
        for name in (f"python{version.major}.{version.minor}", f"python{version.major}", "python"):
            candidate = os.path.join(prefix, "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    raise SharedStateUnavailable(
        f"cannot find a Python interpreter to run the state server ({sys.executable} is"
        f" not one, nor is there a python in {sys.prefix}/bin)."
    )


class ServerLauncher:
    """Elect, start and describe the state server of one app's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.address
        self._key: bytes | None = settings.key
        self._key_lock = threading.Lock()

    def arguments(self, owner: int | None) -> list[str]:
        """The command-line arguments of ``python -m flask_sharedstate.server`` for this app."""
        settings = self.settings
        if settings.tcp is None:
            arguments = ["--unix", settings.socket_path]
        else:
            host, port = settings.tcp
            arguments = ["--tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        if owner is not None:
            arguments += ["--owner-pid", str(owner)]
            start = processes.start_time(owner)
            if start is not None:  # unknown: the server watches the pid alone
                arguments += ["--owner-start", start]
        arguments += ["--pid-file", settings.run_base + ".pid"]
        arguments += ["--max-connections", str(settings.max_connections)]
        arguments += ["--max-connections-per-peer", str(settings.max_connections_per_peer)]
        if settings.persist_path is not None:
            arguments += ["--persist", settings.persist_path, "--fsync", settings.fsync]
        return arguments

    def remove_stale_socket(self) -> None:
        """Remove the socket file of a dead server; call only while holding the election."""
        if self.settings.tcp is None:
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass

    @contextlib.contextmanager
    def election(self, deadline: float) -> Iterator[None]:
        """Hold the address's election lock (an flock, dropped by the kernel if we die)."""
        import fcntl  # not on Windows, where config.py refuses the manager backend

        fd = os.open(self.settings.run_base + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SharedStateUnavailable(
                            f"another process has been starting the state server at"
                            f" {self.address} for longer than SHAREDSTATE_TIMEOUT"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the flock

    def start(self, key: bytes, deadline: float, owner: int | None = None) -> None:
        """Start a detached server owned by ``owner`` (default: :func:`owner_process`).

        Call while holding :meth:`election`, after finding that nobody listens.
        Returns once the server listens (or another one was found listening);
        raises :exc:`SharedStateUnavailable` with the server's own words otherwise.
        """
        settings = self.settings
        if owner is None:
            owner = owner_process()
        command = [python_executable(), "-m", "flask_sharedstate.server"]
        command += [*self.arguments(owner), "--detach"]
        package_root = os.path.dirname(os.path.dirname(__file__))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        log = os.fdopen(_open_private(settings.run_base + ".log", os.O_WRONLY | os.O_APPEND), "ab")
        ready_r, ready_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [*command, "--ready-fd", str(ready_w)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(ready_w,),
                close_fds=True,
                start_new_session=True,
                cwd="/",
                env=env,
            )
        finally:
            log.close()
            os.close(ready_w)
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(key)
                proc.stdin.close()
            except BrokenPipeError:  # it exited first: its ready line (or none) says why
                pass
            line = self._read_ready(ready_r, deadline)
        finally:
            os.close(ready_r)
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if line.startswith("ready") or line == "in-use":
            return  # in use: some other process listens there; connect to it
        reason = line.removeprefix("error ").rstrip(".") or "it exited without a word"
        raise SharedStateUnavailable(
            f"could not start the state server at {self.address}: {reason}."
            f" See {settings.run_base}.log."
        )

    @staticmethod
    def _read_ready(fd: int, deadline: float) -> str:
        data = b""
        poller = select.poll()  # not select(): the starter may hold descriptors past 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return "error it did not say it was ready in time"
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()

    # -- the key ---------------------------------------------------------------------

    def key(self) -> bytes:
        """The auth key: SHAREDSTATE_KEY, derived, or read from (or created in) the key file."""
        self._private_folder()
        if self._key is not None:
            return self._key
        with self._key_lock:
            if self._key is None:
                self._key = _read_or_create_key(self.settings.key_file)
            return self._key

    def _private_folder(self) -> None:
        """Make sure the folder of the socket (or TCP) files exists and is this user's alone.

        Another user who can write there could plant a symlink where the server
        writes its pid file or log, or put up a socket of their own.
        """
        settings = self.settings
        folder = os.path.dirname(settings.run_base)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the folder {folder} for the state server's socket:"
                f" {exc.strerror}. Set SHAREDSTATE_SOCKET to a path in a writable folder."
            ) from None
        info = os.lstat(folder)
        if folder == runtime_dir():
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise ConfigError(
                    f"{folder} must be a folder owned by this user with mode 0700, so that"
                    " no one else can reach the state server; remove it, or set"
                    " SHAREDSTATE_SOCKET to a path in a private folder."
                )
            return
        if stat.S_ISLNK(info.st_mode):
            problem = "is a symbolic link"
        elif not stat.S_ISDIR(info.st_mode):
            problem = "is not a folder"
        elif info.st_uid != os.getuid():
            problem = (
                f"belongs to uid {info.st_uid}, not to this process's user (uid {os.getuid()})"
            )
        elif info.st_mode & 0o022:
            problem = f"can be written by other users (mode {stat.S_IMODE(info.st_mode):04o})"
        else:
            return
        name = os.path.basename(settings.socket_path)
        if info.st_mode & 0o022 or (info.st_uid != os.getuid() and os.access(folder, os.W_OK)):
            # A shared folder such as /tmp: the socket needs a folder of its own in it.
            own = os.path.join(folder, os.path.splitext(name)[0] or "sharedstate")
            fix = (
                f"Give it a folder of its own (mkdir -m 0700 {own}, as the user the app runs"
                f" as) and set SHAREDSTATE_SOCKET = {os.path.join(own, name)!r}"
            )
        else:
            fix = (
                "Put it in a folder that only this user owns and can write (made with"
                " mkdir -m 0700, as the user the app runs as)"
            )
        raise ConfigError(
            f"SHAREDSTATE_SOCKET = {settings.socket_path!r} is not safe: its folder {folder}"
            f" {problem}, so another user could plant files where the state server writes"
            f" its socket, key, pid file and log. {fix}, or unset SHAREDSTATE_SOCKET to use"
            " the private default."
        )


def _open_private(path: str, flags: int) -> int:
    """Open (creating it 0600) a file of the server's, never through a symbolic link."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SharedStateUnavailable(_cannot_open(path, exc)) from None


def _cannot_open(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"{path} is a symbolic link, which the state server never follows; remove it."
    return f"cannot open {path}: {exc.strerror}."


def _read_or_create_key(path: str) -> bytes:
    """Read the key file, or create it (0600, atomically) with a random key."""
    for _ in range(50):
        try:
            with open(path, "rb", opener=_no_symlink) as f:
                info = os.fstat(f.fileno())
                if info.st_uid != os.getuid() or info.st_mode & 0o077:
                    raise ConfigError(
                        f"the key file {path} must be owned by this user with mode 0600;"
                        " remove it, or set SHAREDSTATE_KEY."
                    )
                key = f.read()
            if key:
                return key
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"cannot use the key file: {_cannot_open(path, exc)} Or set SHAREDSTATE_KEY."
            ) from None
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(32).hex().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # fails if another process was first
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        finally:
            os.unlink(temporary)
    raise SharedStateUnavailable(f"cannot read the key file {path}")


def _no_symlink(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
