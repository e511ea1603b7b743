"""Cross-worker locks: the study-wide admission lock (a file lock on SQLite, an advisory lock on
PostgreSQL) and a self-removing file lock."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import sqlalchemy as sa

from .storage_url import normalise_url, sqlite_path

__all__ = ["LOCK_WAIT_S", "admission_lock", "sqlite_lock_path", "locked_file"]

log = logging.getLogger("ktg_fast.search")

LOCK_WAIT_S = 120  # how long a worker waits for the cross-worker lock before going on without it


@contextlib.contextmanager
def admission_lock(storage: Any, url: str, name: str, *, wait_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """Serialise a short critical section across every worker of a study.

    SQLite: an ``flock`` on a file beside the database (removed on release).  PostgreSQL: a
    session advisory lock (released by the server if the worker dies).  Other
    backends, or a lock not obtained within ``wait_s``: no lock (yields False),
    with a warning.
    """
    key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
    lock_path = sqlite_lock_path(url, name)
    if lock_path is not None:
        with locked_file(lock_path, wait_s=wait_s) as got:
            if not got:
                log.warning("could not lock %s within %.0f s; going on without it", lock_path, wait_s)
            yield got
        return
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield False
        return
    with engine.connect() as conn:
        got = _wait(lambda: bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()),
                    wait_s)
        conn.commit()
        if not got:
            log.warning("could not take the study's advisory lock within %.0f s; going on without it", wait_s)
        try:
            yield got
        finally:
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def sqlite_lock_path(url: str, name: str) -> Optional[Path]:
    """The lock file of study ``name`` in an SQLite storage (None for other storages)."""
    path = sqlite_path(normalise_url(url))
    if path is None:
        return None
    return path.with_name(path.name + f".{hashlib.sha1(name.encode()).hexdigest()[:8]}.lock")


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
            got = _wait(lambda: _try_flock(fd), max(0.0, deadline - time.monotonic()))
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


def _wait(try_once: Callable[[], bool], wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        if try_once():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
