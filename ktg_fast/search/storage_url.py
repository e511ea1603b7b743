"""Storage URLs: the embedded default, hiding passwords, the SQLite file of a URL, the PostgreSQL driver."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from sqlalchemy.engine import make_url

from .space import SearchError

__all__ = ["default_storage_url", "mask_url", "sqlite_path", "normalise_url"]


def default_storage_url(out: str | os.PathLike) -> str:
    """``sqlite:///<absolute out>/study.db``."""
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and tables)."""
    try:
        u = make_url(url)
        return u.render_as_string(hide_password=True) if u.password else url
    except Exception:
        return url


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of an ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def normalise_url(url: str) -> str:
    """Pick an installed PostgreSQL driver: SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3."""
    try:
        u = make_url(url)
    except Exception:
        raise SearchError(f"--storage {url!r} is not a database URL: use sqlite:///path/study.db or "
                          "postgresql://user@host:port/database") from None
    if u.drivername == "postgresql":
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url
