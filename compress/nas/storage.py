"""Optuna storage for a NAS run: SQLite for one process, a journal file for a few, a database server for many."""

from __future__ import annotations

import inspect
import os
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

DEFAULT_SQLITE_NAME = "optuna.db"
DEFAULT_JOURNAL_NAME = "optuna.journal.log"
JOURNAL_PREFIX = "journal:"
_JOURNAL_SUFFIXES = (".log", ".journal")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

# Seconds SQLite waits on a locked database before failing; several readers (a dashboard, a
# second worker, the front writer) must not crash a long run.
SQLITE_BUSY_TIMEOUT_S = 60

# Opening a new database from several workers at once is retried this many times (see _rdb_storage).
_INIT_ATTEMPTS = 6
_SCHEMA_RACE_HINTS = ("already exists", "unique constraint", "duplicate", "database is locked")

_DESCRIPTIONS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def stale_trial_retry(max_retry: int | None) -> Callable[[optuna.Study, Any], None]:
    """Return Optuna's callback that re-enqueues a trial whose worker died (renamed in Optuna 4.9)."""
    import optuna
    import optuna.storages as storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def describe_storage(storage: BaseStorage) -> str:
    """Return a printable description of a storage made by make_storage (passwords hidden)."""
    return _DESCRIPTIONS.get(storage, type(storage).__name__)


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """Return whether the storage records heartbeats, so Optuna itself fails trials of dead workers."""
    get_interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(get_interval) and get_interval() is not None


def _journal_storage(path: Path) -> BaseStorage:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The open-lock (an O_EXCL lock file) works on every OS and NFS v3+; the symlink lock needs symlink rights.
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    storage = optuna.storages.JournalStorage(backend)
    _DESCRIPTIONS[storage] = f"journal:{path}"
    return storage


# A bare dialect name whose default driver is missing may still be served by another installed driver.
_DRIVER_FALLBACKS = {"postgresql": "postgresql+psycopg2"}


def _driver_importable(parsed: Any) -> bool:
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        return False
    return True


def _parse_rdb_url(url: str) -> tuple[Any, str]:
    """The SQLAlchemy URL of a database storage and the URL to open (a bare dialect moved to an installed driver);
    one line when it cannot be parsed, its scheme is unknown or its driver is missing. Opens nothing."""
    from sqlalchemy.engine import make_url  # with optuna: a database storage only
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError  # with optuna: a database storage only

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigError(f"storage URL {url!r} cannot be parsed: {exc}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(
            f"unknown storage scheme {parsed.drivername!r} in "
            f"{parsed.render_as_string(hide_password=True)!r}; "
            "expected a path to a .db/.log file, 'journal:<path>', 'sqlite:///<path>', "
            "'postgresql://user:pass@host/db' or another SQLAlchemy database URL"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        fallback = _DRIVER_FALLBACKS.get(parsed.drivername)
        if fallback is None or not _driver_importable(parsed.set(drivername=fallback)):
            raise MissingDependencyError(
                f"the database driver for {parsed.drivername!r} is not installed ({exc}); "
                "install it (PostgreSQL: pip install psycopg2-binary or psycopg)"
            ) from None
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; psycopg2 serves the same URL.
        parsed = parsed.set(drivername=fallback)
        url = parsed.render_as_string(hide_password=False)
    return parsed, url


def _rdb_storage(url: str, heartbeat_interval: int, grace_period: int, max_retry: int | None) -> BaseStorage:
    import optuna
    import sqlalchemy  # with optuna: a database storage only

    parsed, url = _parse_rdb_url(url)
    backend = parsed.get_backend_name()
    engine_kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        # Long trials leave pooled connections idle for hours; servers close them meanwhile.
        engine_kwargs["pool_pre_ping"] = True

    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
    retry = stale_trial_retry(max_retry)
    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage.__init__).parameters:
        kwargs["heartbeat_stale_trial_callback"] = retry
    else:
        kwargs["failed_trial_callback"] = retry
    for attempt in range(_INIT_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
                break
            except sqlalchemy.exc.DBAPIError as exc:
                # Workers starting together on a new database race to create Optuna's tables; the
                # losers find them half made. Once the winner is done, opening again succeeds.
                if _is_schema_race(exc) and attempt + 1 < _INIT_ATTEMPTS:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                if isinstance(exc, sqlalchemy.exc.OperationalError):
                    raise ConfigError(
                        f"cannot open the study database {parsed.render_as_string(hide_password=True)!r}: "
                        f"{str(exc.orig).strip()}; check that the server runs and the URL, user and database exist"
                    ) from None
                raise
    if backend == "sqlite":
        # WAL lets readers (dashboards, other workers) proceed while a trial is written, and
        # synchronous=NORMAL avoids an fsync per commit; a crash of the process still loses nothing.
        sqlalchemy.event.listen(storage.engine, "connect", _tune_sqlite_connection)
        storage.engine.dispose()
    _DESCRIPTIONS[storage] = parsed.render_as_string(hide_password=True)
    return storage


def _is_schema_race(exc: Exception) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return any(hint in text for hint in _SCHEMA_RACE_HINTS)


def _tune_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_storage(
    url_or_path: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str],
    *,
    heartbeat_interval: int = 10,
    grace_period: int = 60,
    max_retry: int | None = 2,
) -> BaseStorage:
    """Return the Optuna storage named by a URL or path, defaulting to `sqlite:///<run_dir>/optuna.db`.

    `journal:<path>` or a path ending in .log/.journal gives a journal file shared by processes on one
    machine; `sqlite:///...`, a .db path or any SQLAlchemy URL (e.g. `postgresql://...`) gives an RDB
    storage with heartbeats, so trials of a killed worker are failed and re-enqueued (at most `max_retry`
    times) by the surviving workers.
    """
    kind, where = _storage_kind(url_or_path, Path(run_dir))
    if kind == "journal":
        return _journal_storage(where)
    return _rdb_storage(where, heartbeat_interval, grace_period, max_retry)


def check_storage(url_or_path: str | os.PathLike[str] | None, key: str = "search.storage") -> None:
    """One line unless ``make_storage`` can open what ``url_or_path`` names: a known kind, a URL that parses, a
    database scheme SQLAlchemy knows with its driver installed. Creates and connects to nothing."""
    try:
        kind, where = _storage_kind(url_or_path, Path("."))
        if kind == "rdb":
            _parse_rdb_url(where)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def _storage_kind(url_or_path: str | os.PathLike[str] | None, run_dir: Path) -> tuple[str, Any]:
    """('journal', its path) or ('rdb', its SQLAlchemy URL) for what ``make_storage`` is given."""
    text = "" if url_or_path is None else os.fspath(url_or_path).strip()
    if not text:
        db = (run_dir / DEFAULT_SQLITE_NAME).expanduser().resolve()
        return "rdb", f"sqlite:///{db.as_posix()}"
    if text.startswith(JOURNAL_PREFIX):
        rest = text[len(JOURNAL_PREFIX) :].strip()
        return "journal", Path(rest) if rest else run_dir / DEFAULT_JOURNAL_NAME
    if "://" in text:
        return "rdb", text
    lower = text.lower()
    if lower.endswith(_JOURNAL_SUFFIXES):
        return "journal", Path(text)
    if lower.endswith(_SQLITE_SUFFIXES):
        db = Path(text).expanduser().resolve()
        return "rdb", f"sqlite:///{db.as_posix()}"
    raise ConfigError(
        f"cannot tell what storage {text!r} is; expected a .db/.sqlite file, a .log/.journal file, "
        "'journal:<path>', 'sqlite:///<path>' or a database URL such as 'postgresql://user:pass@host/db'"
    )
