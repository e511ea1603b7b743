"""Opening Optuna storages, with clear errors and heartbeats; the SQLite study file's upkeep.

The embedded default is an SQLite file ``<out>/study.db`` in WAL mode with a
long lock timeout, which several worker processes on one machine share safely;
``--storage URL`` takes any SQLAlchemy URL Optuna's RDB storage accepts
(PostgreSQL for many machines).  Every storage records trial heartbeats, so a
trial whose worker died is failed after the grace period and re-queued.  URLs are read in
:mod:`.storage_url`, the cross-worker locks are in :mod:`.locks` (both re-exported here).
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
import sqlalchemy.exc

from .locks import LOCK_WAIT_S, admission_lock, locked_file, sqlite_lock_path
from .space import SearchError
from .storage_url import default_storage_url, mask_url, normalise_url, sqlite_path

__all__ = ["default_storage_url", "open_storage", "mask_url", "admission_lock", "sqlite_path", "sqlite_lock_path",
           "locked_file", "storage_errors", "damaged_message"]

log = logging.getLogger("ktg_fast.search")

SQLITE_TIMEOUT_S = 120  # how long a writer waits for the SQLite lock before failing


def open_storage(url: str, *, heartbeat: Optional[int] = None, grace: Optional[int] = None,
                 retry_callback: Any = None) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url``; unreachable or malformed URLs raise :class:`SearchError`.

    Args:
        url: SQLAlchemy URL; an SQLite file is created (with its folder) and switched to WAL mode.
        heartbeat: seconds between a running trial's heartbeats (None: no heartbeats; readers only).
        grace: seconds without a heartbeat after which a running trial is failed (default 2 x heartbeat).
        retry_callback: called with (study, trial) for each trial failed that way.
    """
    shown = mask_url(url)  # messages name the URL as the user gave it
    url = normalise_url(url)
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    backend = url.split(":", 1)[0].split("+", 1)[0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 15}
        engine_kwargs["pool_pre_ping"] = True
    kw: dict[str, Any] = {}
    if heartbeat:
        kw = {"heartbeat_interval": int(heartbeat), "grace_period": int(grace) if grace else None,
              "heartbeat_stale_trial_callback": retry_callback}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if path is not None:  # the first creation of the tables, one process at a time
                with locked_file(path.with_name(path.name + ".init.lock"), wait_s=LOCK_WAIT_S):
                    _enable_wal(path)
                    return _create_rdb(url, engine_kwargs, kw)
            return _create_rdb(url, engine_kwargs, kw)
    except sqlalchemy.exc.DatabaseError as e:
        if path is not None and _is_damage(e):
            raise SearchError(damaged_message(path, e)) from None
        if not isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            raise SearchError(f"cannot set up the study tables in {shown}: {_first_line(e)}") from None
        raise SearchError(f"cannot reach storage {shown}: {_first_line(e)}; check that the server is running and "
                          "the URL's user, host, port and database are right") from None
    except sqlalchemy.exc.InterfaceError as e:
        raise SearchError(f"cannot reach storage {shown}: {_first_line(e)}; check that the server is running and "
                          "the URL's user, host, port and database are right") from None
    except sqlalchemy.exc.ArgumentError as e:
        raise SearchError(f"--storage {shown} is not a usable database URL ({e}): use "
                          "sqlite:///path/study.db or postgresql://user@host:port/database") from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise SearchError(f"--storage {shown}: SQLAlchemy has no dialect {backend!r}; use sqlite or "
                          "postgresql") from None
    except ImportError as e:  # Optuna re-raises a missing driver as a plain ImportError
        cause = e if isinstance(e, ModuleNotFoundError) else e.__cause__
        name = getattr(cause, "name", None) or "a database driver"
        hint = {"psycopg": "'psycopg[binary]' (or write postgresql+psycopg2:// and pip install psycopg2-binary)",
                "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient (or write mysql+pymysql:// and pip install "
                                                          "pymysql)"}.get(str(name), str(name))
        raise SearchError(f"--storage {shown} needs the Python package {name!r}: pip install {hint}") from None
    except SearchError:
        raise
    except (ValueError, RuntimeError) as e:
        raise SearchError(f"cannot open storage {shown}: {e}") from None


CREATE_ATTEMPTS = 10  # tries at creating the tables while another process creates them too


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_creation_race(e: BaseException) -> bool:
    """An error of two processes creating the same tables at once (seen on SQLite and PostgreSQL)."""
    text = str(getattr(e, "orig", e)).lower()
    return isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in text or "duplicate" in text


def _create_rdb(url: str, engine_kwargs: dict[str, Any], kw: dict[str, Any]) -> Any:
    """``RDBStorage(url)``, retried when another process is creating the same tables right now."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kw)
        except sqlalchemy.exc.DatabaseError as e:
            if not _is_creation_race(e) or attempt == CREATE_ATTEMPTS - 1:
                raise
            log.debug("storage tables created by another process meanwhile (%s); retrying", _first_line(e))
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _is_damage(e: BaseException) -> bool:
    """A damaged (or not-SQLite) database file, as opposed to a busy or unreachable one."""
    orig = getattr(e, "orig", e)
    text = str(orig).lower()
    return ("malformed" in text or "not a database" in text or
            (isinstance(orig, sqlite3.DatabaseError) and not isinstance(orig, sqlite3.OperationalError)))


def damaged_message(path: Path, e: BaseException) -> str:
    """One line: the study file is damaged, what SQLite said, and how to go on."""
    return (f"the study file {path} is damaged (SQLite: {_first_line(e)}): restore it from a backup; to start "
            f"over deliberately, move {path} and the trial folders of {path.parent / 'trials'} aside, or use "
            "another --out")


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a damaged SQLite study file met while reading or writing the study into one :class:`SearchError`."""
    try:
        yield
    except (sqlalchemy.exc.DatabaseError, sqlite3.DatabaseError) as e:
        path = sqlite_path(normalise_url(url))
        if path is None or not _is_damage(e):
            raise
        raise SearchError(damaged_message(path, e)) from None


def checkpoint_sqlite(path: Optional[Path]) -> None:
    """Fold an SQLite study's write-ahead log into ``study.db`` (a finished search's file then holds
    everything, e.g. for a copy made while this process still has connections open).  Best effort:
    a busy database keeps its log, which SQLite reads as before."""
    if path is None or not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(str(path), timeout=SQLITE_TIMEOUT_S)) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as e:
        log.debug("could not checkpoint %s: %s", path, e)


def _enable_wal(path: Path) -> None:
    """Switch an SQLite file to write-ahead logging: readers (export, dashboards) never block writers."""
    for attempt in range(20):
        try:
            con = sqlite3.connect(str(path), timeout=SQLITE_TIMEOUT_S)
            try:
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 19:
                raise SearchError(f"cannot open the study file {path}: {e}") from None
            time.sleep(0.25)
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            raise SearchError(damaged_message(path, e)) from None


