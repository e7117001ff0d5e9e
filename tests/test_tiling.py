"""Tiled inference: tiles cover every pixel, blend without seams, and agree with the
whole-image prediction."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.synth import generate
from trainer.tiling import _ramp, predict_any, predict_tiled, tile_layout, tile_size


@pytest.mark.parametrize(
    "length, tile, overlap, m", [(100, 100, 10, 8), (101, 32, 8, 8), (500, 128, 32, 16), (40, 64, 16, 8)]
)
def test_tiles_cover_with_at_least_the_overlap_on_the_pooling_grid(length, tile, overlap, m):
    tiles = tile_layout(length, tile, overlap, m)
    assert tiles[0][0] == 0 and sum(tiles[-1]) == length
    assert all(s % m == 0 for s, _ in tiles)
    assert all(size > min(tile // m * m, length) - m for _, size in tiles)
    assert len(tiles) == 1 or all(size <= tile // m * m for _, size in tiles)  # the last one too
    assert all(a + size - b >= overlap for (a, size), (b, _) in zip(tiles, tiles[1:], strict=False))


def test_windows_blend_to_one_across_an_overlap_and_never_dim_an_image_edge():
    tile, k = 64, 16
    inner = _ramp(tile, k, at_start=False, at_end=False)
    assert inner[0] < 0.01 and inner[-1] < 0.01 and (inner[k:-k] == 1).all()
    assert (np.diff(inner[:k]) > 0).all()  # rising towards the tile's middle
    # the falling end of one tile and the rising start of the next sum to 1 pixel by pixel
    np.testing.assert_allclose(inner[-k:] + inner[:k], 1, atol=1e-6)
    edges = _ramp(tile, k, at_start=True, at_end=True)
    assert (edges == 1).all()
    first = _ramp(tile, k, at_start=True, at_end=False)
    assert first[0] == 1 and first[-1] < 0.01


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_tile_overlap_covers_twice_the_models_reach(depth):
    """How far an input pixel reaches into the output, found by autograd on the model
    itself: tiles overlap by at least twice that, so that the middle of each overlap sees
    the whole context, whatever the depth."""
    import torch

    from trainer.model import UNet

    torch.manual_seed(0)
    model = UNet(depth=depth, base_width=2).eval()
    with torch.no_grad():  # positive weights: no ReLU is dead, every path carries a gradient
        for p in model.parameters():
            p.uniform_(0.01, 0.1)
    size = 32 * 2**depth
    x = torch.rand(4, 1, size, size, requires_grad=True)  # max-pooling routes each image its own way
    model(x)[:, :, size // 2, size // 2].sum().backward()
    reached = np.flatnonzero(x.grad.abs().sum((0, 1, 3)).numpy())
    reach = max(size // 2 - reached.min(), reached.max() - size // 2)
    assert reach > 6 * 2**depth  # found, not cut short by dead paths
    tile, overlap = tile_size(model)
    assert overlap >= 2 * reach and tile >= 3 * overlap


def test_frames_are_shared_between_processes(model_and_image):
    """Under torchrun each process validates its own share of the frames; the shares'
    counts add up to one process's."""
    import torch

    from trainer.device import DistContext
    from trainer.tiling import frames_confusion

    model, image = model_and_image

    class Frames:
        def image(self, i):
            return np.ascontiguousarray(np.roll(image, 7 * i, axis=1))

        def mask(self, i):
            return (np.arange(image.size).reshape(image.shape) * (i + 1) % 5).astype(np.uint8)

    def run(dist):
        gen = frames_confusion(model, Frames(), range(5), "cpu", dist=dist, reduce=False)
        totals = []
        while True:
            try:
                totals.append(next(gen))
            except StopIteration as stop:
                return totals, stop.value.matrix

    alone, everything = run(DistContext())
    (first, a), (second, b) = run(DistContext(0, 2)), run(DistContext(1, 2))
    assert (
        [t for _, t in alone] == [5] * 5
        and [t for _, t in first] == [3] * 3
        and [t for _, t in second] == [2] * 2
    )
    assert torch.equal(a + b, everything) and int(a.sum()) == 3 * image.size


@pytest.fixture(scope="module")
def model_and_image(trained):
    return trained[:2]


@pytest.fixture(scope="module")
def trained(small_sample, tmp_path_factory):
    """A briefly trained model (an untrained one predicts one class everywhere), a frame
    and the model's checkpoint. 200 images, 100 steps: 54 images and 24 steps left it
    predicting one class or not by the rounding of a sum (seeds 0-2 here: mIoU 0.28-0.36)."""
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.engine import fit

    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(depth=3, base_width=8, epochs=4, batch_size=8, warmup_steps=2, lr=5e-3, device="cpu")
    events = list(fit(generate(200, 0, seed=3).dataset, cfg, run))
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
def test_validation_classes_are_the_predicted_classes(model_and_image, whole_pixels, monkeypatch):
    """Validation takes the classes without the probabilities: the same classes as
    predict_any's, whether the frame is predicted whole or by tiles (and by tiles only
    when it is larger than ``whole_pixels``)."""
    import torch

    from trainer import tiling
    from trainer.device import resolve_precision
    from trainer.inference import inference_model
    from trainer.tiling import WHOLE_IMAGE_PIXELS, classes_any

    tiled = []
    real = tiling.predict_tiled
    monkeypatch.setattr(tiling, "predict_tiled", lambda *a, **k: tiled.append(1) or real(*a, **k))

    model, image = model_and_image
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    pixels = whole_pixels or WHOLE_IMAGE_PIXELS
    want = predict_any(model, image, precision=precision, whole_pixels=pixels).argmax(0)
    tiled.clear()
    got = classes_any(inference_model(model, device), image, device, precision, whole_pixels=pixels)
    assert len(tiled) == (0 if whole_pixels is None else 1)
    assert got.shape == image.shape
    np.testing.assert_array_equal(got.numpy(), want)
