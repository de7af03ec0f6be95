"""Process identity and owner watching, on each platform's own terms.

A process is named by its pid *and* its start time, since pids are reused.
Where the start time cannot be read it is *unknown*, and an unknown answer is
never "gone": only ``kill(pid, 0)`` failing with ``ESRCH``, a zombie, or a
known start time that changed says a process is gone.

The platform part is a few functions, chosen once by what the system has:

============  ==============================  ===================================
question      Linux                           macOS, the BSDs (no ``/proc``)
============  ==============================  ===================================
start time    ``/proc/PID/stat`` (ticks)      ``ps -o stat=,lstart= -p PID``
command line  ``/proc/PID/cmdline``           ``ps -o command= -p PID``
owner's exit  ``os.pidfd_open`` + ``select``  ``select.kqueue``, ``KQ_NOTE_EXIT``
============  ==============================  ===================================

Where neither exit watch exists (or opening one fails: descriptors run out),
:class:`OwnerWatch` polls: the pid, then its start time. Windows has none of
this: the ``manager`` backend is refused there (``config.py``), so nothing
here runs on it.
"""

from __future__ import annotations

import calendar
import os
import select
import shutil
import subprocess
import sys
import time

#: How long a ``ps`` may take before its answer is "unknown".
PS_TIMEOUT = 5.0


class ProcSource:
    """Linux: read ``/proc``."""

    name = "proc"

    def status(self, pid: int) -> tuple[str, bool] | None:
        """``(start time, is a zombie)`` of ``pid``, or None if unknown (gone, or unreadable)."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            # The command name (field 2) may contain spaces and parentheses.
            fields = stat[stat.rindex(b")") + 2 :].split()
            return f"proc:{fields[19].decode()}", fields[0] in (b"Z", b"X")
        except (OSError, ValueError, IndexError):
            return None

    def command_line(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return None

    def start_time(self, pid: int) -> str | None:
        status = self.status(pid)
        return None if status is None or status[1] else status[0]


class PsSource(ProcSource):
    """macOS and the BSDs: ask ``ps``, which reads the kernel's process table there."""

    name = "ps"

    def _ps(self, pid: int, fields: str) -> str | None:
        # C locale and UTC: the same process reads the same, whoever asks.
        env = {"LC_ALL": "C", "TZ": "UTC0", "PATH": os.environ.get("PATH", os.defpath)}
        try:
            result = subprocess.run(
                [shutil.which("ps") or "/bin/ps", "-o", fields, "-p", str(pid)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=env,
                timeout=PS_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        output = result.stdout.decode(errors="replace").strip()
        return output if result.returncode == 0 and output else None

    def status(self, pid: int) -> tuple[str, bool] | None:
        output = self._ps(pid, "stat=,lstart=")
        if output is None:
            return None
        state, *lstart = output.split()
        try:  # "Sun Nov 29 03:09:54 2026"; whole seconds
            started = calendar.timegm(time.strptime(" ".join(lstart), "%a %b %d %H:%M:%S %Y"))
        except ValueError:
            return None
        return f"ps:{started}", state.startswith("Z")

    def command_line(self, pid: int) -> str | None:
        return self._ps(pid, "command=")


proc_source = ProcSource()
ps_source = PsSource()
#: Chosen once: /proc where the system has it, else ps.
source: ProcSource = proc_source if os.path.exists("/proc/self/stat") else ps_source


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` (an opaque string), or None if unknown.

    Together with the pid it names one process, even after the pid is reused.
    """
    return source.start_time(pid)


def command_line(pid: int) -> str | None:
    """The command line of ``pid``, its arguments joined by spaces, or None if unknown."""
    return source.command_line(pid)


def _same_start(known: str, now: str) -> bool:
    kind, _, value = known.partition(":")
    now_kind, _, now_value = now.partition(":")
    if kind != now_kind:
        return True  # read from different sources: that tells nothing
    if kind == "ps":  # whole seconds, computed from the boot time: allow its rounding
        try:
            return abs(int(value) - int(now_value)) <= 1
        except ValueError:
            return True
    return value == now_value


def process_gone(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``, if known) is known to be gone.

    Only a definite answer counts: no such pid, a zombie, or another start time.
    Anything unknown (no ``/proc``, no ``ps``, no descriptors) answers False.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # EPERM: it exists, as someone else's
    status = source.status(pid)
    if status is None:
        return False
    now, zombie = status
    return zombie or (start is not None and not _same_start(start, now))


class OwnerWatch:
    """Wait for one process to be gone, by polling (the last resort).

    :meth:`wait` returns True once the process is known gone. Subclasses see
    the exit at once, where the kernel can tell.
    """

    kind = "polling"

    def __init__(self, pid: int, start: str | None) -> None:
        self.pid = pid
        self.start = start
        self.gone = process_gone(pid, start)

    def wait(self, timeout: float) -> bool:
        if not self.gone:
            time.sleep(timeout)
            self.gone = process_gone(self.pid, self.start)
        return self.gone

    def close(self) -> None:
        pass


# Each exit watch is defined where typeshed says the system has it, so that mypy
# checks each block with its --platform (linux; darwin, freebsd) and skips it elsewhere.
if sys.platform == "linux":

    class PidfdWatch(OwnerWatch):
        """Linux 5.3+: a pidfd becomes readable when the process exits."""

        kind = "pidfd"

        def __init__(self, pid: int, start: str | None) -> None:
            self.fd: int | None = None
            try:
                self.fd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass  # gone already: the check below says so
            # Checked after opening, so the pidfd names the owner and not a successor.
            super().__init__(pid, start)

        def wait(self, timeout: float) -> bool:
            if self.fd is None:  # it was gone at open, yet the pid lives: a successor; poll
                return super().wait(timeout)
            if not self.gone:
                readable, _, _ = select.select([self.fd], [], [], timeout)
                self.gone = bool(readable)
            return self.gone

        def close(self) -> None:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


if sys.platform != "linux" and sys.platform != "win32":

    class KqueueWatch(OwnerWatch):
        """macOS and the BSDs: a kqueue reports ``NOTE_EXIT`` of the process."""

        kind = "kqueue"

        def __init__(self, pid: int, start: str | None) -> None:
            self.queue = select.kqueue()
            self.registered = False
            try:
                event = select.kevent(
                    pid,
                    filter=select.KQ_FILTER_PROC,
                    flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                    fflags=select.KQ_NOTE_EXIT,
                )
                self.queue.control([event], 0, 0)
                self.registered = True
            except ProcessLookupError:
                pass  # gone already: the check below says so
            except OSError:
                self.queue.close()
                raise
            super().__init__(pid, start)

        def wait(self, timeout: float) -> bool:
            if not self.registered:  # it was gone at registration, yet the pid lives; poll
                return super().wait(timeout)
            if not self.gone:
                self.gone = bool(self.queue.control(None, 1, timeout))
            return self.gone

        def close(self) -> None:
            self.queue.close()


#: The ways to watch, best first, as this system offers them.
WATCHES: list[type[OwnerWatch]] = []
if sys.platform == "linux" and hasattr(os, "pidfd_open"):  # Linux 5.3+
    WATCHES.append(PidfdWatch)
if sys.platform != "linux" and sys.platform != "win32" and hasattr(select, "kqueue"):
    WATCHES.append(KqueueWatch)


def watch(pid: int, start: str | None) -> OwnerWatch:
    """Watch process ``pid`` with the best means that works here; polling at worst."""
    for kind in WATCHES:
        try:
            return kind(pid, start)
        except OSError:  # no descriptor left, or a kernel without it: try the next
            continue
    return OwnerWatch(pid, start)
