"""Tiled inference: tiles cover every pixel, blend without seams, and agree with the
whole-image prediction."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.tiling import predict_any, predict_tiled, tile_layout


@pytest.mark.parametrize(
    "length, tile, overlap, m", [(100, 100, 10, 8), (101, 32, 8, 8), (500, 128, 32, 16), (40, 64, 16, 8)]
)
def test_tiles_cover_with_at_least_the_overlap_on_the_pooling_grid(length, tile, overlap, m):
    tiles = tile_layout(length, tile, overlap, m)
    assert tiles[0][0] == 0 and sum(tiles[-1]) == length
    assert all(s % m == 0 for s, _ in tiles)
    assert all(size > min(tile // m * m, length) - m for _, size in tiles)
    assert all(a + size - b >= overlap for (a, size), (b, _) in zip(tiles, tiles[1:], strict=False))


@pytest.fixture(scope="module")
def model_and_image(trained):
    return trained[:2]


@pytest.fixture(scope="module")
def trained(small_sample, tmp_path_factory):
    """A briefly trained model (an untrained one predicts one class everywhere), a frame
    and the model's checkpoint."""
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.engine import fit

    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(depth=3, base_width=8, epochs=6, batch_size=16, warmup_steps=2, lr=1e-2, device="cpu")
    events = list(fit(small_sample.dataset, cfg, run))
    model, _ = model_from_checkpoint(load_checkpoint(events[-1].best_checkpoint))
    model.eval()
    # A frame larger than a tile, of a size that is no multiple of 16: synthetic scenes side by side.
    ims = small_sample.dataset.images
    image = np.concatenate([np.concatenate(list(ims[r * 4 : r * 4 + 4]), axis=1) for r in range(3)])[
        :181, :497
    ]
    return model, np.ascontiguousarray(image), events[-1].best_checkpoint


def test_the_prediction_job_predicts_large_frames_by_tiles(trained, monkeypatch):
    """The job behind napari's predictions: frames over the whole-image limit go one at a
    time by tiles, and give what the whole-image path gives."""
    from trainer import tiling
    from trainer.control import TrainControl
    from trainer.jobs import DatasetSpec, predict_job

    _, image, checkpoint = trained
    big = np.tile(image, (2, 2))  # larger than a tile: tiles overlap and blend
    frames = np.stack([big, big[::-1]])
    spec = DatasetSpec(images=frames, masks=np.zeros_like(frames))
    results, tiled_frames = {}, []
    real = tiling.predict_tiled
    monkeypatch.setattr(
        tiling,
        "predict_tiled",
        lambda m, image, *a, **k: (tiled_frames.append(1), real(m, image, *a, **k))[1],
    )
    for limit in (10**9, 64 * 64):
        monkeypatch.setattr(tiling, "WHOLE_IMAGE_PIXELS", limit)
        sent = []
        predict_job(TrainControl(), sent.append, spec, checkpoint, "cpu", 2, confidence=True)
        results[limit] = sent[-1]
        assert [e.done for e in sent[:-1]][-1] == 2
        assert len(tiled_frames) == (0 if limit > 10**8 else 2)
    whole, tiled = results[10**9], results[64 * 64]
    assert tiled.masks.shape == whole.masks.shape == frames.shape
    assert (tiled.masks == whole.masks).mean() > 0.98
    assert np.abs(tiled.entropy.astype(float) - whole.entropy.astype(float)).mean() < 0.05
    assert tiled.confidence.shape == frames.shape


def test_tiled_agrees_with_whole_image(model_and_image):
    model, image = model_and_image
    whole = predict_any(model, image).argmax(0)
    shares = np.bincount(whole.ravel(), minlength=5) / whole.size
    assert (shares > 0.05).sum() >= 2  # a prediction with structure, not one class everywhere
    tiled = predict_tiled(model, image, tile=192, overlap=96)  # 2 x 4 tiles
    assert tiled.shape == (5, *image.shape)
    np.testing.assert_allclose(tiled.sum(0), 1, atol=1e-4)
    agree = (tiled.argmax(0) == whole).mean()
    assert agree >= 0.98, agree


def test_tiles_start_on_the_models_pooling_grid(model_and_image, monkeypatch):
    """Off the grid, max-pooling sees other windows: 97% agreement instead of 99.8%."""
    from trainer import tiling

    model, image = model_and_image
    seen = []
    real = tiling.tile_layout
    monkeypatch.setattr(tiling, "tile_layout", lambda *a: seen.append(a[3]) or real(*a))
    predict_tiled(model, image, tile=192, overlap=96)
    assert seen == [2**model.depth] * 2


def test_small_images_are_predicted_whole_large_ones_by_tiles(model_and_image, monkeypatch):
    model, image = model_and_image
    from trainer import tiling

    calls = []
    monkeypatch.setattr(
        tiling, "predict_tiled", lambda *a, **k: calls.append(a) or np.zeros((5, *image.shape))
    )
    predict_any(model, image)
    assert not calls
    predict_any(model, image, whole_pixels=1000)
    assert len(calls) == 1


@pytest.mark.parametrize("whole_pixels", [None, 1000], ids=["whole", "tiled"])
def test_validation_classes_are_the_predicted_classes(model_and_image, whole_pixels):
    """Validation takes the classes without the probabilities: the same classes as
    predict_any's, whether the frame is predicted whole or by tiles."""
    import torch

    from trainer.device import resolve_precision
    from trainer.inference import inference_model
    from trainer.tiling import WHOLE_IMAGE_PIXELS, classes_any

    model, image = model_and_image
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    pixels = whole_pixels or WHOLE_IMAGE_PIXELS
    want = predict_any(model, image, precision=precision, whole_pixels=pixels).argmax(0)
    got = classes_any(inference_model(model, device), image, device, precision, whole_pixels=pixels)
    assert got.shape == image.shape
    np.testing.assert_array_equal(got.numpy(), want)
