"""File locks: a self-removing ``flock`` (:func:`locked_file`) and the lock that keeps one training
run at a time writing to an output folder (:func:`folder_lock`)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["RUN_LOCK", "FolderBusyError", "folder_lock", "locked_file", "poll_until"]

RUN_LOCK = ".ktg-run.lock"  # in a training run's --out while a process writes to it


class FolderBusyError(RuntimeError):
    """Another process holds an output folder's run lock; the message names the folder and the process."""


@contextlib.contextmanager
def folder_lock(folder: Path, *, what: str = "training run", else_: Optional[str] = "choose another --out folder",
                name: str = RUN_LOCK) -> Iterator[None]:
    """Hold ``folder``'s run lock (file ``name``, removed on release) or fail at once.

    ``what`` names the holder in the message, ``else_`` the way out besides waiting (None: none).

    Two runs writing one folder would interleave their checkpoints and metrics; the second is refused
    instead of waiting, since a run takes hours.  The lock is an ``flock``: a killed holder releases it,
    and the file a kill leaves behind is taken over by the next run.

    Raises:
        FolderBusyError: another process holds the lock (its process id is named where it wrote it).
    """
    path = Path(folder) / name
    with locked_file(path, wait_s=0) as got:
        if not got:
            try:
                pid = path.read_text().strip()
            except OSError:
                pid = ""
            who = f" (process {pid})" if pid.isdigit() else ""
            raise FolderBusyError(f"another {what} is writing to {folder}{who}: wait for it to finish or stop it"
                                  + (f", or {else_}" if else_ else ""))
        try:
            path.write_text(f"{os.getpid()}\n")  # the same inode we hold: for the message above
        except OSError:
            pass
        yield


@contextlib.contextmanager
def locked_file(path: Path, *, wait_s: Optional[float] = None) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` and remove the file when done: no lock file stays behind.

    The holder unlinks the file before unlocking; a process that meanwhile
    locked the unlinked inode notices it is no longer at ``path`` and tries
    again, so two processes never hold the lock at once.  ``wait_s`` None
    waits as long as it takes; otherwise yields False when not obtained in
    time (the file is then left alone).
    """
    deadline = None if wait_s is None else time.monotonic() + wait_s
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            got = True
        else:
            got = poll_until(lambda: _try_flock(fd), max(0.0, deadline - time.monotonic()))
        if not got:
            os.close(fd)
            yield False
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file: lock the new one
    try:
        yield True
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)  # (closing releases the lock)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def poll_until(try_once: Callable[[], bool], wait_s: float) -> bool:
    """Call ``try_once`` until it returns True (then True) or ``wait_s`` seconds pass (then False);
    it is called at least once, with a backoff from 10 ms to 0.5 s between calls."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        if try_once():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
