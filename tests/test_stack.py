"""The frame stack napari paints into for datasets read from disk: indexed like an array,
holding only the frames written, class counts kept up to date, memory bounded."""

from __future__ import annotations

import numpy as np
import pytest

from marsviewer import _stack
from marsviewer._stack import FrameStack, blank_like


def make(n=5, base_rows=3):
    base = np.stack([np.full((4, 6), 1 + i % 4, np.uint8) for i in range(base_rows)])
    sizes = [(4, 6), (3, 5), (4, 6), (2, 2), (4, 6)][:n]
    pixels = np.stack(
        [np.bincount(base[i, : sizes[i][0], : sizes[i][1]].ravel(), minlength=5) for i in range(base_rows)]
    )
    return base, FrameStack((n, 4, 6), base=base, sizes=sizes, class_pixels=pixels)


def test_indexed_like_an_array_and_nothing_held_by_reading():
    base, s = make()
    assert s.shape == (5, 4, 6) and s.ndim == 3 and len(s) == 5 and s.dtype == np.uint8
    np.testing.assert_array_equal(s[1], base[1])
    np.testing.assert_array_equal(s[1, 1:3, 2], base[1, 1:3, 2])
    assert (s[4] == 0).all()  # beyond the base: an unlabelled frame
    np.testing.assert_array_equal(s[0:2], base[0:2])
    rows, ys, xs = np.array([0, 2, 2]), np.array([0, 1, 3]), np.array([5, 0, 1])
    np.testing.assert_array_equal(s[rows, ys, xs], base[rows, ys, xs])
    copy = s[2]
    copy[:] = 0  # writing to what was read changes nothing
    assert (s[2] == 3).all() and s.written == {}
    with pytest.raises(IndexError):
        s[5]


def test_writes_are_held_and_counted():
    base, s = make()
    rows, ys, xs = np.array([1, 1, 4]), np.array([0, 1, 1]), np.array([0, 0, 1])
    s[rows, ys, xs] = 4  # a paint stroke over two frames, as napari writes it
    assert set(s.written) == {1, 4} and s[1][0, 0] == 4 and s[4][1, 1] == 4
    assert (base[1] == 2).all()  # the base is never written
    s[2] = 0
    s[0, 0, :] = 3
    pixels = s.class_pixels
    assert pixels[1].tolist() == [0, 0, 13, 0, 2]  # counted inside the frame's own 3x5
    assert pixels[2].tolist() == [24, 0, 0, 0, 0] and pixels[4][4] == 1
    s.forget(1)
    assert 1 not in s.written and s.class_pixels[1].tolist() == [0, 0, 15, 0, 0]
    held = s[4]
    held[0, 0] = 2  # the written frame itself, as an array row: writes show
    assert s[4][0, 0] == 2
    np.testing.assert_array_equal(s.own_size(1, s[1]), base[1, :3, :5])
    assert s.padded(3, np.ones((2, 2))).sum() == 4


def test_derived_stacks_keep_only_the_latest_frames_and_whole_reads_are_bounded(monkeypatch):
    _, s = make()
    monkeypatch.setattr(_stack, "KEEP_DERIVED", 2)
    pred = blank_like(s, np.float32)
    assert pred.dtype == np.float32 and pred.shape == s.shape
    for i in (0, 1, 2, 1, 3):
        pred[i] = i + 1
    assert list(pred.written) == [1, 3] and (pred[0] == 0).all()
    assert np.asarray(s).shape == (5, 4, 6)
    monkeypatch.setattr(_stack, "MATERIALISE_BYTES", 10)
    with pytest.raises(MemoryError, match="one frame at a time"):
        np.asarray(s)
    assert blank_like(np.zeros((2, 3))).shape == (2, 3)
