"""Training on crops: deterministic draws, rare classes found, the same pixels from disk
as from memory, and a run that trains from a zarr dataset too large for memory."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import formats
from trainer.config import TrainConfig
from trainer.convert import convert
from trainer.crops import CropSource, MemoryFrames
from trainer.dataset import Dataset
from trainer.engine import fit
from trainer.formats import StoredDataset, open_dataset


def frames(n=6, h=96, w=160, seed=0):
    """Soil everywhere, one 10x10 big rock in one frame: a class in 0.1% of the pixels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    masks = np.ones((n, h, w), np.uint8)
    masks[:, h // 2 :] = 2
    masks[3, 70:80, 130:140] = 4
    return Dataset(images=images, masks=masks)


@pytest.fixture
def stored(tmp_path, monkeypatch):
    ds = frames()
    from trainer.formats import write_npz

    write_npz(tmp_path / "f.npz", ds.images, ds.masks, dtype="uint8")
    convert(tmp_path / "f.npz", tmp_path / "f.zarr")
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    s = open_dataset(tmp_path / "f.zarr", lazy=True)
    assert isinstance(s, StoredDataset)
    return ds, s


def test_disk_crops_equal_memory_crops_and_draws_repeat(stored):
    ds, s = stored
    rows = np.arange(6)
    disk = CropSource(s, rows, 32, 8, seed=1)
    memory = CropSource(MemoryFrames(ds.masks, ds.images, 6), rows, 32, 8, seed=1)
    a = list(disk.batches(0, 0, 3))
    b = list(memory.batches(0, 0, 3))
    for (ia, ma), (ib, mb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    assert disk.plan(0, 2) == memory.plan(0, 2) != disk.plan(1, 2)
    assert CropSource(s, rows, 32, 8, seed=1, rank=1).plan(0, 2) != disk.plan(0, 2)
    for _row, y, x in disk.plan(0, 0) + disk.plan(5, 1):
        assert 0 <= y <= 96 - 32 and 0 <= x <= 160 - 32
    resumed = list(disk.batches(0, 2, 3))  # a run resumed at batch 2 reads what batch 2 read
    np.testing.assert_array_equal(resumed[0][0], a[2][0])


def test_class_aware_crops_find_a_rare_class(stored):
    _, s = stored
    source = CropSource(s, np.arange(6), 32, 16, seed=0)
    crops = [m for k in range(20) for m in source.read(source.plan(0, k))[1]]
    with_rock = np.mean([(m == 4).any() for m in crops])
    # Big rock is 1 of 3 foreground classes: about 1/6 of the crops; uniform crops: about 1%.
    assert with_rock > 0.1, with_rock


def test_crops_fit_small_frames_and_ignore_what_lies_beyond():
    """Without --tile, a crop is 256 a side or the largest frame's side (up to the U-Net's
    multiple); where a frame is smaller than its crop, the mask is ignored there (with a
    background weight, a 0 there would teach the model that padding is background)."""
    from trainer.crops import disk_tile
    from trainer.losses import IGNORE_INDEX

    assert disk_tile(np.array([[64, 128], [45, 77]]), 8) == (64, 128)
    assert disk_tile(np.array([[45, 77]]), 8) == (48, 80)
    assert disk_tile(np.array([[1024, 1024], [64, 128]]), 8) == (256, 256)
    assert disk_tile(np.array([[300, 40]]), 16) == (256, 48)
    masks = np.ones((2, 20, 30), np.uint8)
    masks[:, 10:] = 2
    images = np.full((2, 20, 30), 7, np.uint8)
    source = CropSource(MemoryFrames(masks, images, 2), np.arange(2), (24, 32), 4, seed=0)
    images, masks = source.read(source.plan(0, 0))
    assert images.shape == masks.shape == (4, 24, 32)
    assert (masks[:, 20:] == IGNORE_INDEX).all() and (masks[:, :, 30:] == IGNORE_INDEX).all()
    assert (images[:, 20:] == 0).all() and (images[:, :20, :30] == 7).all()
    assert set(np.unique(masks[:, :20, :30])) == {1, 2}
    # An unlabelled frame (row 1 of a source with one labelled) has no mask to read: its
    # crop is ignored everywhere until a correction labels it.
    source = CropSource(
        MemoryFrames(np.ones((2, 20, 30), np.uint8), images[:2, :20, :30], 1), [0], 16, 1, seed=0
    )
    assert (source.read([(1, 0, 0)])[1] == IGNORE_INDEX).all()
    assert (source.read([(0, 0, 0)])[1] == 1).all()


def test_class_aware_crops_are_centred_on_the_class():
    """A class-aware crop is centred on a point of a cell holding the class, so the class
    comes with context on every side, not at a crop's corner."""
    h = w = 1024
    masks = np.zeros((1, h, w), np.uint8)
    masks[0, 512:576, 512:576] = 4  # the only foreground: one 64x64 cell in the middle
    images = np.zeros_like(masks)
    source = CropSource(MemoryFrames(masks, images, 1), np.arange(1), 256, 16, seed=0)
    plan = [c for k in range(16) for c in source.plan(0, k)]
    # the cell with at least 64 pixels of context on each side: nearly only class-aware
    # crops (half of them), a uniform crop in well under 1% of draws
    centred = np.mean([y <= 512 - 64 and y + 256 >= 576 + 64 and x <= 512 - 64 and x + 256 >= 576 + 64
                       for _, y, x in plan])  # fmt: skip
    assert 0.35 < centred < 0.65, centred


def test_training_from_disk_by_crops(stored, tmp_path, monkeypatch):
    """...and a validation of frames from disk says how far it is as it goes (a large
    dataset's takes minutes): a Progress event before it, then as frames are done."""
    from trainer import epoch_end

    monkeypatch.setattr(epoch_end, "PROGRESS_EVERY_S", 0.0)  # after every frame
    _, s = stored
    cfg = TrainConfig(
        depth=2, base_width=8, epochs=2, batch_size=4, warmup_steps=1, device="cpu", val_fraction=0.34
    )
    from trainer.control import TrainControl
    from trainer.inference import predict_arrays

    events = list(fit(s, cfg, tmp_path / "run", control=TrainControl(preview_indices=[3, -1, 99])))
    started, last = events[0], events[-1]
    # frames smaller than 256x256: crops of the frames' size (96x160), not padded to 256x256
    assert started.data.startswith("96x160 crops (2 a step, the pixels of 4 images of 64x128) read from disk")
    assert last.kind == "finished"
    # previews of frames from disk: the rows it has, with the entropy prediction gives
    preview = [e for e in events if e.kind == "preview"][-1]
    assert preview.indices == [3] and preview.masks.shape == (1, 96, 160)
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    want = predict_arrays(model, s.image(3)[None], with_entropy=True)
    assert (preview.masks == want["masks"]).mean() > 0.99
    np.testing.assert_allclose(preview.entropy.astype(float), want["entropy"].astype(float), atol=0.01)
    validations = [e for e in events if e.kind == "validation"]
    assert len(validations) == 2 and validations[0].images == 2
    assert sum(map(sum, validations[0].confusion)) == 96 * 160 * validations[0].images
    before = events[: events.index(validations[0])]
    said = [(e.done, e.total) for e in before if e.kind == "progress"]
    assert said == [(0, 2), (1, 2), (2, 2)] and before[-3].kind == "progress"


def test_a_stop_request_ends_a_validation_from_disk_part_way(stored, tmp_path, monkeypatch):
    """A validation of large frames takes minutes: Stop ends it after the frame at hand,
    says Stopped with a checkpoint, and a resume goes on with the next epoch."""
    from trainer import epoch_end
    from trainer.control import TrainControl

    monkeypatch.setattr(epoch_end, "PROGRESS_EVERY_S", 0.0)
    _, s = stored
    cfg = TrainConfig(
        depth=2, base_width=8, epochs=2, batch_size=4, warmup_steps=1, device="cpu", val_fraction=0.34
    )
    control, events = TrainControl(), []
    for e in fit(s, cfg, tmp_path / "run", control=control):
        events.append(e)
        if e.kind == "progress":
            control.request_stop()  # seen at the start of the first validation
    kinds = [e.kind for e in events]
    assert "validation" not in kinds and kinds[-1] == "stopped" and events[-1].checkpoint
    assert [(e.done, e.total) for e in events if e.kind == "progress"] == [(0, 2)]  # one frame, then out
    resumed = list(fit(s, cfg, tmp_path / "run2", resume=events[-1].checkpoint))
    assert resumed[0].start_epoch == 1 and resumed[-1].kind == "finished"
    assert [e.epoch for e in resumed if e.kind == "validation"] == [1]


def test_a_pause_holds_a_validation_from_disk_between_frames(stored, tmp_path, monkeypatch):
    """Where the GUI cannot suspend the child, it pauses it: a validation of frames from
    disk holds between frames as training holds between steps (here until a stop)."""
    from trainer import epoch_end
    from trainer.control import TrainControl

    monkeypatch.setattr(epoch_end, "PROGRESS_EVERY_S", 0.0)
    _, s = stored
    cfg = TrainConfig(
        depth=2, base_width=8, epochs=1, batch_size=4, warmup_steps=1, device="cpu", val_fraction=0.34
    )
    control, polls = TrainControl(), []

    def poll():  # what the child's command pipe does; a stop arrives after a few polls
        if control.paused:
            polls.append(1)
            if len(polls) == 4:
                control.request_stop()

    control.poll = poll
    kinds = []
    for e in fit(s, cfg, tmp_path / "run", control=control):
        kinds.append(e.kind)
        if e.kind == "progress":
            control.pause(60)
    assert len(polls) == 4 and "validation" not in kinds and kinds[-1] == "stopped"


def test_training_from_disk_takes_corrections(stored, tmp_path):
    """A zarr dataset on disk keeps its corrections by name: the crops and the validation
    read the corrected masks, an excluded frame leaves both splits."""
    from trainer.control import TrainControl
    from trainer.corrections import CorrectionStore
    from trainer.engine import _Trainer

    _, s = stored
    store = CorrectionStore.for_dataset(s)
    for i in range(5):
        store.save_mask(i, np.full((96, 160), 3, np.uint8))  # every frame but the last is sand
    store.exclude(5)
    cfg = TrainConfig(depth=2, base_width=8, epochs=1, batch_size=4, warmup_steps=1, device="cpu")
    events = list(fit(s, cfg, tmp_path / "run", corrections=store))
    update = next(e for e in events if e.kind == "data_update")
    assert (update.corrected, update.excluded, update.train_images) == (5, 1, 4)
    val = next(e for e in events if e.kind == "validation")
    confusion = np.array(val.confusion)
    assert val.images == 1 and confusion.sum() == confusion[3].sum() == 96 * 160
    run = _Trainer(s, cfg, None, TrainControl(), None, store)
    run.reload_corrections()
    images, masks = run.crops.read(run.crops.plan(0, 0))
    assert (masks[:, :96, :160] == 3).all() and 5 not in run.crops.rows


def test_a_budget_estimates_a_validation_of_frames_by_their_pixels(tmp_path, monkeypatch):
    """Before its first validation, a budgeted run times one frame of its split (after one
    that warms up) and scales by pixels: on a clock that the test moves by a second per
    thousand pixels validated, the estimate is the whole split's time to the second."""
    from PIL import Image

    from trainer import epoch_end
    from trainer.control import TrainControl
    from trainer.engine import _Trainer

    rng = np.random.default_rng(0)
    shapes = [(40, 64), (64, 96), (48, 48), (96, 64), (40, 40), (64, 64), (80, 48), (32, 96)]
    for k, shape in enumerate(shapes):
        for kind, high in (("images", 256), ("masks", 5)):
            (tmp_path / "src" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, high, shape, dtype=np.uint8)).save(
                tmp_path / "src" / kind / f"{k}.png"
            )
    convert(tmp_path / "src", tmp_path / "d.zarr")
    s = open_dataset(tmp_path / "d.zarr", lazy=True)
    assert isinstance(s, StoredDataset) and not s.uniform
    now = {"t": 0.0}
    real = epoch_end.frames_confusion

    def slow(model, stored, rows, *args, **kwargs):
        for i in rows:
            now["t"] += stored.image(int(i)).size / 1000
        return (yield from real(model, stored, rows, *args, **kwargs))

    monkeypatch.setattr(epoch_end, "frames_confusion", slow)
    cfg = TrainConfig(
        depth=2, base_width=8, epochs=0, minutes=1.0, batch_size=2, tile=32, val_fraction=0.5, device="cpu"
    )
    run = _Trainer(s, cfg, None, TrainControl(clock=lambda: now["t"]), None, None)
    run.estimate_validation()
    whole = sum(s.image(int(i)).size for i in run.val_idx) / 1000
    first = s.image(int(run.val_idx[0])).size / 1000
    assert len(run.val_idx) >= 3 and len({s.image(int(i)).shape for i in run.val_idx}) >= 2
    assert run.validation_s == pytest.approx(whole) and now["t"] == pytest.approx(
        first + s.image(int(run.val_idx[1])).size / 1000
    )


def test_a_step_of_crops_holds_the_pixels_of_a_batch_of_small_images():
    """32 crops of 256x256 held 2.3 GB on a hundred 512x560 frames and ran slower per
    pixel than small images; a step of crops carries the pixels of batch_size images of
    64x128 unless crop_batch says otherwise."""
    from trainer.config import preset
    from trainer.crops import crop_batch

    cfg = preset("cpu")
    assert cfg.batch_size == 32
    assert crop_batch(cfg, (256, 256)) == 4
    assert crop_batch(cfg, (64, 128)) == 32
    assert crop_batch(cfg, (1024, 1024)) == 1  # never none
    assert crop_batch(cfg.replace(crop_batch=12), (256, 256)) == 12


def test_frames_larger_than_a_crop_train_by_crops_unless_told_otherwise():
    from trainer import events as ev
    from trainer.config import preset
    from trainer.engine import fit
    from trainer.synth import generate

    ds = generate(6, 0, seed=1, shape=(264, 300), plant_problems=False).dataset
    cfg = preset("tiny").replace(epochs=1)
    started = next(e for e in fit(ds, cfg) if isinstance(e, ev.Started))
    assert started.data.startswith("256x256 crops (1 a step") and "larger than 256" in started.data
    small = generate(6, 0, seed=1, shape=(64, 128), plant_problems=False).dataset
    assert next(iter(fit(small, cfg))).data.startswith("whole images held in memory")
