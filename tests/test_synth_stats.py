"""The synthetic generator and dataset statistics."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import hand_masks
from trainer.stats import class_presence, dataset_stats, duplicate_mask_groups, format_stats, mask_stats
from trainer.synth import generate


def test_deterministic_and_seed_dependent():
    a, b, c = generate(40, 4, seed=7), generate(40, 4, seed=7), generate(40, 4, seed=8)
    np.testing.assert_array_equal(a.dataset.images, b.dataset.images)
    np.testing.assert_array_equal(a.dataset.masks, b.dataset.masks)
    np.testing.assert_array_equal(a.dataset.test_images, b.dataset.test_images)
    assert a.truth == b.truth
    assert not np.array_equal(a.dataset.images, c.dataset.images)


def test_clean_images_do_not_depend_on_count():
    small, large = (
        generate(30, 0, seed=2, plant_problems=False),
        generate(200, 0, seed=2, plant_problems=False),
    )
    np.testing.assert_array_equal(small.dataset.images, large.dataset.images[:30])


def test_class_shares_near_the_real_data():
    sample = generate(400, 0, seed=11, plant_problems=False)
    share = np.bincount(sample.dataset.masks.ravel(), minlength=5) / sample.dataset.masks.size
    # real: background 24.3%, soil 33.9%, bedrock 23.3%, sand 18.4%, big rock 0.13%
    assert 0.15 < share[0] < 0.33
    assert 0.24 < share[1] < 0.45
    assert 0.14 < share[2] < 0.33
    assert 0.10 < share[3] < 0.28
    assert 0.0002 < share[4] < 0.006
    with_rock = class_presence(sample.dataset.masks)[:, 4].mean()
    assert 0.005 < with_rock < 0.08  # rare, but present


def test_images_look_like_terrain_not_noise():
    ds = generate(50, 0, seed=4, plant_problems=False).dataset
    assert 40 < ds.images.mean() < 200 and ds.images.std() > 15
    # Classes overlap in grey level: a per-pixel brightness threshold cannot separate them.
    means = [ds.images[ds.masks == c].mean() for c in (1, 2, 3)]
    assert max(means) - min(means) < 40


def test_planted_problems_are_recorded():
    s = generate(200, 0, seed=5)
    out, bad = s.truth["outlier_group"], s.truth["corrupted"]
    assert len(out) >= 3 and len(bad) >= 2 and not set(out) & set(bad)
    masks = s.dataset.masks
    assert all(np.array_equal(masks[i], masks[out[0]]) for i in out)
    # The outlier group is the largest group of identical masks.
    assert set(out) <= set(duplicate_mask_groups(masks)[0])
    for i in bad:
        assert (masks[i] != s.clean_masks[i]).mean() >= 0.08
    ok = np.setdiff1d(np.arange(200), np.r_[out, bad])
    np.testing.assert_array_equal(masks[ok], s.clean_masks[ok])


def test_stats_exact_on_hand_made_masks():
    st = mask_stats(hand_masks())
    js = st.to_json()
    assert js["images"] == 3
    assert [c["pixels"] for c in js["classes"]] == [2, 10, 4, 0, 2]
    assert [c["images"] for c in js["classes"]] == [2, 3, 2, 0, 2]
    assert abs(js["classes"][1]["share"] - 10 / 18) < 1e-12
    assert js["duplicate_mask_groups"] == [{"size": 2, "indices": [0, 2]}]
    text = format_stats(st)
    assert "Big Rock" in text and "2 images: 0, 2" in text


def test_dataset_stats_matches_mask_stats(small_sample):
    assert dataset_stats(small_sample.dataset) == mask_stats(small_sample.dataset.masks)


def test_duplicate_groups_largest_first():
    masks = np.zeros((7, 2, 2), np.uint8)
    masks[:, 0, 0] = np.arange(7)  # all different ...
    masks[[1, 5]] = 3  # ... except a pair
    masks[[0, 2, 6]] = 4  # ... and a group of three
    assert mask_stats(masks).to_json()["duplicate_mask_groups"] == [
        {"size": 3, "indices": [0, 2, 6]},
        {"size": 2, "indices": [1, 5]},
    ]


def test_duplicate_groups_are_confirmed_byte_for_byte(monkeypatch):
    """Equal digests only propose a group: masks that merely share a digest (a collision,
    forced here) are told apart by their bytes."""
    from trainer import stats

    class Collide:
        def digest(self):
            return b"0" * 16

    monkeypatch.setattr(stats.hashlib, "blake2b", lambda *a, **k: Collide())
    masks = np.zeros((5, 2, 2), np.uint8)
    masks[[1, 3], 0, 0] = 2
    masks[4, 1, 1] = 1
    assert duplicate_mask_groups(masks) == [(0, 2), (1, 3)]


def test_stats_table_for_the_terminal():
    masks = np.zeros((16, 2, 2), np.uint8)
    masks[14:, 0, 0] = [1, 2]  # 14 all-background masks, equal, and two others
    text = format_stats(mask_stats(masks))
    lines = text.splitlines()
    assert lines[0] == "16 labelled images"
    background = next(line for line in lines if "Background" in line)
    assert background.split()[-2:] == ["16", "100.0%"]
    soil = next(line for line in lines if "Soil" in line)
    assert soil.split()[-3:] == ["1.56%", "1", "6.2%"]  # 1 of 64 pixels; 1 of 16 images
    assert "1 group(s) of images with identical masks:" in text
    assert "  14 images: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ..." in lines


@pytest.mark.parametrize("chunk", [1, 50, 99, 10**6])
def test_class_counts_and_presence_in_chunks(monkeypatch, chunk):
    """Counted a chunk of pixels (of whole images) at a time, the same as image by image;
    values outside the classes (255) are not counted."""
    from trainer import stats

    rng = np.random.default_rng(3)
    masks = rng.integers(0, 3, (7, 9, 11)).astype(np.uint8)
    masks[2, 4, 5], masks[6, 0, 0] = 4, 3
    masks[5] = 255
    masks[5, 1, 1] = 1
    monkeypatch.setattr(stats, "CHUNK_PIXELS", chunk)
    want = np.array([[(m == c).any() for c in range(5)] for m in masks])
    np.testing.assert_array_equal(stats.class_presence(masks), want)
    np.testing.assert_array_equal(stats.class_pixel_counts(masks), [(masks == c).sum() for c in range(5)])
    assert stats.class_presence(masks[:0]).shape == (0, 5) and not stats.class_pixel_counts(masks[:0]).any()
    rows = np.array([6, 2, 5, 0])
    picked = masks[rows]
    np.testing.assert_array_equal(
        stats.class_pixel_counts(masks, rows), [(picked == c).sum() for c in range(5)]
    )
