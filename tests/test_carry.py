"""``convert`` carries the saved corrections of a folder (by name), an npz or the
synthetic sample (by position under the content hash) into the converted dataset's own
store; the dataset's masks stay the originals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.test_zarr import mixed_folder, save
from trainer.cli import main
from trainer.corrections import CorrectionStore
from trainer.formats import open_dataset, open_zarr, write_npz
from trainer.store_location import DatasetHasher, dataset_hash


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
    assert "carried the saved corrections" in printed.out and "2 saved masks, 1 exclusions" in printed.out
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


def test_convert_makes_no_store_when_nothing_it_found_fits(tmp_path, capsys):
    """A source whose only correction cannot be carried (a mask of another size) gives the
    converted dataset no store of its own: nothing was carried into one."""
    mixed_folder(tmp_path / "src")
    ds = open_dataset(tmp_path / "src", size=(20, 20))
    store = CorrectionStore.for_dataset(ds)
    store.save_mask(0, np.ones((20, 20), np.uint8))  # a: 37x50 on disk
    store.close()
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "d.zarr")]) == 0
    assert "images/a: its saved mask is not the size of its frame" in capsys.readouterr().err
    assert CorrectionStore.existing(open_zarr(tmp_path / "d.zarr")) is None


def test_convert_of_a_folder_without_corrections_makes_no_store(tmp_path, capsys):
    mixed_folder(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "d.zarr")]) == 0
    assert "carried" not in capsys.readouterr().out
    assert CorrectionStore.existing(open_zarr(tmp_path / "d.zarr")) is None


def _save_on(ds) -> set[int]:
    """A corrected mask for image 1, image 2 excluded and, where there are unlabelled
    images, a label for the first; returns the rows given a mask."""
    h, w = ds.image_shape
    store = CorrectionStore.for_dataset(ds)
    store.save_mask(1, np.full((h, w), 2, np.uint8))
    store.exclude(2)
    if ds.test_images is not None:
        store.save_mask(len(ds) + 0, np.full((h, w), 3, np.uint8))
    store.close()
    return {1} if ds.test_images is None else {1, len(ds)}


@pytest.mark.parametrize("source", ["npz", "synthetic:6:3"])
def test_convert_of_an_npz_or_the_synthetic_sample_carries_its_corrections(tmp_path, capsys, source):
    """An npz's store is found by a hash of its content: the streamed conversion computes
    the same hash as reading the file into memory, and the rows are the same."""
    if source == "npz":
        rng = np.random.default_rng(2)
        images = rng.integers(0, 256, (5, 16, 24), dtype=np.uint8)
        masks = rng.integers(0, 5, (5, 16, 24), dtype=np.uint8)
        write_npz(tmp_path / "site.npz", images, masks, rng.integers(0, 256, (3, 16, 24), dtype=np.uint8))
        source = str(tmp_path / "site.npz")
    ds = open_dataset(source)
    edited = _save_on(ds)
    out = tmp_path / "d.zarr"
    assert main(["convert", source, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"{len(edited)} saved masks, 1 exclusions" in printed.out and "not carried" not in printed.err
    got = open_zarr(out)
    for i in range(len(ds)):  # the dataset's masks are the originals
        np.testing.assert_array_equal(got.mask(i), ds.masks[i])
    store = CorrectionStore.existing(got)
    try:
        assert store.edited() == edited and store.excluded() == {2}
        assert (store.state(1)[0] == 2).all()
        assert all((m == 3).all() for m in store.pool_labels().values())
        assert [e.note for e in store.history(2)] == [f"carried from {Path(source).name}"]
    finally:
        store.close()


def test_convert_of_a_changed_npz_says_its_corrections_are_not_carried(tmp_path, capsys):
    """Corrections saved for an npz whose content has changed since (a mask rewritten)
    belong to other content: said, not carried, and the store is left as it is."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (4, 16, 24), dtype=np.uint8)
    masks = rng.integers(0, 5, (4, 16, 24), dtype=np.uint8)
    write_npz(tmp_path / "site.npz", images, masks)
    _save_on(open_dataset(tmp_path / "site.npz"))
    masks[3, 0, 0] = (masks[3, 0, 0] + 1) % 5
    write_npz(tmp_path / "site.npz", images, masks)
    assert main(["convert", str(tmp_path / "site.npz"), "--out", str(tmp_path / "d.zarr")]) == 0
    err = capsys.readouterr().err
    assert "correction not carried: (all):" in err and "belong to another dataset" in err
    assert CorrectionStore.existing(open_zarr(tmp_path / "d.zarr")) is None


def test_the_hash_of_chunks_is_the_hash_stores_were_written_with():
    """Stores written by earlier versions hold blake2b(shape, images, masks): adding the
    same arrays a chunk at a time must give that hash, or their corrections are lost."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 6, 8), dtype=np.uint8)
    masks = rng.integers(0, 5, (7, 6, 8), dtype=np.uint8)
    h = hashlib.blake2b(digest_size=16)
    for part in (b"(7, 6, 8)", images.tobytes(), masks.tobytes()):
        h.update(part)
    hasher = DatasetHasher((np.int64(7), 6, 8))
    for rows in (slice(0, 3), slice(3, 5), slice(5, 7)):
        hasher.add(images[rows], masks[rows])
    assert hasher.hexdigest() == dataset_hash(images, masks) == h.hexdigest()
