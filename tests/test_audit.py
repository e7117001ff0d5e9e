"""The review queue's ranking and the audit/export commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.audit import MODEL_SCORE_MAX, audit, baseline_rank, misalignment, near_duplicate_groups, rank
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
    log = json.loads((tmp_path / "fixed.changelog.json").read_text())
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
