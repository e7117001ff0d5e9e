"""The competition .npz reader: good files in every dtype, and every kind of bad file."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from trainer.dataset import DatasetError
from trainer.formats import read_npz, write_npz


@pytest.mark.parametrize("dtype", ["float64", "float32", "uint8", "int64", "int16"])
def test_reads_any_whole_number_dtype(tmp_path, small_sample, dtype):
    ds = small_sample.dataset
    path = tmp_path / "any_name.npz"
    write_npz(path, ds.images, ds.masks, ds.test_images, dtype=dtype)
    got = read_npz(path)
    assert got.images.dtype == np.uint8 and got.masks.dtype == np.uint8
    np.testing.assert_array_equal(got.images, ds.images)
    np.testing.assert_array_equal(got.masks, ds.masks)
    np.testing.assert_array_equal(got.test_images, ds.test_images)
    assert got.source == str(path)


def test_compressed_npz_and_no_test_set(tmp_path, small_sample):
    ds = small_sample.dataset
    path = tmp_path / "c.npz"
    np.savez_compressed(path, training_set=np.stack([ds.images, ds.masks], 1).astype(np.float64))
    got = read_npz(path)
    assert got.test_images is None
    np.testing.assert_array_equal(got.masks, ds.masks)


def test_streams_in_chunks(tmp_path, small_sample, monkeypatch):
    """Chunk boundaries must not shift or drop images."""
    import trainer.formats.npz as npz

    monkeypatch.setattr(npz, "_CHUNK_BYTES", 7 * 2 * 64 * 128 * 8)  # 7 images a chunk
    ds = small_sample.dataset
    path = tmp_path / "x.npz"
    write_npz(path, ds.images, ds.masks)
    np.testing.assert_array_equal(read_npz(path).images, ds.images)


def _write(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _training(n=4, h=8, w=16, dtype=np.float64):
    rng = np.random.default_rng(0)
    t = np.zeros((n, 2, h, w), dtype)
    t[:, 0] = rng.integers(0, 256, (n, h, w))
    t[:, 1] = rng.integers(0, 5, (n, h, w))
    return t


def expect_error(path, *fragments):
    with pytest.raises(DatasetError) as info:
        read_npz(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_not_an_npz(tmp_path):
    p = tmp_path / "notes.npz"
    p.write_text("hello")
    expect_error(p, "not an npz")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.npz", "no such file")


def test_truncated(tmp_path):
    p = _write(tmp_path / "t.npz", training_set=_training(50))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    expect_error(p, "npz")


def test_truncated_member_keeps_directory(tmp_path):
    """A member cut short inside an otherwise valid zip is reported as truncated."""
    full = _training(20)
    p = tmp_path / "m.npz"
    with zipfile.ZipFile(p, "w") as zf:
        import io

        buf = io.BytesIO()
        np.save(buf, full)
        zf.writestr("training_set.npy", buf.getvalue()[: len(buf.getvalue()) // 2])
    expect_error(p, "truncated")


def test_missing_key(tmp_path):
    p = _write(tmp_path / "k.npz", images=np.zeros((2, 4, 4)))
    expect_error(p, "missing key 'training_set'", "images")


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((4, 8, 16), "(N, 2, H, W)"),
        ((4, 3, 8, 16), "(N, 2, H, W)"),
        ((0, 2, 8, 16), "empty"),
        ((4, 2, 0, 16), "empty"),
    ],
)
def test_wrong_training_shape(tmp_path, shape, fragment):
    p = _write(tmp_path / "s.npz", training_set=np.zeros(shape))
    expect_error(p, fragment)


def test_wrong_test_shape(tmp_path):
    p = _write(tmp_path / "ts.npz", training_set=_training(), test_set=np.zeros((3, 8, 8)))
    expect_error(p, "test_set", "same size")
    p = _write(tmp_path / "ts2.npz", training_set=_training(), test_set=np.zeros((3, 2, 8, 16)))
    expect_error(p, "test_set", "(M, H, W)")


def test_a_bad_value_past_the_first_chunk_names_its_own_image(tmp_path, monkeypatch):
    import trainer.formats.npz as npz

    monkeypatch.setattr(npz, "_CHUNK_BYTES", 3 * 2 * 8 * 16 * 8)  # 3 images a chunk
    t = _training(n=10)
    t[7, 1, 4, 4] = 9
    expect_error(_write(tmp_path / "c.npz", training_set=t), "mask of image 7", "value 9")
    test = np.zeros((8, 8, 16))
    test[7, 0, 0] = 300  # test images are half the size: 6 a chunk, this one in the second
    expect_error(_write(tmp_path / "t.npz", training_set=_training(), test_set=test), "test_set", "image 7")


def test_mask_out_of_range(tmp_path):
    t = _training()
    t[2, 1, 0, 0] = 7
    expect_error(_write(tmp_path / "r.npz", training_set=t), "mask of image 2", "value 7", "0..4")


def test_mask_value_five_is_refused_with_the_image_named(tmp_path):
    """5 is one past the last class: refused (a DatasetError, whatever its wording)."""
    t = _training()
    t[1, 1, 2, 2] = 5
    with pytest.raises(DatasetError) as info:
        read_npz(_write(tmp_path / "five.npz", training_set=t))
    assert "image 1" in str(info.value)
    t[1, 1, 2, 2] = 4
    assert read_npz(_write(tmp_path / "four.npz", training_set=t)).masks.max() == 4


@pytest.mark.parametrize("value, says", [(256.0, "value 256"), (-3.0, "value -3"), (2.5, "whole number")])
def test_test_set_values_are_checked_too(tmp_path, value, says):
    test = np.zeros((3, 8, 16))
    test[2, 0, 0] = value
    p = _write(tmp_path / "t.npz", training_set=_training(), test_set=test)
    expect_error(p, "test_set", "image 2", says)


def test_negative_image_value(tmp_path):
    t = _training()
    t[1, 0, 3, 3] = -1
    expect_error(_write(tmp_path / "n.npz", training_set=t), "image of image 1", "0..255")


def test_fractional_mask(tmp_path):
    t = _training()
    t[3, 1, 1, 1] = 1.5
    expect_error(_write(tmp_path / "f.npz", training_set=t), "mask of image 3", "1.5", "whole number")


def test_nan_pixels(tmp_path):
    t = _training()
    t[0, 0, 0, 0] = np.nan
    expect_error(_write(tmp_path / "nan.npz", training_set=t), "image of image 0", "NaN")


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    p = _write(tmp_path / "o.npz", training_set=np.array([{"a": 1}], dtype=object))
    expect_error(p, "dtype object")


def test_original_file_is_not_written(npz_path):
    before = npz_path.read_bytes()
    read_npz(npz_path)
    assert npz_path.read_bytes() == before


def test_header_declaring_more_than_the_file_holds(tmp_path):
    """A header that declares 10^6 images of 1024x1024 is refused before allocating."""
    import io

    buf = io.BytesIO()
    np.save(buf, _training(4))
    data = buf.getvalue()
    header = data[: data.index(b"\n") + 1].decode("latin1")
    fake = header.replace("(4, 2,", "(1000000, 2,").replace("8, 16)", "1024, 1024)")
    fake = fake[:-1].rstrip().ljust(len(header) - 1) + "\n"  # same header length
    assert len(fake) == len(header)
    p = tmp_path / "huge.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("training_set.npy", fake.encode("latin1") + data[len(header) :])
    expect_error(p, str(p), "declares 1000000 images", "TB", "damaged or truncated")
