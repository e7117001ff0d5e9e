"""fit(): events, run directory, reproducibility, stop, resume, failures, checkpoints."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from trainer import events as ev
from trainer.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from trainer.config import preset
from trainer.device import DeviceError, resolve_device
from trainer.engine import TrainControl, fit
from trainer.inference import stratified_split
from trainer.stats import class_presence
from trainer.synth import generate


@pytest.fixture(scope="module")
def data():
    return generate(48, 4, seed=0).dataset


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    control = TrainControl(preview_indices=[0, 5])
    events = list(fit(data, preset("tiny"), run, control=control))
    return run, events


def test_event_stream_and_run_directory(tiny_run, data):
    run, events = tiny_run
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert {"step", "validation", "checkpoint", "preview"} <= set(kinds)
    started = events[0]
    assert started.train_images + started.val_images == len(data)
    vals = [e for e in events if isinstance(e, ev.Validation)]
    assert len(vals) == preset("tiny").epochs
    assert all(len(v.iou) == 5 and len(v.confusion) == 5 for v in vals)
    # the model learns: the last validation beats the first
    assert vals[-1].miou > vals[0].miou
    previews = [e for e in events if isinstance(e, ev.Preview)]
    assert previews[-1].indices == [0, 5] and previews[-1].masks.shape == (2, 64, 128)
    assert previews[-1].entropy.shape == (2, 64, 128)
    # the run directory holds the same events, the config, the split, checkpoints
    lines = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == kinds
    assert (run / "config.toml").exists() and (run / "summary.json").exists()
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == list(range(len(data)))
    with np.load(run / "previews" / "latest.npz") as z:
        assert z["masks"].shape == (2, 64, 128)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_miou"] == pytest.approx(max(v.miou for v in vals))


def test_checkpoints_load_safely_and_reproduce_the_metric(tiny_run, data):
    run, events = tiny_run
    ck = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ck["classes"][4]["name"] == "Big Rock" and ck["config"]["depth"] == 2
    model, cfg = model_from_checkpoint(ck)
    from trainer.inference import confusion_on

    cm = confusion_on(
        model, torch.from_numpy(data.images), torch.from_numpy(data.masks), np.asarray(ck["val_indices"]), 8
    )
    best = max(e.miou for e in events if isinstance(e, ev.Validation))
    assert cm.compute()["miou"] == pytest.approx(best, abs=1e-6)


def test_bit_exact_rerun_on_cpu(data):
    cfg = preset("tiny").replace(epochs=1)

    def run():
        return [e.loss for e in fit(data, cfg) if isinstance(e, ev.Step)]

    assert run() == run()


def test_stop_between_steps_saves_checkpoint(data, tmp_path):
    control = TrainControl()
    events = []
    for e in fit(data, preset("tiny"), tmp_path, control=control):
        events.append(e)
        if isinstance(e, ev.Step) and e.step == 3:
            control.request_stop()
    assert isinstance(events[-1], ev.Stopped)
    assert events[-1].checkpoint and (tmp_path / "checkpoints" / "last.pt").exists()
    assert load_checkpoint(events[-1].checkpoint)["step"] == 3


def test_resume_continues_from_the_checkpoint(data, tmp_path):
    list(fit(data, preset("tiny").replace(epochs=1), tmp_path))
    events = list(
        fit(
            data,
            preset("tiny").replace(epochs=3),
            tmp_path / "more",
            resume=tmp_path / "checkpoints" / "last.pt",
        )
    )
    assert events[0].start_epoch == 1 and events[0].resumed_from
    assert [e.epoch for e in events if isinstance(e, ev.Validation)] == [1, 2]
    with pytest.raises(CheckpointError, match="another architecture"):
        list(
            fit(
                data,
                preset("tiny").replace(depth=3),
                tmp_path / "x",
                resume=tmp_path / "checkpoints" / "last.pt",
            )
        )


def test_nan_loss_fails_cleanly_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    from trainer import losses

    calls = {"n": 0}
    original = losses.SegmentationLoss.forward

    def poisoned(self, logits, target):
        calls["n"] += 1
        value = original(self, logits, target)
        return value * float("nan") if calls["n"] > 12 else value  # after the first epoch (11 steps)

    monkeypatch.setattr(losses.SegmentationLoss, "forward", poisoned)
    events = list(fit(data, preset("tiny"), tmp_path))
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and "nan" in failed.message.lower()
    assert failed.last_good_checkpoint and load_checkpoint(failed.last_good_checkpoint)["epoch"] == 0
    model, _ = model_from_checkpoint(load_checkpoint(failed.last_good_checkpoint))
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Exploit:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "marsviewer-checkpoint", "model": Exploit()}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a marsviewer checkpoint"):
        load_checkpoint(other)


def test_stratified_split_keeps_rare_classes_in_both_halves():
    presence = np.zeros((200, 5), bool)
    presence[:, 1] = True
    presence[::20, 4] = True  # 10 images with big rock
    train, val = stratified_split(presence, 0.2, seed=0)
    assert len(val) == pytest.approx(40, abs=2) and not set(train) & set(val)
    assert presence[val, 4].sum() == 2 and presence[train, 4].sum() == 8


def test_split_of_real_sample_is_stratified(data):
    p = class_presence(data.masks)
    train, val = stratified_split(p, 0.1, 0)
    assert len(train) + len(val) == len(data) and len(val) >= 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no GPU is visible.*--device cpu"):
        resolve_device("cuda")


def test_minutes_budget_stops_on_time(data):
    events = list(fit(data, preset("tiny").replace(epochs=0, minutes=0.03)))
    assert events[-1].reason == "time budget" and math.isfinite(events[-1].best_miou)
    assert events[-1].seconds < 10


def test_early_stopping(data, monkeypatch):
    """With patience 2 and a validation score that never improves, training stops early."""
    import trainer.engine as engine
    from trainer.metrics import ConfusionMatrix

    def constant(*args, **kwargs):
        cm = ConfusionMatrix()
        cm.matrix[1, 1] = 10
        return cm

    monkeypatch.setattr(engine, "confusion_on", constant)
    events = list(fit(data, preset("tiny").replace(epochs=20, patience=2)))
    assert events[-1].reason == "early stopping"
    assert [e.epoch for e in events if isinstance(e, ev.Validation)] == [0, 1, 2]


def test_corrections_are_picked_up_at_the_next_epoch(tmp_path):
    """Saved corrections and exclusions reach a running fit() without a restart."""
    from trainer.corrections import CorrectionStore

    sample = generate(40, 0, seed=6)
    ds = sample.dataset
    store = CorrectionStore.for_dataset(ds, path=tmp_path / "c.sqlite")
    reader = CorrectionStore(tmp_path / "c.sqlite", _hash(ds), len(ds), ds.image_shape, readonly=True)
    before = ds.masks.copy()
    updates = []
    for e in fit(ds, preset("tiny").replace(epochs=3), corrections=reader):
        if isinstance(e, ev.DataUpdate):
            updates.append(e)
        if isinstance(e, ev.Validation) and e.epoch == 0:
            store.exclude_many(sample.truth["outlier_group"])
            bad = sample.truth["corrupted"][0]
            store.save_mask(bad, sample.clean_masks[bad])
    assert [u.epoch for u in updates] == [0, 1]
    assert (updates[0].corrected, updates[0].excluded) == (0, 0)
    assert updates[1].corrected == 1 and updates[1].excluded == len(sample.truth["outlier_group"])
    assert updates[1].train_images < updates[0].train_images
    np.testing.assert_array_equal(ds.masks, before)  # the caller's arrays are never written


def _hash(ds):
    from trainer.corrections import dataset_hash

    return dataset_hash(ds.images, ds.masks)


def test_flip_averaged_prediction_is_mirror_symmetric():
    from trainer.inference import predict_arrays
    from trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 32), dtype=np.uint8)
    plain = predict_arrays(model, images, with_probs=True)["probs"].astype(np.float32)
    tta = predict_arrays(model, images, with_probs=True, flip_tta=True)["probs"].astype(np.float32)
    mirrored = predict_arrays(model, images[:, :, ::-1].copy(), with_probs=True, flip_tta=True)
    np.testing.assert_allclose(tta, mirrored["probs"].astype(np.float32)[..., ::-1], atol=2e-3)
    np.testing.assert_allclose(tta.sum(1), 1.0, atol=5e-3)
    assert not np.allclose(tta, plain, atol=1e-3)  # the mirror image really was averaged in
