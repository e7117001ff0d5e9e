"""The history of each image in the corrections store: an append-only tree of entries
in SQLite, a cursor per image, and the log of every change. A mixin of
:class:`~trainer.corrections.CorrectionStore` (like ``epoch_steps.py`` of the engine's
trainer); it uses the store's ``db``, ``_check`` (a row in range) and ``_id`` (a row's
stored id).

Each entry points to the entry that was current for its image when it was written (its
parent): undo moves the image's cursor to the parent, redo to the newest child, and a save
after an undo starts a new branch without losing the old one.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

from .corrections_db import transaction


@dataclass(frozen=True)
class Entry:
    id: int
    image: int
    parent: int | None
    action: str
    time: float
    note: str
    current: bool = False


class HistoryTree:
    """Append, undo, redo and walk the entries of one image."""

    def _add_entry(self, image: int, action: str, blob: bytes | None, note: str) -> int:
        """Append an entry under the image's cursor and move the cursor to it."""
        with transaction(self.db):
            image_id = self._id(image, create=True)
            parent = self._cursor(image_id)
            cur = self.db.execute(
                "INSERT INTO entries (image, parent, action, mask, time, note) VALUES (?, ?, ?, ?, ?, ?)",
                (image_id, parent, action, blob, time.time(), note),
            )
            entry = cur.lastrowid
            self._move_cursor(image_id, entry, action)
        return entry

    def _move_cursor(self, image_id: int, entry: int | None, what: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image_id, entry))
        self.db.execute(
            "INSERT INTO log (image, what, entry, time) VALUES (?, ?, ?, ?)",
            (image_id, what, entry, time.time()),
        )

    def _cursor(self, image_id: int | None) -> int | None:
        if image_id is None:
            return None
        row = self.db.execute("SELECT entry FROM cursors WHERE image=?", (image_id,)).fetchone()
        return row[0] if row else None

    def undo(self, image: int) -> bool:
        """Step the image back to the previous state; False when there is nothing to undo."""
        image = self._check(image)
        with transaction(self.db):
            image_id = self._id(image)
            cur = self._cursor(image_id)
            if cur is None:
                return False
            parent = self.db.execute("SELECT parent FROM entries WHERE id=?", (cur,)).fetchone()[0]
            self._move_cursor(image_id, parent, "undo")
        return True

    def redo(self, image: int) -> bool:
        """Step forward along the newest branch; False when there is nothing to redo."""
        image = self._check(image)
        with transaction(self.db):
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
            self._move_cursor(image_id, row[0], "redo")
        return True

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

    @contextmanager
    def _reading(self):
        """One read transaction: a consistent view under WAL while a writer goes on."""
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def _walk(self, image: int) -> tuple[bytes | None, bool]:
        """(the compressed saved mask, or None for the original; excluded?): the newest
        mask/restore entry and the newest exclude/include entry along the image's chain."""
        blob, excluded, mask_known, excl_known = None, False, False, False
        for _, _, action, data in self._chain(self._id(image)):
            if not mask_known and action in ("mask", "restore"):
                mask_known, blob = True, data if action == "mask" else None
            if not excl_known and action in ("exclude", "include"):
                excl_known, excluded = True, action == "exclude"
            if mask_known and excl_known:
                break
        return blob, excluded

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
