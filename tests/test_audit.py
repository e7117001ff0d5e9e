"""The review queue's ranking and the audit/export commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.audit import MODEL_SCORE_MAX, audit, baseline_rank, near_duplicate_groups, rank
from trainer.audit_pixels import misalignment
from trainer.cli import main
from trainer.corrections import CorrectionStore
from trainer.formats import read_npz


def test_rank_puts_the_outlier_group_first_without_a_model(small_sample):
    masks = small_sample.dataset.masks
    ranking = rank(masks, None, None)
    outliers = small_sample.truth["outlier_group"]
    assert {r["index"] for r in ranking[: len(outliers)]} == set(outliers)
    assert ranking[0]["reasons"][0]["kind"] == "duplicate_mask"


def test_rank_uses_confident_disagreement():
    masks = np.ones((3, 4, 4), np.uint8)
    masks[2, :2] = 2  # two images share an all-soil mask: a weak (size 2) duplicate
    pred = masks.copy()
    pred[0] = 3  # the model confidently disagrees everywhere on image 0
    conf = np.full(masks.shape, 0.9, np.float16)
    ranking = rank(masks, pred, conf, excluded={2})
    assert [r["index"] for r in ranking] == [0, 1]  # 2 is excluded
    assert ranking[0]["score"] == pytest.approx(MODEL_SCORE_MAX)  # 1.0 of the image, capped
    low = conf.copy()
    low[0] = 0.3  # unsure: no confident disagreement
    assert rank(masks, pred, low)[0]["index"] != 0 or rank(masks, pred, low)[0]["score"] < 0.7


def test_a_group_of_identical_masks_outranks_any_model_evidence():
    """Model evidence can add up past 1 (or reach it exactly): the pasted-in group still
    comes first, whatever the indices."""
    rng = np.random.default_rng(0)
    masks = rng.integers(1, 5, (6, 8, 8)).astype(np.uint8)
    masks[3:] = masks[3]  # images 3-5 share one mask
    pred = masks.copy()
    pred[0] = (masks[0] % 4) + 1  # the model disagrees with image 0 everywhere
    conf = np.full(masks.shape, 0.95, np.float16)
    ranking = rank(masks, pred, conf)
    assert [r["index"] for r in ranking[:3]] == [3, 4, 5]
    assert ranking[3]["index"] == 0 and ranking[3]["score"] < ranking[2]["score"]


def _stripes(n: int = 4, h: int = 32, w: int = 48) -> np.ndarray:
    """Masks of vertical and horizontal bands of classes 1-3 (a different layout each)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w), np.uint8)
    for i in range(n):
        out[i] = 1 + ((xx // (5 + i) + yy // (4 + i)) % 3)
    return out


def _confident(masks: np.ndarray, p: float = 0.9) -> np.ndarray:
    probs = np.full((len(masks), 5, *masks.shape[1:]), (1 - p) / 4, np.float32)
    np.put_along_axis(probs, masks[:, None].astype(np.int64), p, axis=1)
    return probs


def test_label_errors_are_confident_regions_not_speckle():
    """A pixel counts as mislabelled where the model gives its label less than that
    class's threshold and another class at least its own, and only inside a region of
    such pixels: the same disagreement on scattered pixels is model noise."""
    from trainer.audit_pixels import class_thresholds, label_error_pixels

    masks = np.ones((1, 24, 24), np.uint8)  # all Soil
    probs = np.zeros((1, 5, 24, 24), np.float32)
    probs[0, 1] = 0.9
    region = (slice(4, 12), slice(4, 12))
    probs[0, 1][region], probs[0, 2][region] = 0.05, 0.9  # the model says Bedrock here
    for y, x in ((18, 3), (3, 20), (20, 20)):  # and on three scattered pixels
        probs[0, 1, y, x], probs[0, 2, y, x] = 0.05, 0.9
    t = class_thresholds(masks, probs)
    assert t[1] == pytest.approx(probs[0, 1].mean()) and t[[0, 2, 3, 4]].tolist() == [1.0] * 4
    # Classes no pixel is labelled with get threshold 1: no probability reaches it.
    assert not label_error_pixels(masks, probs).any()
    errors = label_error_pixels(masks, probs, thresholds=np.array([1.0, 0.8, 0.5, 1.0, 1.0]))
    assert errors[0][5:11, 5:11].all() and errors.sum() <= 64  # the region, inside its edge
    assert not errors[0, 18, 3] and not errors[0, 3, 20] and not errors[0, 20, 20]


def test_misalignment_finds_the_move_that_puts_a_mask_back():
    truth = _stripes()
    probs = _confident(truth)
    given = truth.copy()
    given[1, :, 6:] = truth[1, :, :-6]  # drawn 6 px too far right (left strip stays stale)
    given[2, 3:] = truth[2, :-3]  # 3 px too low
    gain, move = misalignment(given, probs)
    assert move[1].tolist() == [0, -6] and move[2].tolist() == [-3, 0]
    assert gain[1] > 0.1 and gain[2] > 0.1
    assert gain[0] == 0 and gain[3] == 0  # aligned masks: no move helps
    assert misalignment(given, probs, skip={1})[0][1] == 0


def test_misalignment_ignores_a_gain_that_rises_to_the_edge_of_the_search():
    masks = np.ones((1, 16, 32), np.uint8)
    masks[0, :, 16:] = 2
    probs = _confident(np.full_like(masks, 2))  # the model says class 2 everywhere
    gain, _ = misalignment(masks, probs)
    assert gain[0] == 0  # moving the class-1 half out keeps helping: a disagreement, not a shift


def test_rank_reports_a_misaligned_mask_with_its_fix():
    truth = _stripes()
    probs = _confident(truth)
    given = truth.copy()
    given[3, :, :-5] = truth[3, :, 5:]  # 5 px too far left
    ranking = rank(given, probs.argmax(1).astype(np.uint8), probs)
    top = ranking[0]
    assert top["index"] == 3 and top["reasons"][0]["kind"] == "misaligned"
    assert (top["reasons"][0]["shift_y"], top["reasons"][0]["shift_x"]) == (0, 5)
    assert all(r["score"] < 0.05 for r in ranking[1:])


def test_near_duplicates():
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[:3] = 1
    masks[1, 0, 1] = 2  # one pixel differs: still a near duplicate
    masks[3] = 3
    assert near_duplicate_groups(masks) == [(0, 1, 2)]


def test_baseline_rank_orders_by_iou():
    masks = np.ones((3, 2, 2), np.uint8)
    pred = masks.copy()
    pred[1] = 2
    pred[2, 0, 0] = 2
    assert baseline_rank(masks, pred) == [1, 2, 0]


def test_audit_finds_the_planted_outlier_group(small_sample):
    # A budget of epochs, not minutes: the same models and ranking on every run, however
    # loaded the machine is (0.2 minutes made ~60 steps a fold on an idle machine, fewer
    # under load, and the corrupted masks sometimes missed the top third).
    ranking, pred, conf = audit(small_sample.dataset, folds=2, epochs=40)
    outliers = small_sample.truth["outlier_group"]
    assert {r["index"] for r in ranking[: len(outliers)]} == set(outliers)
    assert pred.shape == small_sample.dataset.masks.shape and conf.max() <= 1.0
    kinds = {x["kind"] for r in ranking for x in r["reasons"]}
    assert "model_disagreement" in kinds
    # the out-of-fold models learnt something (random guesses over 4 classes score ~0.25) ...
    clean, labelled = small_sample.clean_masks, small_sample.clean_masks > 0
    assert (pred[labelled] == clean[labelled]).mean() > 0.5
    # ... and it is what brings the corrupted masks up, not chance
    order = [r["index"] for r in ranking]
    assert all(order.index(i) < len(order) // 3 for i in small_sample.truth["corrupted"])


def test_an_audit_with_a_budget_of_epochs_is_repeatable(small_sample):
    first = audit(small_sample.dataset, folds=2, epochs=3)
    again = audit(small_sample.dataset, folds=2, epochs=3)
    assert [r["index"] for r in first[0]] == [r["index"] for r in again[0]]
    np.testing.assert_array_equal(first[2], again[2])


def test_cli_audit_and_export(tmp_path, npz_path, small_sample, capsys):
    out = tmp_path / "issues.json"
    args = ["audit", str(npz_path), "--folds", "2", "--epochs", "10", "--out", str(out)]
    assert main(args) == 0
    ranking = json.loads(out.read_text())
    printed = capsys.readouterr().out
    group = len(small_sample.truth["outlier_group"])
    assert printed.count(f"duplicate mask (group of {group})") == 1  # one line for the whole group
    assert ranking[0]["index"] in small_sample.truth["outlier_group"]
    assert all(set(r) == {"index", "score", "reasons"} for r in ranking)
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)

    # export with no corrections reproduces the dataset's arrays exactly
    same = tmp_path / "same.npz"
    assert main(["export", str(npz_path), "--out", str(same)]) == 0
    with np.load(npz_path) as a, np.load(same) as b:
        for key in ("training_set", "test_set"):
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype

    ds = read_npz(npz_path)
    store = CorrectionStore.for_dataset(ds)
    bad = small_sample.truth["corrupted"][0]
    store.save_mask(bad, small_sample.clean_masks[bad], note="fixed")
    store.exclude_many(small_sample.truth["outlier_group"])
    store.close()
    fixed = tmp_path / "fixed.npz"
    assert main(["export", str(npz_path), "--out", str(fixed), "--drop-excluded"]) == 0
    got = read_npz(fixed)
    kept = [i for i in range(len(ds)) if i not in small_sample.truth["outlier_group"]]
    assert len(got) == len(kept)
    np.testing.assert_array_equal(got.masks[kept.index(bad)], small_sample.clean_masks[bad])
    log = json.loads((tmp_path / "fixed.npz.changelog.json").read_text())
    assert log["edited"] == 1 and log["excluded"] == len(small_sample.truth["outlier_group"])
    assert log["changes"][0]["history"][0]["note"] == "fixed"
    assert main(["export", str(npz_path), "--out", str(npz_path)]) == 2  # never the original


def test_move_mask_repeats_the_edge_it_uncovers():
    from trainer.audit import describe_move, move_mask

    m = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(move_mask(m, 0, 1), [[0, 0, 1, 2], [4, 4, 5, 6], [8, 8, 9, 10]])
    np.testing.assert_array_equal(move_mask(m, -1, 0), [[4, 5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]])
    np.testing.assert_array_equal(move_mask(move_mask(m, 0, 0), 0, 0), m)
    assert describe_move(2, -3) == "move 3 px left and 2 px down"


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--folds", "1"], "--folds must be at least 2"),
        (["--minutes", "0"], "--minutes must be"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_cli_audit_refuses_bad_budgets(tmp_path, npz_path, capsys, flags, says):
    assert main(["audit", str(npz_path), *flags, "--out", str(tmp_path / "i.json")]) == 2
    assert says in capsys.readouterr().err


def test_out_of_fold_models_never_predict_what_they_trained_on(monkeypatch):
    """Each image is predicted once, by the model of the fold that held it out; images in
    no fold once, by the last model; no model trains on an image it then predicts."""
    from trainer import checkpoint, engine, inference
    from trainer.dataset import Dataset
    from trainer.out_of_fold import audit_config, out_of_fold_predictions

    n = 14
    images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 8), np.uint8)
    ds = Dataset(images=images, masks=np.zeros_like(images))
    trained, predicted = [], []
    monkeypatch.setattr(
        engine, "fit", lambda sub, *a, **k: trained.append(set(sub.images[:, 0, 0])) or iter(())
    )
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path: {})
    monkeypatch.setattr(checkpoint, "model_from_checkpoint", lambda data: (len(trained), None))

    def predict(model, imgs, *args, **kwargs):
        predicted.append((model, set(imgs[:, 0, 0])))
        return {"masks": np.zeros_like(imgs), "probs": np.zeros((len(imgs), 5, 4, 8), np.float32)}

    monkeypatch.setattr(inference, "predict_arrays", predict)
    out_of_fold_predictions(ds, np.arange(12), 3, audit_config(0.1), extra=np.array([12, 13]))
    assert len(trained) == 3 and [m for m, _ in predicted] == [1, 2, 3]
    for train, (_, held) in zip(trained, predicted, strict=True):
        assert not train & held and not train & {12, 13}
    shown = sorted(i for _, held in predicted for i in held)
    assert shown == list(range(n)) and {12, 13} <= predicted[-1][1]


# -- the audit of frames read one at a time ---------------------------------------------
def _planted(n: int = 100, seed: int = 3):
    """Masks with every kind of evidence planted, and noisy class probabilities that agree
    with them but where one image's labels are moved and others' are wrong."""
    from trainer.synth import generate

    masks = generate(n, 0, seed=seed).dataset.masks.copy()
    group = [5, 7, *range(40, 50)]
    masks[group] = masks[6]  # a group of 13, which the model does not know (below)
    masks[10] = masks[11]  # a pair
    masks[12] = masks[13]
    masks[12, :2] = (masks[12, :2] % 4) + 1  # a near pair
    masks[9] = 2  # one class
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 5, *masks.shape[1:])).astype(np.float32)
    np.put_along_axis(logits, masks[:, None].astype(np.int64), 2.5, axis=1)
    # The group's probabilities are noise: the thresholds must leave them out.
    logits[[6, *group]] = rng.normal(size=(len(group) + 1, *logits.shape[1:]))
    logits[20] = np.roll(logits[20], 6, axis=2)  # image 20's mask sits 6 px off
    logits[30, :, 10:40, 20:70] = logits[30, ::-1, 10:40, 20:70]  # a region labelled otherwise
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    return masks, probs.argmax(1).astype(np.uint8), probs.astype(np.float16)


def test_ranking_frames_one_at_a_time_equals_the_ranking_of_arrays():
    """Every kind of evidence, read a frame at a time in chunks of any length, ranks as
    the arrays do (the ordering, the scores and every reason)."""
    from trainer.audit_stored import chunks_of, rank_frames

    masks, pred, probs = _planted()
    want = rank(masks, pred, probs, excluded={3})
    kinds = {x["kind"] for r in want for x in r["reasons"] if x["score"] > 0}
    assert kinds == {
        "duplicate_mask",
        "near_duplicate_mask",
        "single_class",
        "misaligned",
        "model_disagreement",
    }
    calls = []

    def probs_of(rows):
        calls.append(rows)
        return pred[rows], probs[rows]

    for size in (1, 7, 64):
        chunks = chunks_of(range(len(masks)), lambda i: masks[i].shape, size)
        got = rank_frames(len(masks), lambda i: masks[i], chunks, probs_of, excluded={3})
        assert got == want
    assert rank_frames(len(masks), lambda i: masks[i], None, None) == rank(masks, None, None)
    assert max(len(c) for c in calls) == 64 and sum(len(c) for c in calls) == 2 * 3 * len(masks)


def test_frames_of_several_sizes_are_grouped_by_size():
    """Masks equal in bytes but not in shape are not duplicates; chunks hold one size."""
    from trainer.audit_stored import chunks_of, rank_frames

    masks = [
        np.ones((4, 6), np.uint8),
        np.ones((6, 4), np.uint8),
        np.ones((4, 6), np.uint8),
        np.ones((2, 2), np.uint8),
    ]
    ranking = rank_frames(4, lambda i: masks[i], None, None)
    dup = {r["index"]: [x for x in r["reasons"] if x["kind"] == "duplicate_mask"] for r in ranking}
    assert dup[0][0]["group"] == [0, 2] and not dup[1] and not dup[3]
    assert chunks_of(range(4), lambda i: masks[i].shape, 64) == [[0], [1], [2], [3]]
    assert chunks_of([0, 2, 1], lambda i: masks[i].shape, 64) == [[0, 2], [1]]
    assert chunks_of(range(70), lambda i: (64, 128)) == [list(range(64)), list(range(64, 70))]
    assert chunks_of(range(3), lambda i: (512, 512)) == [[0, 1], [2]]  # 64 x 64x128 pixels at most
    assert chunks_of(range(2), lambda i: (2048, 2048)) == [[0], [1]]


def test_audit_of_a_dataset_read_from_disk(tmp_path, npz_path, small_sample, monkeypatch):
    """A zarr too large for memory is audited a frame at a time: with a checkpoint, the
    very ranking it gets in memory, its corrections in (a corrected mask, an exclusion,
    an unlabelled image labelled since); with out-of-fold models trained from disk, the
    pasted-in group first and the excluded image left out."""
    from trainer import formats
    from trainer.config import preset
    from trainer.convert import convert
    from trainer.engine import fit

    zarr = tmp_path / "m.zarr"
    convert(npz_path, zarr)
    mem = formats.open_dataset(zarr)
    list(fit(mem, preset("tiny").replace(epochs=1), tmp_path / "run"))
    n = len(mem)
    store = CorrectionStore.for_dataset(mem)
    store.save_mask(4, np.full_like(mem.masks[4], 2), note="one class")
    store.exclude(9)
    store.save_mask(n + 2, mem.masks[0], note="labelled since")
    store.close()
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    out = {}
    for where in ("memory", "disk"):
        if where == "disk":
            monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
        assert (
            main(["audit", str(zarr), "--checkpoint", str(ckpt), "--out", str(tmp_path / f"{where}.json")])
            == 0
        )
        out[where] = json.loads((tmp_path / f"{where}.json").read_text())
    assert out["disk"] == out["memory"]
    by_index = {r["index"]: r for r in out["disk"]}
    assert 9 not in by_index and n in by_index and len(by_index) == n  # n - 1 labelled + 1 since
    assert "single_class" in {x["kind"] for x in by_index[4]["reasons"]}
    assert {x["kind"] for x in by_index[n]["reasons"]} >= {"duplicate_mask"}  # its mask is image 0's
    assert (
        main(["audit", str(zarr), "--folds", "2", "--epochs", "2", "--out", str(tmp_path / "oof.json")]) == 0
    )
    ranking = json.loads((tmp_path / "oof.json").read_text())
    group = set(small_sample.truth["outlier_group"])
    assert {r["index"] for r in ranking[: len(group)]} == group and 9 not in {r["index"] for r in ranking}
    assert all(any(x["kind"] == "model_disagreement" for x in r["reasons"]) for r in ranking)


def test_out_of_fold_models_from_disk_never_train_on_what_they_rank(
    tmp_path, npz_path, small_sample, monkeypatch
):
    """Each fold's model trains on the other folds only: the folds' held-out images
    partition the training pool; excluded images and pasted-in duplicates train none."""
    import trainer.engine
    from trainer import formats
    from trainer.audit_stored import audit_stored
    from trainer.checkpoint import save_checkpoint
    from trainer.config import preset
    from trainer.convert import convert
    from trainer.model import build_model

    convert(npz_path, tmp_path / "m.zarr")
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    ds = formats.open_dataset(tmp_path / "m.zarr", lazy=True)
    store = CorrectionStore.for_dataset(ds)
    store.exclude(9)
    trained = []

    def fake_fit(dataset, cfg, run_dir, control=None, corrections=None):
        _, excluded = corrections.snapshot()
        trained.append({i for i in range(len(ds)) if i not in excluded})
        save_checkpoint(
            f"{run_dir}/checkpoints/last.pt", model=build_model(preset("tiny")), config=preset("tiny")
        )
        yield from ()

    monkeypatch.setattr(trainer.engine, "fit", fake_fit)
    ranking = audit_stored(ds, store, folds=3, epochs=1)
    store.close()
    pool = set(range(len(ds))) - {9} - set(small_sample.truth["outlier_group"])
    held = [pool - t for t in trained]
    assert len(trained) == 3 and all(t <= pool for t in trained)
    assert sum(len(h) for h in held) == len(pool) and set().union(*held) == pool
    assert len(ranking) == len(ds) - 1


def test_nothing_left_to_train_on_says_so_and_duplicates_alone_still_rank(small_sample, tmp_path):
    """Every image excluded or in a group of identical masks: out-of-fold models have
    nothing to train on, which is said (in memory and from disk alike); a given model
    still ranks them, from disk as from memory (no class keeps a threshold of its own)."""
    from trainer.audit_stored import chunks_of, rank_frames
    from trainer.dataset import DatasetError

    ds = small_sample.dataset
    with pytest.raises(DatasetError, match="1 of 60 images left to train"):
        audit(ds, folds=2, epochs=1, excluded=set(range(59)))
    masks, pred, probs = (a[20:26].copy() for a in _planted())
    masks[:3], masks[3:] = masks[0], masks[3]  # two groups: every image a duplicate
    chunks = chunks_of(range(6), lambda i: masks[i].shape)
    got = rank_frames(6, lambda i: masks[i], chunks, lambda rows: (pred[rows], probs[rows]))
    assert got == rank(masks, pred, probs) and len(got) == 6


def test_the_predictions_kept_for_the_review_are_the_highest_scored_within_a_budget():
    from trainer.audit_stored import KeptPredictions

    kept = KeptPredictions(budget=300)
    for i, score in enumerate([0.5, 0.1, 0.9, 0.3, 0.7]):
        kept.offer(i, score, np.full((10, 10), i, np.uint8))
    assert sorted(kept.masks) == [0, 2, 4] and kept.bytes == 300 and (kept.masks[4] == 4).all()
