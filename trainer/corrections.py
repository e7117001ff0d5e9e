"""The corrections store: edited masks and exclusions, in SQLite, never touching the dataset.

* One database per dataset, in ``<name>.marsviewer/corrections.sqlite`` beside the dataset
  when that folder is writable, else in the user's data folder keyed by the dataset's
  content hash. The database records that hash and refuses another dataset.
* Append-only history: every saved mask (zlib-compressed), exclusion, inclusion and
  restore is a row that is never changed or deleted. Each row points to the row that
  was current for its image when it was written (its parent), so the history of an image
  is a tree: undo moves the image's cursor to the parent, redo to the newest child, and
  a save after an undo starts a new branch without losing the old one.
* WAL mode and one transaction per action: a training process can read while the GUI
  writes, a reader never sees half an action, and with ``synchronous=FULL`` an action
  that returned is on disk even if the process is killed right after.
* Images are found again by key: their name for folders and zarr datasets, so images
  added to the dataset later (which moves the others' positions) orphan nothing; their
  position for npz and synthetic data, whose content hash the store records and checks.
  The store records its schema version; a store of version 1 (rows by position under a
  content hash) is migrated in place when it is opened for its unchanged dataset.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Dataset
from .store_location import dataset_hash, default_store_path, existing_store_path, keyed_by_name, row_keys

__all__ = [
    "CorrectionStore",
    "CorrectionsError",
    "Entry",
    "dataset_hash",
    "default_store_path",
    "existing_store_path",
    "keyed_by_name",
    "row_keys",
]

ACTIONS = ("mask", "restore", "exclude", "include")
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


def identity(dataset, original_masks: np.ndarray | None = None) -> dict:
    """What ties a store to ``dataset`` (a :class:`Dataset` or a
    :class:`~trainer.formats.StoredDataset`): the keyword arguments of
    :class:`CorrectionStore` but its path. A zarr dataset on disk is not hashed (it may
    be tens of GB): it is keyed by name and its masks' shapes are read from its size table."""
    by_name = keyed_by_name(dataset.source)
    if hasattr(dataset, "sizes"):  # on disk: its names are all rows'
        keys = row_keys(dataset.labelled_names, dataset.test_names)
        shapes = [tuple(int(v) for v in s) for s in dataset.sizes]
        return dict(
            content_hash=None, n=dataset.n_labelled, shape=shapes,
            n_pool=dataset.n_unlabelled, keys=keys, by_name=True,
        )  # fmt: skip
    keys = row_keys(dataset.names, dataset.test_names)
    masks = dataset.masks if original_masks is None else original_masks
    pool = 0 if dataset.test_images is None else len(dataset.test_images)
    return dict(
        content_hash=dataset_hash(dataset.images, masks), n=len(masks), shape=masks.shape[1:],
        n_pool=pool, keys=keys, by_name=by_name,
    )  # fmt: skip


class CorrectionsError(RuntimeError):
    """The store cannot be opened or does not belong to this dataset."""


@dataclass(frozen=True)
class Entry:
    id: int
    image: int
    parent: int | None
    action: str
    time: float
    note: str
    current: bool = False


class CorrectionStore:
    """Corrections of one dataset of ``n`` masks of ``shape``, and labels of its ``n_pool``
    unlabelled images: image ``n + j`` is unlabelled image ``j``. Such an image's original
    mask is "not labelled" (all background): a saved mask makes it a training image,
    restore makes it unlabelled again.

    ``keys`` (one per image, labelled then unlabelled; default: the positions) are how
    the store finds each image again. With ``by_name`` (folders, zarr datasets) they are
    the images' names and the dataset may change around them; otherwise the store is tied
    to ``content_hash`` and refuses any other content. ``shape`` is every mask's shape, or
    one shape per image for datasets of frames of several sizes.
    """

    def __init__(
        self,
        path: str | Path,
        content_hash: str | None,
        n: int,
        shape,
        readonly: bool = False,
        n_pool: int = 0,
        keys: list[str] | None = None,
        by_name: bool = False,
    ) -> None:
        self.path = Path(path)
        self.n, self.n_pool, self.by_name = n, n_pool, by_name
        shapes = list(shape) if shape and not isinstance(shape[0], (int, np.integer)) else None
        self.shape = tuple(shape) if shapes is None else None
        self._shapes = None if shapes is None else [tuple(int(v) for v in s) for s in shapes]
        if self._shapes is not None and len(self._shapes) != n + n_pool:
            raise ValueError(f"{len(self._shapes)} shapes for {n + n_pool} images")
        self.keys = list(keys) if keys is not None else row_keys(range(n), range(n_pool))
        if len(self.keys) != n + n_pool or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"expected {n + n_pool} distinct image keys, got {len(set(self.keys))}")
        self.misfits: set[str] = set()  # images whose saved mask no longer fits them
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                self.db = sqlite3.connect(
                    uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(
                    self.path, timeout=30, isolation_level=None, check_same_thread=False
                )
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
            self._open(content_hash, readonly)
        except sqlite3.Error as exc:
            raise CorrectionsError(f"{self.path}: cannot open the corrections database ({exc})") from None

    def _open(self, content_hash: str | None, readonly: bool) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall()) if self._has_meta() else {}
        mode = "name" if self.by_name else "content"
        version = int(meta.get("schema_version", 1)) if meta else None
        if version is not None and version > SCHEMA_VERSION:
            raise CorrectionsError(
                f"{self.path}: written by a newer marsviewer (corrections schema {version}; this "
                f"version reads up to {SCHEMA_VERSION}); upgrade marsviewer to open it"
            )
        if version is None and readonly:
            raise CorrectionsError(f"{self.path}: not a corrections database (no meta table)")
        if version is None:
            self.db.executescript(SCHEMA)
            rows = [("schema_version", str(SCHEMA_VERSION)), ("keyed_by", mode)]
            if not self.by_name:
                rows.append(("dataset_hash", str(content_hash)))
            with self._tx():
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", rows)
            self._legacy = False
        elif version == 1:
            # rows by position, tied to the content hash: only the same content can read them
            if content_hash is None or meta.get("dataset_hash") != content_hash:
                raise CorrectionsError(
                    f"{self.path}: these corrections belong to another dataset "
                    f"(hash {meta.get('dataset_hash')}, this dataset {content_hash})"
                )
            self._legacy = readonly  # read as they are; a writer migrates them
            if not readonly:
                self._migrate_v1(mode)
        else:
            stored_mode = meta.get("keyed_by", "content")
            if stored_mode == "content" and (self.by_name or meta.get("dataset_hash") != content_hash):
                raise CorrectionsError(
                    f"{self.path}: these corrections belong to another dataset "
                    f"(hash {meta.get('dataset_hash')}, this dataset {content_hash})"
                )
            if stored_mode == "name" and not self.by_name:
                raise CorrectionsError(
                    f"{self.path}: these corrections find images by name (a folder or zarr "
                    "dataset); this dataset has no lasting names"
                )
            self._legacy = False
        self._load_ids()

    def _migrate_v1(self, mode: str) -> None:
        """Version 1 -> 2 in one transaction: each row ``r`` becomes images.id ``r`` with
        its key, so entries, cursors and log keep their numbers."""
        self.db.executescript(SCHEMA)
        with self._tx():
            used = {
                r[0]
                for table in ("entries", "cursors", "log")
                for r in self.db.execute(f"SELECT DISTINCT image FROM {table}")  # noqa: S608
                if r[0] is not None
            }
            bad = sorted(i for i in used if not 0 <= i < len(self.keys))
            if bad:
                raise CorrectionsError(f"{self.path}: rows {bad[:3]} are outside this dataset; not migrated")
            self.db.executemany(
                "INSERT INTO images (id, key) VALUES (?, ?)", [(i, self.keys[i]) for i in sorted(used)]
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("keyed_by", mode), ("migrated", str(time.time()))],
            )

    def _load_ids(self) -> None:
        if self._legacy:
            self._id_of_key = {k: i for i, k in enumerate(self.keys)}
        else:
            self._id_of_key = {k: i for i, k in self.db.execute("SELECT id, key FROM images")}
        self._known_ids = set(self._id_of_key.values())
        self._row_of_id = {}
        for row, key in enumerate(self.keys):
            if key in self._id_of_key:
                self._row_of_id[self._id_of_key[key]] = row

    def _row(self, image_id: int) -> int | None:
        """The row of a stored image id; None when the image is no longer in the dataset."""
        if image_id not in self._known_ids:
            self._load_ids()  # another process added images since
        return self._row_of_id.get(image_id)

    @classmethod
    def for_dataset(
        cls,
        dataset,
        path: str | Path | None = None,
        original_masks: np.ndarray | None = None,
        readonly: bool = False,
    ) -> CorrectionStore:
        """The store of a :class:`Dataset` (or a zarr dataset read from disk): the one at
        ``path``, else the one found for it, else a new one beside it."""
        ident = identity(dataset, original_masks)
        path = path or default_store_path(dataset.source, ident["content_hash"])
        return cls(path, readonly=readonly, **ident)

    @classmethod
    def existing(cls, dataset, path: str | Path | None = None, readonly: bool = False):
        """The dataset's store if it has one (``path``, or where one is found), else None."""
        ident = identity(dataset)
        target = Path(path) if path else existing_store_path(dataset.source, ident["content_hash"])
        if target is None or not target.exists():
            return None
        return cls(target, readonly=readonly, **ident)

    def _has_meta(self) -> bool:
        return bool(self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone())

    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                store.db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def close(self) -> None:
        self.db.close()

    def shape_of(self, image: int) -> tuple[int, int]:
        return self.shape if self._shapes is None else self._shapes[image]

    # -- writing ---------------------------------------------------------------
    def _check(self, image: int) -> int:
        image = int(image)
        if not 0 <= image < self.n + self.n_pool:
            raise IndexError(f"image {image} out of range 0..{self.n + self.n_pool - 1}")
        return image

    def _id(self, image: int, create: bool = False) -> int | None:
        """The stored id of row ``image``; with ``create`` (inside a write transaction)
        a new one for an image the store has not seen."""
        key = self.keys[image]
        found = self._id_of_key.get(key)
        if found is None:
            row = self.db.execute("SELECT id FROM images WHERE key=?", (key,)).fetchone()
            if row is None and create:
                row = (self.db.execute("INSERT INTO images (key) VALUES (?)", (key,)).lastrowid,)
            if row is not None:
                found = self._id_of_key[key] = row[0]
                self._row_of_id[found] = image
                self._known_ids.add(found)
        return found

    def _cursor(self, image_id: int | None) -> int | None:
        if image_id is None:
            return None
        row = self.db.execute("SELECT entry FROM cursors WHERE image=?", (image_id,)).fetchone()
        return row[0] if row else None

    def _append(self, image: int, action: str, mask: np.ndarray | None = None, note: str = "") -> int:
        image = self._check(image)
        blob = None
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.shape != self.shape_of(image):
                raise ValueError(f"mask of image {image} is {mask.shape}; expected {self.shape_of(image)}")
            if mask.max(initial=0) > 4:
                raise ValueError(f"mask of image {image} has class {int(mask.max())}; expected 0..4")
            blob = zlib.compress(mask.tobytes(), 6)
        with self._tx():
            image_id = self._id(image, create=True)
            parent = self._cursor(image_id)
            cur = self.db.execute(
                "INSERT INTO entries (image, parent, action, mask, time, note) VALUES (?, ?, ?, ?, ?, ?)",
                (image_id, parent, action, blob, time.time(), note),
            )
            entry = cur.lastrowid
            self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image_id, entry))
            self.db.execute(
                "INSERT INTO log (image, what, entry, time) VALUES (?, ?, ?, ?)",
                (image_id, action, entry, time.time()),
            )
        self.misfits.discard(self.keys[image])
        return entry

    def save_mask(self, image: int, mask: np.ndarray, note: str = "") -> int:
        return self._append(image, "mask", mask, note)

    def restore(self, image: int, note: str = "") -> int:
        """Make the original mask effective again (the edits stay in the history)."""
        return self._append(image, "restore", note=note)

    def exclude(self, image: int, note: str = "") -> int:
        return self._append(image, "exclude", note=note)

    def include(self, image: int, note: str = "") -> int:
        return self._append(image, "include", note=note)

    def exclude_many(self, images, note: str = "") -> None:
        for i in images:
            if not self.is_excluded(i):
                self.exclude(i, note)

    def undo(self, image: int) -> bool:
        """Step the image back to the previous state; False when there is nothing to undo."""
        image = self._check(image)
        with self._tx():
            image_id = self._id(image)
            cur = self._cursor(image_id)
            if cur is None:
                return False
            parent = self.db.execute("SELECT parent FROM entries WHERE id=?", (cur,)).fetchone()[0]
            self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image_id, parent))
            self.db.execute(
                "INSERT INTO log (image, what, entry, time) VALUES (?, 'undo', ?, ?)",
                (image_id, parent, time.time()),
            )
        return True

    def redo(self, image: int) -> bool:
        """Step forward along the newest branch; False when there is nothing to redo."""
        image = self._check(image)
        with self._tx():
            image_id = self._id(image)
            if image_id is None:
                return False
            cur = self._cursor(image_id)
            if cur is None:
                row = self.db.execute(
                    "SELECT MAX(id) FROM entries WHERE image=? AND parent IS NULL", (image_id,)
                ).fetchone()
            else:
                row = self.db.execute(
                    "SELECT MAX(id) FROM entries WHERE image=? AND parent=?", (image_id, cur)
                ).fetchone()
            if row is None or row[0] is None:
                return False
            self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image_id, row[0]))
            self.db.execute(
                "INSERT INTO log (image, what, entry, time) VALUES (?, 'redo', ?, ?)",
                (image_id, row[0], time.time()),
            )
        return True

    # -- reading ---------------------------------------------------------------
    def _chain(self, image_id: int | None) -> list[tuple]:
        """Entries from the image's cursor back to its first, newest first."""
        out = []
        entry = self._cursor(image_id)
        while entry is not None:
            row = self.db.execute(
                "SELECT id, parent, action, mask FROM entries WHERE id=?", (entry,)
            ).fetchone()
            out.append(row)
            entry = row[1]
        return out

    def state(self, image: int) -> tuple[np.ndarray | None, bool]:
        """(edited mask or None for the original, excluded?) of one image."""
        image = self._check(image)
        self.db.execute("BEGIN")  # one read transaction: a consistent view under WAL
        try:
            return self._state(image)
        finally:
            self.db.execute("COMMIT")

    def _state(self, image: int, with_mask: bool = True) -> tuple[np.ndarray | None, bool]:
        chain = self._chain(self._id(image))
        mask, excluded, mask_known, excl_known = None, False, False, False
        for _, _, action, blob in chain:
            if not mask_known and action in ("mask", "restore"):
                mask_known = True
                if action == "mask" and with_mask:
                    mask = self._decode(image, blob)
            if not excl_known and action in ("exclude", "include"):
                excl_known, excluded = True, action == "exclude"
            if mask_known and excl_known:
                break
        return mask, excluded

    def _decode(self, image: int, blob: bytes) -> np.ndarray | None:
        """A saved mask, or None (the original counts) when the image changed size since."""
        shape = self.shape_of(image)
        raw = zlib.decompress(blob)
        if len(raw) != shape[0] * shape[1]:
            self.misfits.add(self.keys[image])
            return None
        return np.frombuffer(raw, np.uint8).reshape(shape).copy()

    def effective_mask(self, image: int, original: np.ndarray) -> np.ndarray:
        mask, _ = self.state(image)
        return original if mask is None else mask

    def is_excluded(self, image: int) -> bool:
        return self.state(image)[1]

    def _current_rows(self) -> list[int]:
        ids = [r[0] for r in self.db.execute("SELECT image FROM cursors WHERE entry IS NOT NULL")]
        rows = (self._row(i) for i in ids)
        return sorted(r for r in rows if r is not None)

    def snapshot(self) -> tuple[dict[int, np.ndarray], set[int]]:
        """All edited masks and excluded images, read in one transaction."""
        edited, excluded = {}, set()
        self.db.execute("BEGIN")
        try:
            for i in self._current_rows():
                mask, ex = self._state(i)
                if mask is not None:
                    edited[i] = mask
                if ex:
                    excluded.add(i)
        finally:
            self.db.execute("COMMIT")
        return edited, excluded

    def excluded(self) -> set[int]:
        """The excluded images, without decompressing any mask."""
        self.db.execute("BEGIN")
        try:
            return {i for i in self._current_rows() if self._state(i, with_mask=False)[1]}
        finally:
            self.db.execute("COMMIT")

    def edited(self) -> set[int]:
        """The images whose effective mask is a saved one, without decompressing any."""
        self.db.execute("BEGIN")
        try:
            out = set()
            for i in self._current_rows():
                for _, _, action, _ in self._chain(self._id(i)):
                    if action in ("mask", "restore"):
                        if action == "mask":
                            out.add(i)
                        break
            return out
        finally:
            self.db.execute("COMMIT")

    def orphans(self) -> list[str]:
        """Names of images with saved corrections that the dataset no longer has (kept in
        the store: they come back if the images do)."""
        if self._legacy:
            return []
        rows = self.db.execute(
            "SELECT images.key FROM cursors JOIN images ON images.id = cursors.image "
            "WHERE cursors.entry IS NOT NULL ORDER BY images.key"
        ).fetchall()
        known = set(self.keys)
        return [k for (k,) in rows if k not in known]

    def version(self) -> int:
        """Changes whenever any image's state changes (for readers polling for news)."""
        row = self.db.execute("SELECT MAX(id) FROM log").fetchone()
        return int(row[0] or 0)

    def history(self, image: int) -> list[Entry]:
        image = self._check(image)
        image_id = self._id(image)
        if image_id is None:
            return []
        cur = self._cursor(image_id)
        rows = self.db.execute(
            "SELECT id, parent, action, time, note FROM entries WHERE image=? ORDER BY id", (image_id,)
        ).fetchall()
        return [Entry(r[0], image, r[1], r[2], r[3], r[4], current=r[0] == cur) for r in rows]

    def pool_labels(self) -> dict[int, np.ndarray]:
        """Unlabelled image j -> its saved mask, for those that have one now."""
        edited, _ = self.snapshot()
        return {i - self.n: m for i, m in sorted(edited.items()) if i >= self.n}

    def apply(self, dataset: Dataset) -> tuple[Dataset, set[int]]:
        """The dataset with effective masks and the unlabelled images labelled since
        appended to it (a copy; the dataset is unchanged; ``test_images`` stay as they
        are), and the excluded set (indices into the returned dataset)."""
        edited, excluded = self.snapshot()
        masks = dataset.masks.copy()
        for i, m in edited.items():
            if i < self.n:
                masks[i] = m
        labelled = sorted(i for i in edited if i >= self.n)
        if not labelled or dataset.test_images is None:
            return dataclasses.replace(dataset, masks=masks), excluded
        rows = np.array(labelled) - self.n
        return (
            dataclasses.replace(
                dataset,
                images=np.concatenate([dataset.images, dataset.test_images[rows]]),
                masks=np.concatenate([masks, np.stack([edited[i] for i in labelled])]),
                names=list(dataset.names) + [dataset.test_names[j] for j in rows],
            ),
            {
                i if i < self.n else self.n + labelled.index(i)
                for i in excluded
                if i < self.n or i in labelled
            },
        )
