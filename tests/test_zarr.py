"""Converted zarr datasets: folders and npz in, the same data out, lazily when large;
every bad input stops with the file named and leaves nothing that looks complete."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import formats
from trainer.cli import main
from trainer.convert import convert
from trainer.dataset import DatasetError
from trainer.formats import StoredDataset, open_dataset, open_zarr, read_npz, write_npz


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def mixed_folder(root):
    """Two labelled frames of different sizes (neither a multiple of 16) and one unlabelled."""
    rng = np.random.default_rng(0)
    frames = {"a": (37, 50), "b": (45, 29), "c": (20, 20)}
    arrays = {}
    for name, shape in frames.items():
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        save(root / "images" / f"{name}.png", img)
        arrays[name] = [img, None]
        if name != "c":
            mask = rng.integers(0, 5, shape, dtype=np.uint8)
            save(root / "masks" / f"{name}.png", mask)
            arrays[name][1] = mask
    return arrays


def test_folder_of_mixed_sizes_keeps_each_frame(tmp_path):
    arrays = mixed_folder(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "d.zarr", workers=2)
    assert (report.labelled, report.unlabelled, report.frame, report.sizes) == (2, 1, (45, 50), 3)
    ds = open_dataset(tmp_path / "d.zarr", lazy=True)
    assert isinstance(ds, StoredDataset) and not ds.uniform  # several sizes: never stacked in memory
    assert ds.labelled_names == ["images/a", "images/b"] and ds.test_names == ["images/c"]
    for i, name in enumerate("abc"):
        np.testing.assert_array_equal(ds.image(i), arrays[name][0])
        if arrays[name][1] is not None:
            np.testing.assert_array_equal(ds.mask(i), arrays[name][1])
            counts = np.bincount(arrays[name][1].ravel(), minlength=5)
            np.testing.assert_array_equal(ds.class_pixels[i], counts)
            np.testing.assert_array_equal(ds.class_cells()[i].sum(axis=(1, 2)), counts)
    with pytest.raises(
        DatasetError, match="frames of several sizes; this command reads datasets into memory"
    ):
        open_dataset(tmp_path / "d.zarr")


def test_large_frames_are_a_file_each_and_read_back_exactly(tmp_path):
    """Frames larger than 256x256 are stored a shard (one file) a frame, cut into chunks
    inside it: browsing to a frame reads that frame's file, not a chunk of 16 frames;
    frames and crops across chunk and shard edges read back exactly."""
    rng = np.random.default_rng(1)
    shapes = {"a": (600, 1030), "b": (300, 700), "c": (600, 1030)}
    arrays = {}
    for name, shape in shapes.items():
        arrays[name] = (
            rng.integers(0, 256, shape, dtype=np.uint8),
            rng.integers(0, 5, shape, dtype=np.uint8),
        )
        save(tmp_path / "src" / "images" / f"{name}.png", arrays[name][0])
        save(tmp_path / "src" / "masks" / f"{name}.png", arrays[name][1])
    save(tmp_path / "src" / "images" / "d.png", np.zeros((600, 1030)))  # its mask: another size
    save(tmp_path / "src" / "masks" / "d.png", np.zeros((60, 103)))
    out = tmp_path / "d.zarr"
    report = convert(tmp_path / "src", out, workers=2, skip_bad=True)
    assert report.frame == (600, 1030) and len(report.skipped) == 1  # the arrays cut to 3 frames
    for array in ("images", "masks"):
        assert len([p for p in (out / array / "c").rglob("*") if p.is_file()]) == 3
    ds = open_dataset(out, lazy=True)
    assert ds.images.chunks == ds.masks.chunks == (1, 512, 512)  # a crop reads what it covers
    for i, name in enumerate("abc"):
        np.testing.assert_array_equal(ds.image(i), arrays[name][0])
        np.testing.assert_array_equal(ds.mask(i), arrays[name][1])
    np.testing.assert_array_equal(
        np.asarray(ds.images[2, 480:560, 490:1030]), arrays["c"][0][480:560, 490:1030]
    )


def test_npz_round_trip_in_memory_when_small_lazily_when_large(tmp_path, npz_path, monkeypatch):
    out = tmp_path / "n.zarr"
    assert main(["convert", str(npz_path), "--out", str(out)]) == 0
    want = read_npz(npz_path)
    got = open_dataset(out)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_array_equal(got.test_images, want.test_images)
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    lazy = open_dataset(out, lazy=True)
    assert isinstance(lazy, StoredDataset) and lazy.n_unlabelled == len(want.test_images)
    np.testing.assert_array_equal(lazy.image(len(want) + 1), want.test_images[1])


def test_small_frames_read_in_order_read_each_chunk_once(tmp_path):
    """Small frames are stored many to a chunk: reading them one after another (as
    validation, predict and suggest do) reads each chunk once, in any order correctly."""
    from trainer.synth import generate

    ds = generate(150, 60, seed=2).dataset
    path = tmp_path / "s.npz"
    write_npz(path, ds.images, ds.masks, ds.test_images, dtype="uint8")
    convert(path, tmp_path / "s.zarr")
    stored = open_zarr(tmp_path / "s.zarr")
    rows = int(stored.images.chunks[0])
    assert 1 < rows < 210  # several chunks of several frames

    class Counting:  # the zarr array, counting the reads
        def __init__(self, array):
            self.array, self.chunks, self.reads = array, array.chunks, 0

        def __getitem__(self, key):
            self.reads += 1
            return self.array[key]

    stored.images, stored.masks = Counting(stored.images), Counting(stored.masks)
    every = np.concatenate([ds.images, ds.test_images])
    for i in range(210):
        np.testing.assert_array_equal(stored.image(i), every[i])
        if i < 150:
            np.testing.assert_array_equal(stored.mask(i), ds.masks[i])
    assert stored.images.reads == -(-210 // rows) and stored.masks.reads == -(-150 // rows)
    for i in (209, 3, 150, 0):  # out of order: still the right frames
        np.testing.assert_array_equal(stored.image(i), every[i])
    mine = stored.image(5)
    mine[:] = 0  # a frame is the caller's own: the chunk kept is not changed
    np.testing.assert_array_equal(stored.image(5), every[5])


def test_npz_is_converted_a_chunk_at_a_time(tmp_path, npz_path, monkeypatch):
    """convert streams an npz (float64, as the real file) into the store: no chunk read
    holds more than the chunk size, and a member cut short stops it with nothing left."""
    import io
    import zipfile

    from trainer.formats import npz as npz_format

    want = read_npz(npz_path)
    per_image = 2 * 64 * 128 * 8  # an image and its mask in float64
    monkeypatch.setattr(npz_format, "_CHUNK_BYTES", 5 * per_image)
    seen = []
    real = npz_format._stream_member

    def spy(*args):
        for item in real(*args):
            if isinstance(item, tuple) and len(item) == 2:
                seen.append(len(item[1]))
            yield item

    monkeypatch.setattr(npz_format, "_stream_member", spy)
    from trainer.formats import zarr_writer

    read_when_written = []
    add = zarr_writer.ZarrWriter.add
    monkeypatch.setattr(
        zarr_writer.ZarrWriter, "add", lambda w, *a: (read_when_written.append(len(seen)), add(w, *a))[1]
    )
    convert(npz_path, tmp_path / "n.zarr")
    assert seen == [5] * 12 + [8]  # 60 images with masks 5 at a time, then the 8 test images
    assert read_when_written[:6] == [1] * 5 + [2]  # each chunk written before the next is read
    got = open_dataset(tmp_path / "n.zarr")
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_array_equal(got.test_images, want.test_images)
    bad = tmp_path / "cut.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((20, 2, 8, 8)))
        zf.writestr("training_set.npy", buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DatasetError, match="declares 20 images"):
        convert(bad, tmp_path / "cut.zarr")
    late = np.zeros((20, 2, 64, 128))
    late[15, 1, 3, 3] = 9  # found in the fourth chunk, after three were written
    np.savez(tmp_path / "late.npz", training_set=late)
    with pytest.raises(DatasetError, match="mask of image 15 has the value 9"):
        convert(tmp_path / "late.npz", tmp_path / "late.zarr")
    assert not list(tmp_path.glob("cut.zarr*")) and not list(tmp_path.glob("late.zarr*"))


def test_undecodable_frame_stops_and_leaves_nothing(tmp_path, capsys):
    mixed_folder(tmp_path / "src")
    (tmp_path / "src" / "images" / "b.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "d.zarr"
    assert main(["convert", str(tmp_path / "src"), "--out", str(out)]) == 2
    assert "b.png: unreadable image" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "d.zarr.partial").exists()
    assert main(["convert", str(tmp_path / "src"), "--out", str(out), "--skip-bad"]) == 0
    assert "skipped:" in capsys.readouterr().err and open_zarr(out).names == ["images/a", "images/c"]


def test_mask_of_another_size_names_the_file(tmp_path):
    mixed_folder(tmp_path / "src")
    save(tmp_path / "src" / "masks" / "a.png", np.zeros((10, 10)))
    with pytest.raises(DatasetError, match=r"a\.png: mask is 10x10 but its image a\.png is 37x50"):
        convert(tmp_path / "src", tmp_path / "d.zarr")
    assert not list(tmp_path.glob("d.zarr*"))


def test_disk_full_during_convert_leaves_nothing(tmp_path, monkeypatch):
    mixed_folder(tmp_path / "src")
    from trainer.formats import zarr_writer

    def full(self, row, image, mask):
        if row == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr_writer.ZarrWriter, "add", full)
    with pytest.raises(
        DatasetError, match=r"d\.zarr: could not be written \(the disk is full\).*nothing was left"
    ):
        convert(tmp_path / "src", tmp_path / "d.zarr")
    assert not list(tmp_path.glob("d.zarr*"))


def test_foreign_and_unfinished_stores_are_refused(tmp_path):
    import zarr

    g = zarr.open_group(tmp_path / "other.zarr", mode="w")
    g.create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(DatasetError, match="other.zarr: a zarr store, but not a marsviewer dataset"):
        open_dataset(tmp_path / "other.zarr")
    convert("synthetic:4", tmp_path / "s.zarr")
    g = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    g.attrs["complete"] = False
    with pytest.raises(DatasetError, match="did not finish"):
        open_dataset(tmp_path / "s.zarr")
    from trainer.formats.zarr_dataset import VERSION

    g.attrs.update({"complete": True, "version": VERSION + 1})
    with pytest.raises(DatasetError, match=f"written by a newer marsviewer.*reads up to {VERSION}"):
        open_dataset(tmp_path / "s.zarr")
    g.attrs["version"] = VERSION
    assert len(open_dataset(tmp_path / "s.zarr")) == 4
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(DatasetError, match="junk.zarr: not a readable zarr store"):
        open_dataset(tmp_path / "junk.zarr")


def test_existing_output_is_kept(tmp_path, capsys):
    convert("synthetic:4", tmp_path / "s.zarr")
    assert main(["convert", "synthetic:4", "--out", str(tmp_path / "s.zarr")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert len(open_zarr(tmp_path / "s.zarr").names) == 4


def test_stats_of_a_large_store_from_its_class_table(tmp_path, npz_path, monkeypatch, capsys):
    out = tmp_path / "n.zarr"
    convert(npz_path, out)
    assert main(["stats", str(npz_path)]) == 0
    from_npz = capsys.readouterr().out.splitlines()[:8]
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    assert main(["stats", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[:8] == from_npz


def test_predicting_a_dataset_read_from_disk_into_a_zarr(tmp_path, monkeypatch):
    """Every frame predicted at its own size into a padded zarr array, written a block at
    a time; the labelled frames scored against their masks (an edit in the store wins),
    through the path of small frames (batches) and of large ones (one at a time)."""
    import zarr

    from trainer import predict_stored, tiling
    from trainer.config import preset
    from trainer.inference import predict_arrays
    from trainer.metrics import confusion_matrix, per_image_miou
    from trainer.model import build_model
    from trainer.predict_stored import predict_to_disk

    arrays = mixed_folder(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "d.zarr")
    ds = open_dataset(tmp_path / "d.zarr", lazy=True)
    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    edit = np.full((45, 29), 3, np.uint8)

    class Store:
        def snapshot(self):
            return {1: edit, 2: np.ones((20, 20), np.uint8)}, set()  # 2: labelled since

    layout = predict_stored.chunk_layout
    monkeypatch.setattr(predict_stored, "chunk_layout", lambda h, w: (*layout(h, w)[:2], 2))  # blocks of 2
    said = []
    for whole in (tiling.WHOLE_IMAGE_PIXELS, 100):  # then every frame as a large one
        monkeypatch.setattr(tiling, "WHOLE_IMAGE_PIXELS", whole)
        e = predict_to_disk(model, ds, tmp_path / f"p{whole}.zarr", "cpu", Store(), lambda *a: said.append(a))
        got = zarr.open_array(e.path, mode="r")[:]
        assert got.shape == (3, 45, 50)
        truths = [arrays["a"][1], edit, np.ones((20, 20), np.uint8)]
        cm = np.zeros((5, 5), np.int64)
        for i, name in enumerate("abc"):
            h, w = arrays[name][0].shape
            want = predict_arrays(model, arrays[name][0][None], device="cpu")["masks"][0]
            assert (got[i, :h, :w] == want).mean() > 0.99 and not got[i, h:].any() and not got[i, :, w:].any()
            assert e.image_miou[i] == pytest.approx(
                per_image_miou(got[i, :h, :w][None], truths[i][None])[0], nan_ok=True
            )
            cm += confusion_matrix(got[i, :h, :w], truths[i])
        np.testing.assert_array_equal(e.confusion, cm)
    assert said[-1] == (3, 3)
