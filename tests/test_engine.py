"""fit(): events, run directory, reproducibility, stop, resume, failures, checkpoints."""

from __future__ import annotations

import json
import math
import pickle
import time

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


def test_epoch_end_previews_keep_the_preview_interval(data):
    """Without an interval every epoch ends with a preview; with one, epochs shorter than
    it do not add previews of their own (each costs the viewer a repaint)."""
    cfg = preset("tiny").replace(epochs=4)

    def previews(every_s):
        control = TrainControl(preview_indices=[0], preview_every_s=every_s)
        return sum(isinstance(e, ev.Preview) for e in fit(data, cfg, control=control))

    assert previews(None) == cfg.epochs
    assert previews(3600.0) == 1  # the first, then none for an hour


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


def test_split_edges_small_strata_tiny_datasets_and_one_image():
    presence = np.zeros((6, 5), bool)
    presence[:, 1] = True
    presence[[0, 1], 3] = True  # a class in two images: one on each side, even at 0.9
    train, val = stratified_split(presence, 0.9, seed=0)
    assert presence[train, 3].sum() == 1 and presence[val, 3].sum() == 1
    # a fraction that rounds to no image at all still holds one out
    train, val = stratified_split(np.ones((3, 5), bool), 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2
    alone = np.zeros((2, 5), bool)
    alone[0, 1] = alone[1, 2] = True  # two strata of one image each: none rounds to a held-out image
    train, val = stratified_split(alone, 0.1, seed=0)
    assert len(val) == 1 and len(train) == 1
    with pytest.raises(ValueError, match="at least 2 labelled images"):
        stratified_split(np.ones((1, 5), bool), 0.1, seed=0)


def test_split_of_real_sample_is_stratified():
    """On synthetic terrain where big rock is in few images, every class seen in at least
    two images lands in both halves, for several seeds."""
    masks = generate(200, 0, seed=0).dataset.masks
    p = class_presence(masks)
    assert 2 <= p[:, 4].sum() <= 20  # big rock really is rare here
    for seed in range(5):
        train, val = stratified_split(p, 0.1, seed)
        assert len(train) + len(val) == len(masks) and not set(train) & set(val)
        for c in range(1, 5):
            if p[:, c].sum() >= 2:
                assert p[train, c].any() and p[val, c].any(), (seed, c)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no GPU is visible.*--device cpu"):
        resolve_device("cuda")


def test_minutes_budget_stops_on_time(data):
    events = list(fit(data, preset("tiny").replace(epochs=0, minutes=0.03)))
    assert events[-1].reason == "time budget" and math.isfinite(events[-1].best_miou)
    assert events[-1].seconds < 10


def _budget_run(data, monkeypatch, cfg, said=None):
    """``fit`` on a clock that the test moves: each step takes 1 s, validating 1 s an
    image. Returns the last event, the clock at each validation, and each step's progress;
    what the run said of its budget goes to ``said``."""
    import trainer.epoch_end as epoch_end

    now = {"t": 0.0}
    real = epoch_end.confusion_on
    said = [] if said is None else said

    def slow(model, images, masks, indices, *args, **kwargs):
        now["t"] += len(indices)
        return real(model, images, masks, indices, *args, **kwargs)

    monkeypatch.setattr(epoch_end, "confusion_on", slow)
    validated, progress = [], []
    for e in fit(data, cfg, control=TrainControl(clock=lambda: now["t"])):
        if e.kind == "progress":
            said.append((len(progress), e.text))
        if e.kind == "step":
            now["t"] += 1.0
            progress.append(e.progress)
        elif e.kind == "validation":
            validated.append(now["t"])
    assert e.kind == "finished" and e.reason == "time budget"
    return e, validated, progress


@pytest.mark.parametrize("budget", [30, 35])  # an epoch ends mid-way in one, before a validation in the other
def test_a_time_budget_holds_its_final_validation_too(data, monkeypatch, budget):
    """A budget stops training when one more step and the final validation would not fit
    (on frames from disk a validation takes minutes), and ends on an epoch's validation
    when another would not fit. Validating the 5 images takes 5 s; the estimate before
    the first, 2 s."""
    cfg = preset("tiny").replace(epochs=0, minutes=budget / 60)
    _, validated, progress = _budget_run(data, monkeypatch, cfg)
    assert len(validated) >= 2 and validated[-1] <= budget, validated
    assert max(progress) <= 1.0 + 1 / budget


def test_a_budget_shorter_than_an_epoch_holds_its_only_validation(data, monkeypatch):
    """Before the first validation there is no last one to go by: the run validates a
    little of the split first and scales its time (5 images: the estimate validates one to
    warm up and times one). An epoch is 22 steps."""
    budget, said = 20, []
    cfg = preset("tiny").replace(epochs=0, minutes=budget / 60, batch_size=2)
    last, validated, progress = _budget_run(data, monkeypatch, cfg, said)
    assert last.epoch == 0 and len(progress) < 22 and len(validated) == 1
    assert validated[0] <= budget, validated
    assert len(progress) >= budget - 2 - 5 - 1  # the estimate and the validation, not more, held back
    assert not said


def test_a_budget_that_one_validation_outlasts_says_so(data, monkeypatch):
    """The estimate (2 s) and the validation (5 s) leave a 6 s budget no room: the run says
    so before its one step, and ends after that step's validation."""
    said = []
    last, validated, progress = _budget_run(
        data, monkeypatch, preset("tiny").replace(epochs=0, minutes=0.1), said
    )
    assert said == [
        (
            0,
            "the 6 s budget leaves no room for training: validating takes about 5 s; one step, then the final validation",
        )
    ]
    assert len(progress) == 1 and len(validated) == 1


@pytest.fixture
def never_improves(monkeypatch):
    """Every validation scores the same."""
    import trainer.epoch_end as epoch_end
    from trainer.metrics import ConfusionMatrix

    def constant(*args, **kwargs):
        cm = ConfusionMatrix()
        cm.matrix[1, 1] = 10
        return cm

    monkeypatch.setattr(epoch_end, "confusion_on", constant)


def test_early_stopping(data, never_improves, tmp_path):
    """With patience 2 and a validation score that never improves, training stops early,
    and saves where it stopped even between the checkpoints it was told to keep."""
    events = list(fit(data, preset("tiny").replace(epochs=20, patience=2, checkpoint_every=50), tmp_path))
    assert events[-1].reason == "early stopping"
    assert [e.epoch for e in events if isinstance(e, ev.Validation)] == [0, 1, 2]
    assert [(e.epoch, e.which) for e in events if isinstance(e, ev.Checkpoint)] == [(0, "best"), (2, "last")]


def _rates_by_epoch(events, lr: float) -> dict[int, set[float]]:
    """The learning rates of each epoch's steps, as shares of ``lr``."""
    rates: dict[int, set[float]] = {}
    for e in events:
        if isinstance(e, ev.Step):
            rates.setdefault(e.epoch, set()).add(round(e.lr / lr, 6))
    return rates


def test_plateau_schedule_halves_the_rate_every_three_validations_without_progress(data, never_improves):
    cfg = preset("tiny").replace(epochs=8, schedule="plateau", warmup_steps=0, lr=1e-3)
    rates = _rates_by_epoch(fit(data, cfg), cfg.lr)
    assert [rates[k] for k in range(8)] == [{1.0}] * 4 + [{0.5}] * 3 + [{0.25}]


@pytest.mark.parametrize("epochs, validated", [(3, [1, 2]), (4, [1, 3])])
def test_validate_every_n_epochs_and_always_at_the_end(data, epochs, validated):
    events = fit(data, preset("tiny").replace(epochs=epochs, val_every=2))
    assert [e.epoch for e in events if isinstance(e, ev.Validation)] == validated


def test_learning_rate_warms_up_then_follows_a_cosine_to_a_floor():
    from trainer.epoch_steps import _lr_factor

    cfg = preset("tiny").replace(warmup_steps=10, schedule="cosine")
    assert [_lr_factor(cfg, s, 0.0) for s in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert [_lr_factor(cfg, 50, p) for p in (0.5, 1.0, 1.7)] == pytest.approx([0.51, 0.02, 0.02])
    assert _lr_factor(cfg.replace(schedule="constant"), 50, 0.9) == 1.0
    assert _lr_factor(cfg.replace(warmup_steps=0), 0, 0.0) == 1.0


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


# -- non-finite values never reach a checkpoint -------------------------------------------


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_gradient_at(monkeypatch, call: int) -> None:
    from trainer import losses

    calls = {"n": 0}
    original = losses.SegmentationLoss.forward

    def poisoned(self, logits, target):
        calls["n"] += 1
        value = original(self, logits, target)
        return _NanGradient.apply(value) if calls["n"] == call else value

    monkeypatch.setattr(losses.SegmentationLoss, "forward", poisoned)


def _all_tensors_finite(path) -> bool:
    ck = load_checkpoint(path)
    tensors = list(ck["model"].values())
    tensors += [t for s in ck["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def _saved_checkpoints(run):
    return sorted((run / "checkpoints").glob("*.pt"))


def test_nan_gradient_at_an_epochs_last_step_saves_nothing_non_finite(data, tmp_path, monkeypatch):
    """log_every 5: the poisoned step is the last of epoch 1 (steps 12-22), between checks."""
    cfg = preset("tiny").replace(epochs=3, log_every=5)
    steps_per_epoch = 11
    _poison_gradient_at(monkeypatch, 2 * steps_per_epoch)
    events = list(fit(data, cfg, tmp_path))
    failed = events[-1]
    assert isinstance(failed, ev.Failed) and "non-finite" in failed.message, failed
    assert failed.step == 2 * steps_per_epoch
    saved = _saved_checkpoints(tmp_path)
    assert saved and all(_all_tensors_finite(p) for p in saved)
    assert failed.last_good_checkpoint and _all_tensors_finite(failed.last_good_checkpoint)
    assert load_checkpoint(failed.last_good_checkpoint)["step"] == steps_per_epoch  # epoch 0's weights
    assert not [e for e in events if isinstance(e, ev.Validation) and e.epoch == 1]


def test_nan_gradient_just_before_a_stop_request_saves_nothing_non_finite(data, tmp_path, monkeypatch):
    """The stop arrives two steps after a NaN gradient, before the next loss check."""
    cfg = preset("tiny").replace(epochs=3, log_every=5)
    _poison_gradient_at(monkeypatch, 14)  # epoch 1, step 14; the next check is at step 15
    control = TrainControl()
    polls = {"n": 0}

    def poll():
        polls["n"] += 1
        if polls["n"] == 15:  # before step 15: 14 steps done
            control.request_stop()

    control.poll = poll
    events = list(fit(data, cfg, tmp_path, control=control))
    assert isinstance(events[-1], ev.Failed), events[-1]
    assert not any(isinstance(e, ev.Stopped) for e in events)
    saved = _saved_checkpoints(tmp_path)
    assert saved and all(_all_tensors_finite(p) for p in saved)
    assert events[-1].last_good_checkpoint and _all_tensors_finite(events[-1].last_good_checkpoint)


def test_checkpoint_write_failure_keeps_the_previous_file(data, tmp_path, monkeypatch):
    from trainer import checkpoint as ckpt_module
    from trainer.model import build_model

    cfg = preset("tiny")
    path = tmp_path / "last.pt"
    ckpt_module.save_checkpoint(path, model=build_model(cfg), config=cfg, step=7)

    real_open = open

    def disk_full_half_way(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            f.write(b"PK\x03\x04 half a zip")
            f.close()
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", disk_full_half_way)
    with pytest.raises(OSError):
        ckpt_module.save_checkpoint(path, model=build_model(cfg), config=cfg, step=8)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial file left


# -- resume ---------------------------------------------------------------------------------


def _state_tensors(path) -> dict:
    ck = load_checkpoint(path)
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    for pid, s in ck["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def test_resume_after_a_stop_mid_epoch_equals_the_uninterrupted_run(data, tmp_path):
    cfg = preset("tiny").replace(epochs=2, max_rotation=15.0, photometric=1.0)
    whole = list(fit(data, cfg, tmp_path / "whole"))
    control = TrainControl()
    polls = {"n": 0}

    def poll():
        polls["n"] += 1
        if polls["n"] == 5:  # after 4 of the 11 steps of epoch 0
            control.request_stop()

    control.poll = poll
    first = list(fit(data, cfg, tmp_path / "part", control=control))
    assert isinstance(first[-1], ev.Stopped) and first[-1].step == 4
    rest = list(fit(data, cfg, tmp_path / "part", resume=tmp_path / "part/checkpoints/last.pt"))
    assert rest[0].start_epoch == 0
    steps = [e.step for e in rest if isinstance(e, ev.Step)]
    assert steps[0] == 5 and steps[-1] == whole[-1].step == rest[-1].step == 22
    a, b = (
        _state_tensors(tmp_path / "whole/checkpoints/last.pt"),
        _state_tensors(tmp_path / "part/checkpoints/last.pt"),
    )
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    miou = lambda evs: [e.miou for e in evs if isinstance(e, ev.Validation)]  # noqa: E731
    assert miou(rest) == miou(whole)


def test_resume_keeps_the_plateau_schedule_and_the_clock(data, never_improves, tmp_path):
    """The plateau's factor and its count of validations without progress, and the time
    spent so far, carry over a resume: the rates are those of the uninterrupted run."""
    cfg = preset("tiny").replace(schedule="plateau", warmup_steps=0, lr=1e-3)
    first = list(fit(data, cfg.replace(epochs=5), tmp_path))  # halved after epoch 3; 4 without progress
    t = time.perf_counter()
    rest = list(fit(data, cfg.replace(epochs=9), tmp_path, resume=tmp_path / "checkpoints/last.pt"))
    wall = time.perf_counter() - t
    rates = _rates_by_epoch(rest, cfg.lr)
    assert [rates[k] for k in range(5, 9)] == [{0.5}, {0.5}, {0.25}, {0.25}]
    assert rest[-1].seconds >= first[-1].seconds + 0.9 * wall


def test_a_run_directory_holds_one_run(tiny_run, data, tmp_path, monkeypatch):
    """A new run into a directory that holds another is refused before it writes anything
    (their events, metrics and checkpoints would mix); resuming from a checkpoint inside it
    continues it; runs started by napari get a directory of their own, even in one second."""
    from trainer import runs
    from trainer.runs import RunDirError, new_run_dir

    run, _ = tiny_run
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    with pytest.raises(RunDirError, match="holds another run"):
        next(fit(data, preset("tiny"), run))
    other = tmp_path / "other.pt"
    other.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(RunDirError, match="holds another run"):
        next(fit(data, preset("tiny"), run, resume=other))  # a checkpoint from elsewhere: another run
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before
    died = tmp_path / "died"  # a run that ended before its first event left an empty record
    died.mkdir()
    (died / "events.jsonl").write_text("")
    assert runs.RunDir(died).best == died / "checkpoints" / "best.pt"  # not another run: reused
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261127-120000")
    made = [new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert [p.name for p in made] == ["20261127-120000", "20261127-120000-2", "20261127-120000-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)
    assert new_run_dir(tmp_path / "runs", "run7-").name == "run7-20261127-120000"


def test_resume_remembers_the_best_miou(data, tmp_path, monkeypatch):
    """A resumed run whose validations are worse than the best so far keeps best.pt."""
    import trainer.epoch_end as epoch_end
    from trainer.metrics import ConfusionMatrix

    list(fit(data, preset("tiny").replace(epochs=1), tmp_path))
    best_before = load_checkpoint(tmp_path / "checkpoints/best.pt")
    assert best_before["miou"] > 0.01

    def poor(*args, **kwargs):
        cm = ConfusionMatrix()
        cm.matrix[1, 1], cm.matrix[1, 2] = 1, 999  # mIoU 0.001
        return cm

    monkeypatch.setattr(epoch_end, "confusion_on", poor)
    events = list(
        fit(data, preset("tiny").replace(epochs=3), tmp_path, resume=tmp_path / "checkpoints/last.pt")
    )
    vals = [e for e in events if isinstance(e, ev.Validation)]
    assert len(vals) == 2 and all(v.best_miou == pytest.approx(best_before["miou"]) for v in vals)
    after = load_checkpoint(tmp_path / "checkpoints/best.pt")
    assert after["step"] == best_before["step"] and after["miou"] == best_before["miou"]

    # Resumed into another run directory, the best so far comes along: that directory
    # stands for its run on its own (--checkpoint DIR, the Finished event).
    events = list(
        fit(
            data, preset("tiny").replace(epochs=4), tmp_path / "next", resume=tmp_path / "checkpoints/last.pt"
        )
    )
    moved = load_checkpoint(tmp_path / "next/checkpoints/best.pt")
    assert moved["step"] == best_before["step"] and moved["miou"] == best_before["miou"]
    assert events[-1].best_checkpoint == str(tmp_path / "next/checkpoints/best.pt")
    # A checkpoint on its own, with no best beside it: nothing to take along.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "last.pt").write_bytes((tmp_path / "next/checkpoints/last.pt").read_bytes())
    events = list(fit(data, preset("tiny").replace(epochs=5), tmp_path / "third", resume=alone / "last.pt"))
    assert events[-1].best_checkpoint is None and not (tmp_path / "third/checkpoints/best.pt").exists()


# -- validation, run records, precision -----------------------------------------------------


def test_excluded_images_leave_validation_too(tmp_path):
    from trainer.corrections import CorrectionStore

    ds = generate(40, 0, seed=6).dataset
    cfg = preset("tiny").replace(epochs=1, val_fraction=0.25)
    store = CorrectionStore.for_dataset(ds, path=tmp_path / "c.sqlite")
    _, val = stratified_split(class_presence(ds.masks), cfg.val_fraction, cfg.seed)
    store.exclude_many([int(i) for i in val[:3]])
    events = list(fit(ds, cfg, corrections=store))
    v = next(e for e in events if isinstance(e, ev.Validation))
    assert v.images == len(val) - 3
    pixels = int(np.sum(v.confusion))
    kept = np.setdiff1d(val, val[:3])
    assert pixels == ds.masks[kept].size  # the confusion matrix counts only the kept images
    assert events[0].val_images == len(val) - 3  # Started counts what the run validates
    # An epoch is as many steps as the images it trains on make, the excluded not counted.
    ds_steps = [e.step for e in events if isinstance(e, ev.Validation)][0]
    assert ds_steps == -(-events[0].train_images // cfg.batch_size)


def test_an_epoch_is_sized_by_the_images_it_trains_on(tmp_path):
    """Excluding half the training images halves an epoch; images labelled since add to
    it: the epochs asked for mean passes over what the run trains on."""
    from trainer.corrections import CorrectionStore

    ds = generate(40, 8, seed=6).dataset
    cfg = preset("tiny").replace(epochs=1, val_fraction=0.25, batch_size=4)
    steps = {}
    for case in ("none", "half excluded", "labelled since"):
        store = CorrectionStore.for_dataset(ds, path=tmp_path / f"{case}.sqlite")
        train, _ = stratified_split(class_presence(ds.masks), cfg.val_fraction, cfg.seed)
        if case == "half excluded":
            store.exclude_many([int(i) for i in train[::2]])
        if case == "labelled since":
            for j in range(8):
                store.save_mask(40 + j, np.ones(ds.image_shape, np.uint8))
        events = list(fit(ds, cfg, corrections=store))
        steps[case] = (events[0].train_images, [e.step for e in events if isinstance(e, ev.Validation)][0])
        store.close()
    assert steps == {"none": (30, 8), "half excluded": (15, 4), "labelled since": (38, 10)}


def test_metrics_csv_has_one_row_per_validation(tiny_run):
    import csv

    run, events = tiny_run
    vals = [e for e in events if isinstance(e, ev.Validation)]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(vals)
    for row, v in zip(rows, vals, strict=True):
        assert int(row["epoch"]) == v.epoch and int(row["step"]) == v.step
        assert float(row["miou"]) == pytest.approx(v.miou) and float(row["miou_keras"]) == pytest.approx(
            v.miou_keras
        )
        assert float(row["iou_soil"]) == pytest.approx(v.iou[1]) and float(row["train_loss"]) > 0
        assert int(row["images"]) == v.images > 0
    assert rows[0].keys() >= {"seconds", "lr", "iou_big_rock", "pixel_accuracy"}


def test_tensorboard_scalars_when_installed(tiny_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, events = tiny_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/miou", "val/miou_keras", "val_iou/Soil"} <= set(tags)
    vals = [e for e in events if isinstance(e, ev.Validation)]
    assert [round(s.value, 5) for s in acc.Scalars("val/miou")] == [round(v.miou, 5) for v in vals]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_train_and_say_which(data, precision):
    events = list(fit(data, preset("tiny").replace(epochs=1, precision=precision)))
    started, finished = events[0], events[-1]
    assert started.precision == precision and precision in started.precision_reason
    assert started.channels_last
    assert isinstance(finished, ev.Finished) and math.isfinite(finished.best_miou)


def test_auto_precision_follows_the_cpu(monkeypatch):
    from trainer import device as device_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(device_module, "cpu_bf16_support", lambda: (True, "native (test)"))
    assert device_module.resolve_precision("auto", cpu).dtype is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_bf16_support", lambda: (False, "emulated (test)"))
    chosen = device_module.resolve_precision("auto", cpu)
    assert chosen.dtype is None and chosen.name == "fp32" and "emulated" in chosen.reason
    assert device_module.resolve_precision("bf16", cpu).dtype is torch.bfloat16


def test_batches_cover_every_index_once_in_order():
    from trainer.inference import batches

    assert [b.tolist() for b in batches(np.arange(10), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in batches(np.arange(8), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(batches(np.arange(0), 4)) == []


def test_a_labelled_unlabelled_image_joins_the_next_epoch(tmp_path):
    """A mask saved for an unlabelled image (store index n + j) makes it a training image
    at the next epoch; restoring makes it unlabelled again."""
    from trainer.corrections import CorrectionStore

    sample = generate(30, 4, seed=7, plant_problems=False)
    ds = sample.dataset
    store = CorrectionStore.for_dataset(ds, path=tmp_path / "c.sqlite")
    reader = CorrectionStore(
        tmp_path / "c.sqlite", _hash(ds), len(ds), ds.image_shape, readonly=True, n_pool=len(ds.test_images)
    )
    updates = []
    for e in fit(ds, preset("tiny").replace(epochs=3), corrections=reader):
        if isinstance(e, ev.DataUpdate):
            updates.append(e)
        if isinstance(e, ev.Validation) and e.epoch == 0:
            for j in (0, 2):  # the first unlabelled image and another
                store.save_mask(len(ds) + j, np.full(ds.image_shape, 3, np.uint8))  # all sand
        if isinstance(e, ev.Validation) and e.epoch == 1:
            store.restore(len(ds))
            store.restore(len(ds) + 2)
    assert [(u.epoch, u.newly_labelled, u.corrected) for u in updates] == [(0, 0, 0), (1, 2, 0), (2, 0, 0)]
    assert updates[1].train_images == updates[0].train_images + 2 == updates[2].train_images + 2
    with pytest.raises(IndexError):
        store.save_mask(len(ds) + 4, np.zeros(ds.image_shape, np.uint8))  # past the pool


def test_corrections_beyond_the_datasets_rows_are_left_out(data):
    """A store's reading may hold rows this dataset does not have (the run takes only its
    own); an edit of its last row still counts."""
    n = len(data) + len(data.test_images)

    class Store:
        def version(self):
            return 1

        def snapshot(self):
            mask = np.full(data.image_shape, 2, np.uint8)
            return {n - 1: mask, n: mask, n + 5: mask}, set()

    updates = [
        e for e in fit(data, preset("tiny").replace(epochs=1), corrections=Store()) if e.kind == "data_update"
    ]
    assert [(u.corrected, u.newly_labelled) for u in updates] == [(0, 1)]


def test_previews_are_of_rows_the_run_holds(data):
    control = TrainControl(preview_indices=[-1, 4, len(data) + len(data.test_images)])
    previews = [
        e for e in fit(data, preset("tiny").replace(epochs=1), control=control) if e.kind == "preview"
    ]
    assert previews and all(p.indices == [4] and len(p.masks) == 1 for p in previews)


def test_prediction_batches_hold_about_as_many_pixels(tmp_path):
    """32 images of 64x128 a batch, fewer of larger ones (768x768 frames ran 2.3x slower
    per pixel 32 at a time than one at a time), and validation batches follow."""
    from trainer.engine import _Trainer
    from trainer.inference import predict_batch

    assert [predict_batch(s) for s in [(64, 128), (5, 256, 256), (768, 768), (32, 32), (4000, 3000)]] == [
        32, 4, 1, 64, 1,
    ]  # fmt: skip
    # On a GPU, eight times as many (256 of 64x128 predicted 3.5-4.8x faster than 32 on an H200).
    on_gpu = [
        predict_batch(s, "cuda") for s in [(64, 128), (5, 256, 256), (768, 768), (32, 32), (4096, 4096)]
    ]
    assert on_gpu == [256, 32, 3, 512, 1]
    big = generate(12, 0, seed=0, shape=(256, 256)).dataset
    run = _Trainer(big, preset("tiny").replace(device="cpu"), None, TrainControl(), None, None)
    assert run._val_batch() == 4


def test_a_cuda_graphs_optimiser_saves_plain_and_loads_into_either_kind():
    """A CUDA graph's AdamW reads its learning rate from a tensor and is capturable; its
    checkpoint holds a float and capturable off, and a loaded state is made to fit the run."""
    from trainer.cuda_graph import conform_optimizer, graph_reason, plain_state_dict
    from trainer.engine import build_optimizer
    from trainer.model import build_model

    cfg = preset("tiny")
    cpu = torch.device("cpu")
    opt = build_optimizer(build_model(cfg), cfg, cpu)
    conform_optimizer(opt, True, cpu)
    assert all(torch.is_tensor(g["lr"]) and g["capturable"] for g in opt.param_groups)
    opt.param_groups[0]["lr"].fill_(1e-4)
    saved = plain_state_dict(opt)
    assert (
        saved["param_groups"][0]["lr"] == pytest.approx(1e-4) and not saved["param_groups"][0]["capturable"]
    )
    assert torch.is_tensor(opt.param_groups[0]["lr"])  # the live optimiser keeps its tensor
    fresh = build_optimizer(build_model(cfg), cfg, cpu)
    fresh.load_state_dict(saved)
    conform_optimizer(fresh, False, cpu)
    assert fresh.param_groups[0]["lr"] == pytest.approx(1e-4) and not fresh.param_groups[0]["capturable"]
    assert graph_reason(cfg, cpu, 1, None) == "not on CUDA"
    cuda = torch.device("cuda")
    assert graph_reason(cfg, cuda, 1, None) is None
    assert graph_reason(cfg.replace(cuda_graph=False), cuda, 1, None) == "cuda_graph is off"
    assert graph_reason(cfg, cuda, 2, None) == "under torchrun"
    assert graph_reason(cfg, cuda, 1, object()) == "crops read from disk"
