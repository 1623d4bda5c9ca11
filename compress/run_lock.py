"""An exclusive lock on a run directory: one process works in it at a time, and a second is told who holds it.

The lock is an advisory ``flock`` on ``<run_dir>/.ffsc.lock``; the kernel releases it when its process dies, however
it dies, so a lock can never be left held by a dead process. The file names the holder (pid, host, command, start
time) so that a refusal can say who holds it, and a process that finds a name left behind by a killed run says it
takes over. The file itself stays (deleting it would let two processes hold locks on two different inodes).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import ConfigError

LOCK_NAME = ".ffsc.lock"


class RunDirBusy(ConfigError):
    """Another live process holds the run directory."""


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder: dict[str, Any]) -> str:
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"process {holder.get('pid', '?')}{where}{command}, since {holder.get('since', '?')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirLock:
    """Hold ``run_dir`` exclusively (a context manager); ``say`` gets the one line printed on a take-over."""

    def __init__(self, run_dir: str | os.PathLike, say: Callable[[str], None] = print, resumes: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.say = say
        self.resumes = resumes  # work there resumes where a stopped process left it (a run), or starts over (a prune)
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock, or raise RunDirBusy naming the live process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                resume = " (a run resumes where it stopped)" if self.resumes else ""
                raise RunDirBusy(f"run directory {self.run_dir} is in use by {_describe(_read(fd))}; wait for it to "
                                 f"end, or stop it, and run again{resume}")
            left = _read(fd)
            if left.get("pid") and not (left.get("pid") == os.getpid() and left.get("host") == socket.gethostname()):
                resume = "; resuming from what it saved" if self.resumes else ""
                self.say(f"run directory {self.run_dir}: taking over the lock left by {_describe(left)} (no longer "
                         f"running){resume}")
            _write(fd, _holder())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder's name and let go (the file stays; see the module docstring)."""
        if self._fd is None:
            return
        try:
            _write(self._fd, {})
        finally:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        data = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode() if holder else b"")
    os.fsync(fd)


try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # no flock (Windows): the recorded pid decides, which is right unless two start at once
    def _try_lock(fd: int) -> bool:
        holder = _read(fd)
        pid = holder.get("pid")
        return not (isinstance(pid, int) and pid != os.getpid() and holder.get("host") == socket.gethostname()
                    and _pid_alive(pid))

    def _unlock(fd: int) -> None:
        return None
