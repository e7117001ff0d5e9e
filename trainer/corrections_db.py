"""The corrections database as a file: connecting, the schema and its version, and the
migration of a version-1 store. :mod:`trainer.corrections` builds the store on it."""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image INTEGER NOT NULL,
    parent INTEGER,
    action TEXT NOT NULL,
    mask BLOB,
    time REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_image ON entries (image);
CREATE TABLE IF NOT EXISTS cursors (image INTEGER PRIMARY KEY, entry INTEGER);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY AUTOINCREMENT, image INTEGER, what TEXT, entry INTEGER, time REAL);
"""
"""``image`` in entries, cursors and log is an ``images.id``; the dataset's rows are found
by ``images.key``. (Version 1 had no images table: ``image`` was the row itself.)"""


CARRIED_UP_TO = "carried_up_to_log"  # meta: all up to this log id was carried in from elsewhere


def only_carried(db: sqlite3.Connection) -> bool:
    """Whether nothing has been logged since the store was marked as holding only what was
    carried into it (:meth:`~trainer.corrections.CorrectionStore.mark_carried`)."""
    marked = db.execute("SELECT value FROM meta WHERE key=?", (CARRIED_UP_TO,)).fetchone()
    last = db.execute("SELECT MAX(id) FROM log").fetchone()[0] or 0
    return marked is not None and marked[0] == str(last)


# A file name that is not valid UTF-8 (bytes Python keeps as surrogates) cannot be
# stored as SQLite text; it is stored as its bytes in hex after a NUL, which no file
# name holds, and read back to the same name.
_BYTES_KEY = "\0bytes:"


def db_key(key: str) -> str:
    """An image key as the database stores it."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return _BYTES_KEY + key.encode("utf-8", "surrogateescape").hex()


def key_of(stored: str) -> str:
    """The image key a stored one stands for (the inverse of :func:`db_key`)."""
    if stored.startswith(_BYTES_KEY):
        return bytes.fromhex(stored[len(_BYTES_KEY) :]).decode("utf-8", "surrogateescape")
    return stored


class CorrectionsError(RuntimeError):
    """The store cannot be opened or does not belong to this dataset."""


@contextmanager
def transaction(db: sqlite3.Connection):
    """One write transaction: committed when the block ends, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """WAL and ``synchronous=FULL`` for a writer: a reader never waits for it, and an
    action that returned survives a crash or a power cut."""
    if readonly:
        return sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None, check_same_thread=False
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def open_schema(
    db: sqlite3.Connection,
    path: Path,
    keys: list[str],
    by_name: bool,
    content_hash: str | None,
    readonly: bool,
) -> bool:
    """Create the schema, check that an existing store belongs to this dataset, or
    migrate a version-1 store. Returns True when the store is a version-1 store read as
    it is (a reader does not migrate: its rows are positions)."""
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if has_meta else {}
    mode = "name" if by_name else "content"
    version = int(meta.get("schema_version", 1)) if meta else None
    if version is not None and version > SCHEMA_VERSION:
        raise CorrectionsError(
            f"{path}: written by a newer marsviewer (corrections schema {version}; this "
            f"version reads up to {SCHEMA_VERSION}); upgrade marsviewer to open it"
        )
    if version is None:
        if readonly:
            raise CorrectionsError(f"{path}: not a corrections database (no meta table)")
        db.executescript(SCHEMA)
        rows = [("schema_version", str(SCHEMA_VERSION)), ("keyed_by", mode)]
        if not by_name:
            rows.append(("dataset_hash", str(content_hash)))
        with transaction(db):
            db.executemany("INSERT INTO meta VALUES (?, ?)", rows)
        return False
    stored_mode = meta.get("keyed_by", "content")  # version 1: rows by position under a hash
    if stored_mode == "content" and (
        (version > 1 and by_name) or content_hash is None or meta.get("dataset_hash") != content_hash
    ):
        raise CorrectionsError(
            f"{path}: these corrections belong to another dataset "
            f"(hash {meta.get('dataset_hash')}, this dataset {content_hash})"
        )
    if stored_mode == "name" and not by_name:
        raise CorrectionsError(
            f"{path}: these corrections find images by name (a folder or zarr "
            "dataset); this dataset has no lasting names"
        )
    if version == 1 and not readonly:
        _migrate_v1(db, path, keys, mode)
    return version == 1 and readonly


def _migrate_v1(db: sqlite3.Connection, path: Path, keys: list[str], mode: str) -> None:
    """Version 1 -> 2 in one transaction: each row ``r`` becomes images.id ``r`` with its
    key, so entries, cursors and log keep their numbers."""
    db.executescript(SCHEMA)
    with transaction(db):
        used = {
            r[0]
            for table in ("entries", "cursors", "log")
            for r in db.execute(f"SELECT DISTINCT image FROM {table}")  # noqa: S608
            if r[0] is not None
        }
        bad = sorted(i for i in used if not 0 <= i < len(keys))
        if bad:
            raise CorrectionsError(f"{path}: rows {bad[:3]} are outside this dataset; not migrated")
        db.executemany(
            "INSERT INTO images (id, key) VALUES (?, ?)", [(i, db_key(keys[i])) for i in sorted(used)]
        )
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("schema_version", str(SCHEMA_VERSION)), ("keyed_by", mode), ("migrated", str(time.time()))],
        )
