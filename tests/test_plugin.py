"""The npe2 manifest, reader, writer and sample (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest

from marsviewer._reader import get_reader
from marsviewer._sample import synthetic_mars
from marsviewer._writer import write_labels
from trainer.classes import CLASSES, ClassTable
from trainer.dataset import DatasetError


def test_manifest_is_valid_and_widget_comes_first():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("marsviewer")
    pm.validate_imports()
    contrib = pm.contributions
    assert contrib.widgets[0].command == "marsviewer.main_widget"
    assert contrib.readers[0].accepts_directories
    assert contrib.writers[0].layer_types == ["labels"]
    assert contrib.sample_data[0].key == "synthetic_mars"
    # The reader claims what it reads (npz files and folders), not every file.
    assert contrib.readers[0].filename_patterns == ["*.npz", "*.zarr"]


def test_napari_offers_the_reader_for_npz_and_folders_only(tmp_path):
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)

    def offered(path) -> bool:
        return any(r.command.startswith("marsviewer.") for r in pm.iter_compatible_readers([str(path)]))

    (tmp_path / "pairs").mkdir()
    assert offered(tmp_path / "data.npz") and offered(tmp_path / "pairs")
    assert not offered(tmp_path / "photo.tif") and not offered(tmp_path / "notes.txt")


def test_reader_reads_competition_npz(npz_path, small_sample):
    reader = get_reader(str(npz_path))
    assert reader is not None
    (img, img_kw, img_type), (msk, msk_kw, msk_type) = reader(str(npz_path))
    assert (img_type, msk_type) == ("image", "labels")
    n = len(small_sample.dataset)
    np.testing.assert_array_equal(msk[:n], small_sample.dataset.masks)
    assert img_kw["metadata"]["marsviewer"]["n_test"] == 8 and len(img) == n + 8
    assert not msk[n:].any()  # the unlabelled images follow, with empty masks
    cmap = msk_kw["colormap"]
    for c in CLASSES[1:]:
        np.testing.assert_allclose(cmap.map(np.array([c.id]))[0], c.rgba, atol=1e-6)


def test_reader_declines_other_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(3))
    assert get_reader(str(other)) is None
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert get_reader(str(empty)) is None


def test_reader_claims_broken_npz_and_explains(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"garbage")
    reader = get_reader(str(bad))
    with pytest.raises(DatasetError, match="not an npz"):
        reader(str(bad))


def test_reader_reads_folders(tmp_path):
    from tests.test_folder import make_pairs

    make_pairs(tmp_path)
    layers = get_reader(str(tmp_path))(str(tmp_path))
    assert layers[1][0].shape == (3, 8, 12)


def test_writer_npz_png_and_refuses_original(tmp_path, npz_path):
    masks = np.arange(24, dtype=np.int32).reshape(2, 3, 4) % 5
    out = write_labels(str(tmp_path / "m.npz"), masks, {})
    with np.load(out[0]) as z:
        np.testing.assert_array_equal(z["masks"], masks)
        assert "classes" not in z  # the competition's table: none written
    from trainer.synth import ROCKS_TABLE

    own = {"metadata": {"marsviewer": {"classes": ROCKS_TABLE.records()}}}
    out = write_labels(str(tmp_path / "rocks.npz"), masks % 3, own)
    with np.load(out[0]) as z:  # masks of a table of their own keep it beside them
        assert ClassTable.from_json(str(z["classes"])) == ROCKS_TABLE
    from PIL import Image

    png = write_labels(str(tmp_path / "one.png"), masks[0], {})
    np.testing.assert_array_equal(np.asarray(Image.open(png[0])), masks[0])
    with pytest.raises(ValueError, match="save as .npz"):
        write_labels(str(tmp_path / "stack.png"), masks, {})
    meta = {"metadata": {"marsviewer": {"source": str(npz_path)}}}
    before = npz_path.read_bytes()
    with pytest.raises(ValueError, match="is an input of this command"):
        write_labels(str(npz_path), masks, meta)
    store = npz_path.with_name(npz_path.stem + ".marsviewer")
    with pytest.raises(ValueError, match="lies inside an input"):
        write_labels(str(store / "m.npz"), masks, meta)  # the dataset's corrections folder
    assert npz_path.read_bytes() == before and not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_sample_is_labelled_synthetic_mars():
    (img, _, t1), (msk, kw, t2) = synthetic_mars()
    assert (t1, t2) == ("image", "labels")
    assert img.shape == msk.shape == (260, 64, 128) and msk.max() <= 4
    assert not msk[200:].any()  # 60 unlabelled images to label next, as the competition file has
    assert kw["metadata"]["marsviewer"]["role"] == "masks"
