"""One run at a time per (output folder, output name): a lock file held by the operating system for the run.

`<output_dir>/.<name>.lock` is locked with the OS's own file lock (flock on POSIX, msvcrt on Windows) while a run
trains and saves, and holds who took it (process id, machine, start time, run id) in JSON. A second run into the
same name is refused at its start with `RunLockedError` naming that holder. The OS drops the lock when its
process ends however it ends, so a lock file left by a killed process is stale by construction: the next run
takes it over and says so.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from pathlib import Path
from typing import IO, Iterator

logger = logging.getLogger(__name__)
WINDOWS_LOCK_OFFSET = 1 << 30  # Windows locks a byte range; one far past the holder's JSON keeps that readable


class RunLockedError(ValueError):
    """Another run is writing the same output name; the message names it and what to do."""


def lock_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / f".{name}.lock"


def _try_lock(file: IO) -> bool:
    """Takes the OS lock on the open file without waiting; False when another process (or run) holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            file.seek(WINDOWS_LOCK_OFFSET)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError on POSIX, PermissionError on Windows
        return False
    return True


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} (run {info['run']}, started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _open_locked(path: Path) -> IO:
    """The lock file, open and locked by us; loops when the file was replaced between open and lock."""
    while True:
        file = open(path, "a+", encoding="utf-8")
        if not _try_lock(file):
            file.seek(0)
            holder = _holder(file.read())
            file.close()
            raise RunLockedError(
                f"output.output_name: {path.name[1:-5]!r} in {path.parent} is being trained by {holder}; wait for "
                f"it to finish, stop it, or choose another output.output_name (if no such run exists, delete {path})")
        if os.name == "nt" or os.path.exists(path) and os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
            return file
        file.close()  # the holder removed the file meanwhile: lock the new one


@contextlib.contextmanager
def held(output_dir: Path, name: str, run_id: str) -> Iterator[Path]:
    """Holds the (output_dir, name) lock for the block; yields the lock file's path.

    Raises:
        RunLockedError: another live run holds it.
    """
    path = lock_path(output_dir, name)
    file = _open_locked(path)
    try:
        file.seek(0)
        stale = file.read().strip()
        if stale:
            logger.warning("taking over the lock of %s, which ended without releasing it", _holder(stale))
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().replace(microsecond=0).isoformat()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run_id, "started": started}))
        file.flush()
        yield path
    finally:
        if os.name != "nt":
            with contextlib.suppress(OSError):
                os.unlink(path)  # before closing, so that nobody locks a file about to vanish
        file.close()
        if os.name == "nt":
            with contextlib.suppress(OSError):
                os.unlink(path)


def check_free(output_dir: Path, name: str) -> None:
    """Raises RunLockedError now when a run holds (output_dir, name); nothing is created when none does."""
    path = lock_path(output_dir, name)
    if path.is_file():
        _open_locked(path).close()  # closing the file drops the OS lock
