"""The corrections store: random action sequences against a simple model, crashes,
a concurrent reader, and the original dataset file left untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trainer.corrections import CorrectionsError, CorrectionStore, default_store_path
from trainer.formats import read_npz

N, SHAPE = 4, (3, 5)


class Model:
    """Per image: a tree of states; the cursor walks it (the reference semantics)."""

    def __init__(self):
        self.nodes = {}  # id -> (image, parent, action, mask)
        self.cursor = {i: None for i in range(N)}
        self.next_id = 1

    def append(self, image, action, mask=None):
        self.nodes[self.next_id] = (image, self.cursor[image], action, mask)
        self.cursor[image] = self.next_id
        self.next_id += 1

    def undo(self, image):
        if self.cursor[image] is None:
            return False
        self.cursor[image] = self.nodes[self.cursor[image]][1]
        return True

    def redo(self, image):
        children = [
            k
            for k, (img, parent, _, _) in self.nodes.items()
            if img == image and parent == self.cursor[image]
        ]
        if not children:
            return False
        self.cursor[image] = max(children)
        return True

    def state(self, image):
        mask, excluded, mk, ek = None, False, False, False
        node = self.cursor[image]
        while node is not None:
            _, parent, action, m = self.nodes[node]
            if not mk and action in ("mask", "restore"):
                mk, mask = True, m
            if not ek and action in ("exclude", "include"):
                ek, excluded = True, action == "exclude"
            node = parent
        return mask, excluded


masks_st = st.integers(0, 4).map(lambda v: np.full(SHAPE, v, np.uint8)) | st.binary(
    min_size=15, max_size=15
).map(lambda b: (np.frombuffer(b, np.uint8) % 5).reshape(SHAPE))
images_st = st.integers(0, N - 1)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.store = CorrectionStore(f"{self.dir}/c.sqlite", "h", N, SHAPE)
        self.model = Model()

    @rule(i=images_st, mask=masks_st)
    def save(self, i, mask):
        self.store.save_mask(i, mask)
        self.model.append(i, "mask", mask.copy())

    @rule(i=images_st)
    def exclude(self, i):
        self.store.exclude(i)
        self.model.append(i, "exclude")

    @rule(i=images_st)
    def include(self, i):
        self.store.include(i)
        self.model.append(i, "include")

    @rule(i=images_st)
    def restore(self, i):
        self.store.restore(i)
        self.model.append(i, "restore")

    @rule(i=images_st)
    def undo(self, i):
        assert self.store.undo(i) == self.model.undo(i)

    @rule(i=images_st)
    def redo(self, i):
        assert self.store.redo(i) == self.model.redo(i)

    @invariant()
    def same_state(self):
        edited, excluded = self.store.snapshot()
        assert self.store.edited() == set(edited) and self.store.excluded() == excluded
        for i in range(N):
            mask, ex = self.model.state(i)
            got_mask, got_ex = self.store.state(i)
            assert ex == got_ex and (i in excluded) == ex
            if mask is None:
                assert got_mask is None and i not in edited
            else:
                np.testing.assert_array_equal(got_mask, mask)
                np.testing.assert_array_equal(edited[i], mask)
        # nothing saved is ever lost: every action is still in the history
        assert sum(len(self.store.history(i)) for i in range(N)) == len(self.model.nodes)

    def teardown(self):
        self.store.close()


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_refuses_another_dataset_and_bad_masks(tmp_path):
    store = CorrectionStore(tmp_path / "c.sqlite", "abc", 2, (2, 2))
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        store.save_mask(0, np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="class 7"):
        store.save_mask(0, np.full((2, 2), 7, np.uint8))
    with pytest.raises(IndexError):
        store.exclude(5)
    store.close()
    with pytest.raises(CorrectionsError, match="belong to another dataset"):
        CorrectionStore(tmp_path / "c.sqlite", "xyz", 2, (2, 2))


def test_killed_right_after_save_loses_nothing(tmp_path):
    db = tmp_path / "c.sqlite"
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np
        from trainer.corrections import CorrectionStore
        s = CorrectionStore({str(db)!r}, "h", 3, (4, 4))
        s.save_mask(1, np.full((4, 4), 3, np.uint8), note="fixed sand")
        s.exclude(2)
        print("saved", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and "saved" in proc.stdout
    store = CorrectionStore(db, "h", 3, (4, 4))
    np.testing.assert_array_equal(store.state(1)[0], np.full((4, 4), 3))
    assert store.is_excluded(2) and store.history(1)[0].note == "fixed sand"


def test_concurrent_reader_never_sees_half_an_action(tmp_path):
    db = tmp_path / "c.sqlite"
    writer = CorrectionStore(db, "h", 1, (64, 128))
    reader = CorrectionStore(db, "h", 1, (64, 128), readonly=True)
    errors = []

    def read_loop():
        for _ in range(300):
            try:
                mask, _ = reader.state(0)
                if mask is not None:
                    # every saved mask is constant: a mix of two would be half an action
                    assert (mask == mask.flat[0]).all()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    t = threading.Thread(target=read_loop)
    t.start()
    for k in range(150):
        writer.save_mask(0, np.full((64, 128), k % 5, np.uint8))
    t.join()
    assert not errors, errors[:3]


def test_store_beside_the_dataset_and_original_untouched(npz_path, small_sample):
    before = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    ds = read_npz(npz_path)
    store = CorrectionStore.for_dataset(ds)
    assert store.path == npz_path.parent / "mars_for_students.marsviewer" / "corrections.sqlite"
    fixed = small_sample.clean_masks[small_sample.truth["corrupted"][0]]
    store.save_mask(small_sample.truth["corrupted"][0], fixed)
    store.exclude_many(small_sample.truth["outlier_group"])
    corrected, excluded = store.apply(ds)
    assert excluded == set(small_sample.truth["outlier_group"])
    np.testing.assert_array_equal(corrected.masks[small_sample.truth["corrupted"][0]], fixed)
    assert hashlib.sha256(npz_path.read_bytes()).hexdigest() == before
    np.testing.assert_array_equal(read_npz(npz_path).masks, ds.masks)


def test_unwritable_dataset_folder_falls_back_to_user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = default_store_path("synthetic:10:0", "deadbeef")
    assert path.parts[-2] == "deadbeef" and str(tmp_path / "data") in str(path)


def test_every_action_is_durable_and_indices_are_checked(tmp_path):
    """synchronous=FULL (a save survives a power cut, not only a crash), and no image
    index outside 0..n-1 is accepted, one past the end included."""
    store = CorrectionStore(tmp_path / "c.sqlite", "abc", 3, (2, 2))
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for bad in (3, -1):
        for action in (store.exclude, store.restore, store.undo, store.redo, store.state):
            with pytest.raises(IndexError):
                action(bad)
        with pytest.raises(IndexError):
            store.save_mask(bad, np.zeros((2, 2), np.uint8))
    store.save_mask(2, np.ones((2, 2), np.uint8))  # the last index is fine


def test_redo_after_two_branches_takes_the_newest():
    """save A, undo, save B, undo: redo goes to B (the newest branch), not A."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        store = CorrectionStore(Path(tmp) / "c.sqlite", "abc", 1, (2, 2))
        a, b = np.full((2, 2), 1, np.uint8), np.full((2, 2), 2, np.uint8)
        store.save_mask(0, a)
        store.undo(0)
        store.save_mask(0, b)
        store.undo(0)
        assert store.state(0)[0] is None
        assert store.redo(0)
        np.testing.assert_array_equal(store.state(0)[0], b)
        assert not store.redo(0)
        # the same below a first save: B (id 3) -> C, undo, D, undo: redo goes to D
        c, d = np.full((2, 2), 3, np.uint8), np.full((2, 2), 4, np.uint8)
        store.save_mask(0, c)
        store.undo(0)
        store.save_mask(0, d)
        store.undo(0)
        np.testing.assert_array_equal(store.state(0)[0], b)
        assert store.redo(0)
        np.testing.assert_array_equal(store.state(0)[0], d)
        store.close()


def test_effective_mask_follows_saves_restores_and_undo(tmp_path):
    store = CorrectionStore(tmp_path / "c.sqlite", "abc", 2, (2, 3))
    original = np.array([[1, 1, 2], [3, 3, 4]], np.uint8)
    edited = np.array([[2, 2, 2], [2, 2, 2]], np.uint8)
    assert store.effective_mask(0, original) is original  # nothing saved: the original itself
    store.save_mask(0, edited)
    np.testing.assert_array_equal(store.effective_mask(0, original), edited)
    store.exclude(0)  # exclusion does not change the mask
    np.testing.assert_array_equal(store.effective_mask(0, original), edited)
    store.restore(0)
    np.testing.assert_array_equal(store.effective_mask(0, original), original)
    store.undo(0)
    np.testing.assert_array_equal(store.effective_mask(0, original), edited)
    np.testing.assert_array_equal(store.effective_mask(1, original), original)  # other images untouched


def test_unlabelled_images_get_labels_with_history_and_export(tmp_path, capsys):
    """Store index n + j is unlabelled image j: save, undo, restore (back to unlabelled),
    and export writes it into training_set while test_set stays whole."""
    from trainer.cli import main
    from trainer.formats import read_npz, write_npz
    from trainer.synth import generate

    ds = generate(12, 3, seed=2, plant_problems=False).dataset
    path = tmp_path / "m.npz"
    write_npz(path, ds.images, ds.masks, ds.test_images, dtype="uint8")
    data = read_npz(path)
    store = CorrectionStore.for_dataset(data)
    n = len(data)
    label = np.full(data.image_shape, 2, np.uint8)
    store.save_mask(n + 1, label)
    store.save_mask(n + 1, label + 1)
    store.undo(n + 1)
    assert list(store.pool_labels()) == [1] and (store.pool_labels()[1] == 2).all()
    applied, _ = store.apply(data)
    assert len(applied) == n + 1 and (applied.images[n] == data.test_images[1]).all()
    assert (applied.masks[n] == 2).all() and len(applied.test_images) == 3
    store.save_mask(4, np.ones(data.image_shape, np.uint8))  # an ordinary correction too
    out = tmp_path / "out.npz"
    assert main(["export", str(path), "--out", str(out), "--dtype", "uint8"]) == 0
    assert "1 corrected masks, 1 newly labelled" in capsys.readouterr().out
    exported = read_npz(out)
    assert len(exported) == n + 1 and (exported.masks[n] == 2).all() and (exported.masks[4] == 1).all()
    np.testing.assert_array_equal(exported.test_images, data.test_images)
    log = json.loads(out.with_name("out.npz.changelog.json").read_text())
    assert log["newly_labelled"] == 1
    assert any(c["action"] == "labelled" and c["unlabelled_index"] == 1 for c in log["changes"])
    store.restore(n + 1)  # back to unlabelled
    assert store.pool_labels() == {}
    assert len(store.apply(data)[0]) == n


# -- keyed by name: folders and zarr datasets ------------------------------------------------
def _frame(root, name, shape=(6, 8), value=1, labelled=True):
    from PIL import Image

    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for sub, arr in (("images", rng.integers(0, 256, shape)), ("masks", np.full(shape, value))):
        if sub == "masks" and not labelled:
            continue
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(arr, np.uint8)).save(root / sub / f"{name}.png")


def _remove(root, name):
    for sub in ("images", "masks"):
        (root / sub / f"{name}.png").unlink(missing_ok=True)


def _open(root):
    from trainer.formats import open_dataset

    ds = open_dataset(root)
    return ds, CorrectionStore.for_dataset(ds)


def test_folder_corrections_follow_names_when_images_come_and_go(tmp_path):
    """Images added before the corrected ones move them to other rows; a removed image's
    correction is kept and comes back with it; the store says which schema it is."""
    root = tmp_path / "frames"
    for name in ("b", "c", "d"):
        _frame(root, name)
    _frame(root, "u", labelled=False)
    ds, store = _open(root)
    assert store.by_name and store.path.parent.name == "frames.marsviewer"
    assert dict(store.db.execute("SELECT key, value FROM meta"))["schema_version"] == "2"
    fixed = np.full(ds.image_shape, 3, np.uint8)
    store.save_mask(ds.names.index("images/c"), fixed)
    store.exclude(ds.names.index("images/d"))
    store.save_mask(len(ds) + ds.test_names.index("images/u"), np.full(ds.image_shape, 2, np.uint8))
    store.close()

    _frame(root, "a")  # sorts first: every labelled image moves one row down
    _frame(root, "0u", labelled=False)
    ds, store = _open(root)
    edited, excluded = store.snapshot()
    assert {ds.names[i] for i in edited if i < len(ds)} == {"images/c"}
    np.testing.assert_array_equal(edited[ds.names.index("images/c")], fixed)
    assert excluded == {ds.names.index("images/d")}
    assert store.pool_labels().keys() == {ds.test_names.index("images/u")}
    applied, _ = store.apply(ds)
    assert applied.names[-1] == "images/u" and (applied.masks[-1] == 2).all()
    store.close()

    _remove(root, "c")
    ds, store = _open(root)
    assert store.orphans() == ["images/c"] and ds.names.index("images/d") in store.excluded()
    assert all(ds.names[i] != "images/c" for i in store.snapshot()[0] if i < len(ds))
    store.close()
    _frame(root, "c")
    ds, store = _open(root)
    np.testing.assert_array_equal(store.state(ds.names.index("images/c"))[0], fixed)
    assert store.orphans() == []


def test_a_resized_image_shows_its_original_mask(tmp_path):
    root = tmp_path / "frames"
    for name in ("b", "c"):
        _frame(root, name)
    ds, store = _open(root)
    store.save_mask(0, np.full(ds.image_shape, 4, np.uint8))
    store.close()
    _frame(root, "b", shape=(6, 8))
    _frame(root, "c", shape=(6, 8))
    from trainer.formats import open_dataset

    ds = open_dataset(root, size=(4, 4))  # read at another size: the saved 6x8 mask cannot apply
    store = CorrectionStore.for_dataset(ds)
    assert store.snapshot() == ({}, set()) and store.misfits == {"images/b"}


# the schema of version 1, as earlier versions wrote it
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, image INTEGER NOT NULL, parent INTEGER,
    action TEXT NOT NULL, mask BLOB, time REAL NOT NULL, note TEXT NOT NULL DEFAULT '');
CREATE TABLE cursors (image INTEGER PRIMARY KEY, entry INTEGER);
CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, image INTEGER, what TEXT, entry INTEGER, time REAL);
"""


def _v1_store(path, ds, row, mask):
    import sqlite3
    import zlib

    from trainer.corrections import dataset_hash

    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("dataset_hash", dataset_hash(ds.images, ds.masks)), ("n", str(len(ds))), ("shape", "6x8")],
    )
    db.execute(
        "INSERT INTO entries (image, parent, action, mask, time) VALUES (?, NULL, 'mask', ?, 0)",
        (row, zlib.compress(mask.tobytes())),
    )
    db.execute("INSERT INTO entries (image, parent, action, time) VALUES (?, NULL, 'exclude', 0)", (row + 1,))
    db.execute("INSERT INTO cursors VALUES (?, 1), (?, 2)", (row, row + 1))
    db.commit()
    db.close()


def test_a_version_1_store_is_migrated_for_its_own_dataset(tmp_path):
    from trainer.formats import open_dataset

    root = tmp_path / "frames"
    for name in ("b", "c", "d"):
        _frame(root, name)
    ds = open_dataset(root)
    fixed = np.full(ds.image_shape, 2, np.uint8)
    path = tmp_path / "frames.marsviewer" / "corrections.sqlite"
    path.parent.mkdir()
    _v1_store(path, ds, 1, fixed)
    reader = CorrectionStore.for_dataset(ds, readonly=True)  # read as it is, not migrated
    np.testing.assert_array_equal(reader.state(1)[0], fixed)
    reader.close()
    store = CorrectionStore.for_dataset(ds)
    assert store.path == path
    meta = dict(store.db.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == "2" and meta["keyed_by"] == "name"
    np.testing.assert_array_equal(store.state(1)[0], fixed)
    assert store.excluded() == {2} and [e.action for e in store.history(1)] == ["mask"]
    store.close()
    _frame(root, "a")  # from now on the names hold
    ds, store = _open(root)
    np.testing.assert_array_equal(store.state(ds.names.index("images/c"))[0], fixed)
    assert store.excluded() == {ds.names.index("images/d")}


def test_a_version_1_store_of_other_content_and_a_newer_schema_are_refused(tmp_path):
    import sqlite3

    from trainer.formats import open_dataset

    root = tmp_path / "frames"
    for name in ("b", "c"):
        _frame(root, name)
    ds = open_dataset(root)
    path = tmp_path / "frames.marsviewer" / "corrections.sqlite"
    path.parent.mkdir()
    _v1_store(path, ds, 0, np.ones(ds.image_shape, np.uint8))
    _frame(root, "a")  # another content: the positions of version 1 mean nothing now
    with pytest.raises(CorrectionsError, match="belong to another dataset"):
        _open(root)
    path.unlink()
    ds, store = _open(root)
    store.db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    store.close()
    with pytest.raises(CorrectionsError, match="newer marsviewer.*schema 3"):
        CorrectionStore.for_dataset(ds)
    db = sqlite3.connect(path)  # keyed by name, but the dataset has no names that last
    db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(CorrectionsError, match="find images by name"):
        CorrectionStore(path, "h", len(ds), ds.image_shape, n_pool=0)


def test_a_zarr_dataset_on_disk_takes_corrections_of_each_frame_size(tmp_path):
    from trainer.convert import convert
    from trainer.formats import open_zarr

    root = tmp_path / "frames"
    _frame(root, "b", shape=(9, 5))
    _frame(root, "c", shape=(4, 7))
    _frame(root, "u", shape=(3, 3), labelled=False)
    convert(root, tmp_path / "d.zarr")
    stored = open_zarr(tmp_path / "d.zarr")
    store = CorrectionStore.for_dataset(stored)
    assert store.path.parent.name == "d.zarr.marsviewer" and store.by_name
    c = stored.names.index("images/c")
    with pytest.raises(ValueError, match=r"expected \(4, 7\)"):
        store.save_mask(c, np.zeros((9, 5), np.uint8))
    store.save_mask(c, np.full((4, 7), 3, np.uint8))
    store.save_mask(stored.n_labelled, np.full((3, 3), 1, np.uint8))  # labels the unlabelled frame
    edited, _ = store.snapshot()
    assert edited[c].shape == (4, 7) and edited[stored.n_labelled].shape == (3, 3)
