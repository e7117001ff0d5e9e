"""``mars-trainer export --out NAME.zarr``: the corrected dataset as a converted one, each
frame at its own size and under its own name, from memory or from disk."""

from __future__ import annotations

import errno
import json
import sqlite3
from contextlib import closing

import numpy as np
import pytest

from tests.test_zarr import mixed_folder
from trainer.cli import main
from trainer.convert import convert
from trainer.corrections import CorrectionStore
from trainer.dataset import DatasetError
from trainer.export import export_zarr
from trainer.formats import StoredDataset, open_dataset, open_zarr, read_npz, write_npz
from trainer.store_location import identity
from trainer.synth import generate


def _npz_with_corrections(tmp_path):
    """An npz of 6 labelled and 3 unlabelled images, with a corrected mask (image 1), an
    excluded image (4) and a label saved for unlabelled image 2; and the store's path."""
    ds = generate(6, 3, seed=3, plant_problems=False).dataset
    path = tmp_path / "d.npz"
    write_npz(path, ds.images, ds.masks, ds.test_images, dtype="uint8")
    data = read_npz(path)
    store = CorrectionStore.for_dataset(data)
    fixed = data.masks[1].copy()
    fixed[:10] = 4
    store.save_mask(1, fixed)
    store.exclude(4)
    store.save_mask(6 + 2, np.full(data.image_shape, 3, np.uint8))
    store.close()
    return path, data, fixed, store.path


@pytest.mark.parametrize("drop", [False, True])
def test_export_to_zarr_applies_corrections_labels_and_exclusions(tmp_path, capsys, drop):
    path, data, fixed, store_path = _npz_with_corrections(tmp_path)
    out = tmp_path / "fixed.zarr"
    args = ["export", str(path), "--out", str(out)] + (["--drop-excluded"] if drop else [])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 corrected masks, 1 newly labelled, 1 excluded" in printed
    got = open_zarr(out)
    labelled = [i for i in range(6) if not (drop and i == 4)]
    # The labelled images (the excluded one only when kept), then the newly labelled
    # unlabelled image, then the two still unlabelled.
    assert got.labelled_names == [str(i) for i in labelled] + ["unlabelled/2"]
    assert got.test_names == ["unlabelled/0", "unlabelled/1"]
    for row, i in enumerate(labelled):
        np.testing.assert_array_equal(got.image(row), data.images[i])
        np.testing.assert_array_equal(got.mask(row), fixed if i == 1 else data.masks[i])
    new = len(labelled)
    np.testing.assert_array_equal(got.image(new), data.test_images[2])
    assert (got.mask(new) == 3).all()
    np.testing.assert_array_equal(got.image(new + 1), data.test_images[0])
    np.testing.assert_array_equal(got.image(new + 2), data.test_images[1])
    np.testing.assert_array_equal(got.class_pixels[new], np.bincount(got.mask(new).ravel(), minlength=5))
    assert got.attrs["corrections"] == str(store_path) and got.attrs["source"] == str(path)
    log = json.loads((tmp_path / "fixed.zarr.changelog.json").read_text())
    assert (log["labelled"], log["unlabelled"], log["edited"], log["newly_labelled"]) == (
        len(labelled) + 1,
        2,
        1,
        1,
    )
    by_action = {c["action"]: c for c in log["changes"]}
    assert by_action["mask"]["name"] == "1"
    assert by_action["mask"]["changed_pixels"] == int((fixed != data.masks[1]).sum()) > 0
    assert by_action["labelled"]["name"] == "unlabelled/2"
    assert by_action["excluded"] == {**by_action["excluded"], "name": "4", "dropped": drop}
    assert all(c["history"] for c in log["changes"])
    # A kept excluded image stays excluded: in the export's own store, which train and
    # napari find beside it; a dropped one needs none.
    exported = CorrectionStore.existing(got)
    if drop:
        assert exported is None and log["exclusions_store"] is None and log["excluded_kept"] == 0
    else:
        assert exported.excluded() == {got.labelled_names.index("4")} and not exported.edited()
        row = got.labelled_names.index("4")
        assert [e.note for e in exported.history(row)] == [f"excluded in {path}"]
        assert log["exclusions_store"] == str(exported.path) and log["excluded_kept"] == 1
        assert "1 excluded images stay excluded in fixed.zarr" in printed
        exported.close()


def test_export_of_a_dataset_on_disk_keeps_each_frame_size_and_reads_a_frame_at_a_time(tmp_path, monkeypatch):
    arrays = mixed_folder(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "d.zarr", workers=1)
    stored = open_dataset(tmp_path / "d.zarr", lazy=True)
    assert isinstance(stored, StoredDataset)
    store = CorrectionStore.for_dataset(stored)
    fixed = np.full((45, 29), 2, np.uint8)
    store.save_mask(1, fixed)  # images/b
    label = np.full((20, 20), 1, np.uint8)
    store.save_mask(2, label)  # images/c, unlabelled
    # The frames are never read as one array: only frame by frame.
    monkeypatch.setattr(StoredDataset, "to_memory", lambda self: pytest.fail("read into memory"))
    log = export_zarr(stored, store, tmp_path / "e.zarr", stored.attrs["mask_mapping"])
    got = open_zarr(tmp_path / "e.zarr")
    assert got.labelled_names == ["images/a", "images/b", "images/c"] and got.test_names == []
    assert [tuple(s) for s in got.sizes] == [(37, 50), (45, 29), (20, 20)]
    np.testing.assert_array_equal(got.mask(0), arrays["a"][1])
    np.testing.assert_array_equal(got.mask(1), fixed)
    np.testing.assert_array_equal(got.mask(2), label)
    for row, name in enumerate("abc"):
        np.testing.assert_array_equal(got.image(row), arrays[name][0])
    assert got.attrs["source"] == str(tmp_path / "d.zarr")
    assert (log["edited"], log["newly_labelled"], log["unlabelled"]) == (1, 1, 0)
    # Frames are padded to the largest frame exported, not the largest there was.
    store.exclude(0)  # images/a, the widest
    export_zarr(stored, store, tmp_path / "f.zarr", drop_excluded=True)
    got = open_zarr(tmp_path / "f.zarr")
    assert got.labelled_names == ["images/b", "images/c"] and got.frame_shape == (45, 29)


def test_export_of_a_folder_of_mixed_sizes_keeps_each_frame_at_its_own_size(tmp_path, capsys):
    """Read into memory, a folder's frames are resized to its most common size, and its
    corrections are saved at that size. Its export holds each frame as its file has it,
    the corrections resized back to the frame (nearest neighbour), and says so."""
    from trainer.formats.folder import resize

    arrays = mixed_folder(tmp_path / "src")
    ds = open_dataset(tmp_path / "src")
    assert ds.image_shape == (37, 50)  # images/b (45x29) and c (20x20) resized in memory
    store = CorrectionStore.for_dataset(ds)
    fixed = ds.masks[1].copy()
    fixed[:10] = 4
    store.save_mask(1, fixed)  # images/b
    store.save_mask(2, np.full((37, 50), 3, np.uint8))  # images/c, unlabelled
    store.close()
    out = tmp_path / "e.zarr"
    assert main(["export", str(tmp_path / "src"), "--out", str(out)]) == 0
    assert "1 corrected masks, 1 newly labelled" in capsys.readouterr().out
    got = open_zarr(out)
    assert [tuple(s) for s in got.sizes] == [(37, 50), (45, 29), (20, 20)]
    for row, name in enumerate("abc"):
        np.testing.assert_array_equal(got.image(row), arrays[name][0])
    np.testing.assert_array_equal(got.mask(0), arrays["a"][1])
    np.testing.assert_array_equal(got.mask(1), resize(fixed, (45, 29), is_mask=True))
    assert (got.mask(1)[:12] == 4).all() and (got.mask(2) == 3).all()
    changes = json.loads((tmp_path / "e.zarr.changelog.json").read_text())["changes"]
    assert [(c["name"], c.get("resized_from")) for c in changes] == [
        ("images/b", [37, 50]),
        ("images/c", [37, 50]),
    ]
    with closing(CorrectionStore.for_dataset(ds)) as store:
        store.restore(1)  # images/b's mask as its file has it
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "f.zarr")]) == 0
    np.testing.assert_array_equal(open_zarr(tmp_path / "f.zarr").mask(1), arrays["b"][1])


def test_export_to_zarr_refusals(tmp_path, capsys):
    path, *_ = _npz_with_corrections(tmp_path)
    assert main(["export", str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert ".npz (the competition's format) or .zarr" in capsys.readouterr().err
    out = tmp_path / "x.zarr"
    assert main(["export", str(path), "--out", str(out)]) == 0
    assert main(["export", str(path), "--out", str(out)]) == 2  # exists: kept
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(path), "--out", str(out), "--overwrite"]) == 0
    assert main(["export", str(out), "--out", str(out), "--overwrite"]) == 2  # never the original
    assert "is an input of this command" in capsys.readouterr().err
    assert main(["export", str(path), "--out", str(tmp_path / "no" / "x.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overwriting_an_export_moves_the_earlier_datasets_corrections_aside(tmp_path, capsys):
    """The corrections of a dataset replaced by ``--overwrite`` would find the new images
    by name: they are moved aside, whole, and the new dataset starts with only the
    exclusions it carries."""
    path, *_ = _npz_with_corrections(tmp_path)
    out = tmp_path / "x.zarr"
    assert main(["export", str(path), "--out", str(out)]) == 0
    earlier = CorrectionStore.for_dataset(open_zarr(out))
    earlier.save_mask(0, np.zeros(open_zarr(out).frame_shape, np.uint8), note="fixed in the export")
    earlier.close()
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    (aside,) = tmp_path.glob("x.zarr.marsviewer.replaced-*")
    assert f"x.zarr replaced an earlier dataset: its corrections were moved to {aside}" in err
    with closing(sqlite3.connect(aside / "corrections.sqlite")) as db:  # the correction, kept
        assert db.execute("SELECT count(*) FROM entries WHERE note = 'fixed in the export'").fetchone() == (
            1,
        )
    now = CorrectionStore.existing(open_zarr(out))
    assert now.edited() == set() and now.excluded() == {4}
    now.close()


@pytest.mark.parametrize("touched", ["no", "include", "file"])
def test_an_exports_store_that_holds_only_what_it_carried_is_replaced_not_kept(tmp_path, capsys, touched):
    """Exporting over an export again and again left one ``.replaced-*`` folder a time,
    though all such a store held were the exclusions carried from the source (still in
    the source's store). It is now removed; a store anyone changed since (an include, even
    one undone by an exclude), or a folder holding anything else, is moved aside."""
    path, *_ = _npz_with_corrections(tmp_path)
    out = tmp_path / "x.zarr"
    assert main(["export", str(path), "--out", str(out)]) == 0
    folder = tmp_path / "x.zarr.marsviewer"
    if touched == "include":
        earlier = CorrectionStore.existing(open_zarr(out))
        earlier.include(4)
        earlier.exclude(4)  # back where it was, but the user did it
        earlier.close()
    elif touched == "file":
        (folder / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    aside = list(tmp_path.glob("x.zarr.marsviewer.replaced-*"))
    assert len(aside) == (0 if touched == "no" else 1)
    assert ("replaced an earlier dataset" in err) == (touched != "no")
    now = CorrectionStore.existing(open_zarr(out))
    assert now.excluded() == {4} and now.edited() == set()
    now.close()
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        "corrections.sqlite"
    ]


def test_convert_overwrite_moves_the_replaced_datasets_corrections_aside(tmp_path, capsys):
    path, *_ = _npz_with_corrections(tmp_path)
    out = tmp_path / "c.zarr"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    earlier = CorrectionStore.for_dataset(open_zarr(out))
    earlier.exclude(2)
    earlier.close()
    assert main(["convert", str(path), "--out", str(out)]) == 2  # kept, and its store too
    assert CorrectionStore.existing(open_zarr(out)).excluded() == {2, 4}  # 4: carried from the npz
    capsys.readouterr()
    assert main(["convert", str(path), "--out", str(out), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("c.zarr.marsviewer.replaced-*")
    assert (
        f"c.zarr replaced an earlier dataset: its corrections were moved to {aside}"
        in capsys.readouterr().err
    )
    with closing(CorrectionStore.existing(open_zarr(out))) as store:
        assert store.excluded() == {4}  # carried anew
    with closing(CorrectionStore(aside / "corrections.sqlite", **identity(open_zarr(out)))) as store:
        assert store.excluded() == {2, 4}


def test_disk_full_during_export_leaves_nothing(tmp_path, monkeypatch):
    _, data, *_ = _npz_with_corrections(tmp_path)
    from trainer.formats import zarr_writer

    def full(self, row, image, mask):
        if row == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr_writer.ZarrWriter, "add", full)
    with pytest.raises(DatasetError, match=r"e\.zarr: could not be written \(the disk is full\)"):
        export_zarr(data, None, tmp_path / "e.zarr")
    assert not list(tmp_path.glob("e.zarr*"))


def test_corrections_of_images_gone_from_a_folder_are_reported_not_exported(tmp_path, capsys):
    from tests.test_zarr import save

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for name in "abc":
        save(src / "images" / f"{name}.png", rng.integers(0, 256, (16, 16)))
        save(src / "masks" / f"{name}.png", rng.integers(0, 5, (16, 16)))
    store = CorrectionStore.for_dataset(open_dataset(src))
    store.save_mask(1, np.full((16, 16), 4, np.uint8))  # b
    store.save_mask(2, np.full((16, 16), 3, np.uint8))  # c
    store.close()
    (src / "images" / "b.png").unlink()
    (src / "masks" / "b.png").unlink()
    assert main(["export", str(src), "--out", str(tmp_path / "e.zarr")]) == 0
    captured = capsys.readouterr()
    assert "1 corrected masks" in captured.out
    assert "not exported: corrections of 1 images no longer in the dataset" in captured.err
    log = json.loads((tmp_path / "e.zarr.changelog.json").read_text())
    assert len(log["orphans"]) == 1 and "b" in log["orphans"][0]
    got = open_zarr(tmp_path / "e.zarr")
    assert len(got.labelled_names) == 2 and (got.mask(1) == 3).all()
