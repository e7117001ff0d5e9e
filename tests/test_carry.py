"""``convert`` of a folder carries the folder's saved corrections into the converted
dataset's own store, by name; the dataset's masks stay the originals."""

from __future__ import annotations

import numpy as np

from tests.test_zarr import mixed_folder, save
from trainer.cli import main
from trainer.corrections import CorrectionStore
from trainer.formats import open_dataset, open_zarr


def _folder_with_corrections(root):
    """Four labelled frames of 24x40 and two unlabelled. Saved: a corrected mask (frame 1),
    an exclusion (2), an edit undone by a restore (0) and a label for unlabelled frame 1."""
    rng = np.random.default_rng(1)
    for k in range(6):
        save(root / "images" / f"f{k}.png", rng.integers(0, 256, (24, 40), dtype=np.uint8))
        if k < 4:
            save(root / "masks" / f"f{k}.png", rng.integers(0, 5, (24, 40), dtype=np.uint8))
    ds = open_dataset(root)
    store = CorrectionStore.for_dataset(ds)
    fixed = np.full((24, 40), 2, np.uint8)
    store.save_mask(1, fixed)
    store.exclude(2)
    store.save_mask(0, np.zeros((24, 40), np.uint8))
    store.restore(0)
    label = np.full((24, 40), 3, np.uint8)
    store.save_mask(4 + 1, label)
    store.close()
    return ds, fixed, label


def test_convert_carries_a_folders_corrections_into_the_new_datasets_store(tmp_path, capsys):
    ds, fixed, label = _folder_with_corrections(tmp_path / "src")
    out = tmp_path / "d.zarr"
    assert main(["convert", str(tmp_path / "src"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "carried the folder's corrections" in printed.out and "2 saved masks, 1 exclusions" in printed.out
    assert "not carried" not in printed.err
    got = open_zarr(out)
    assert got.labelled_names == ds.names and got.test_names == ds.test_names
    for i in range(4):  # the dataset's masks are the folder's own
        np.testing.assert_array_equal(got.mask(i), ds.masks[i])
    store = CorrectionStore.existing(got)
    try:
        assert store.edited() == {1, 4 + 1} and store.excluded() == {2}
        np.testing.assert_array_equal(store.state(1)[0], fixed)
        assert store.pool_labels().keys() == {1}
        np.testing.assert_array_equal(store.pool_labels()[1], label)
        assert [e.note for e in store.history(2)] == ["carried from src"]
    finally:
        store.close()
    # The folder's own store is as it was: the restored edit is still in its history.
    folder_store = CorrectionStore.existing(ds)
    assert folder_store.edited() == {1, 5} and len(folder_store.history(0)) == 2
    folder_store.close()

    # Converting again over it: the store holds only what was carried (all still in the
    # folder's), so it is replaced, not moved aside; the new one carries the same.
    assert main(["convert", str(tmp_path / "src"), "--out", str(out), "--overwrite"]) == 0
    assert not list(tmp_path.glob("d.zarr.marsviewer.replaced-*"))
    store = CorrectionStore.existing(open_zarr(out))
    assert store.edited() == {1, 5} and store.excluded() == {2} and len(store.history(1)) == 1
    store.close()


def test_convert_says_which_corrections_it_could_not_carry(tmp_path, capsys):
    """A folder of mixed sizes is resized to one size when read into memory, so a mask
    saved there does not fit its frame in the converted dataset (which keeps each size);
    a frame the conversion skips takes its corrections with it. Both are said, and what
    fits is carried."""
    mixed_folder(tmp_path / "src")
    ds = open_dataset(tmp_path / "src", size=(20, 20))  # c's own size: only c's mask fits
    store = CorrectionStore.for_dataset(ds)
    store.save_mask(0, np.ones((20, 20), np.uint8))  # a: 37x50 on disk
    store.exclude(1)  # b: an exclusion fits any size
    store.save_mask(2, np.full((20, 20), 4, np.uint8))  # c (unlabelled): 20x20 on disk
    store.close()
    (tmp_path / "src" / "images" / "b.png").write_bytes(b"not a png")
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "d.zarr"), "--skip-bad"]) == 0
    printed = capsys.readouterr()
    assert "1 saved masks, 0 exclusions" in printed.out
    assert "correction not carried: images/a: its saved mask is not the size of its frame" in printed.err
    assert "correction not carried: images/b: not in d.zarr" in printed.err
    got = open_zarr(tmp_path / "d.zarr")
    store = CorrectionStore.existing(got)
    assert store.edited() == {got.n_labelled + 0} and store.excluded() == set()
    store.close()


def test_convert_of_a_folder_without_corrections_makes_no_store(tmp_path, capsys):
    mixed_folder(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "d.zarr")]) == 0
    assert "carried" not in capsys.readouterr().out
    assert CorrectionStore.existing(open_zarr(tmp_path / "d.zarr")) is None
