"""Cross-worker locks: the study-wide admission lock (a file lock on SQLite, an advisory lock on
PostgreSQL); the self-removing file lock itself is :func:`ktg_fast.locks.locked_file`."""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import sqlalchemy as sa

from ..locks import locked_file, poll_until
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
        got = poll_until(lambda: bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()),
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
