"""The review queue's ranking and the audit/export commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.audit import audit, baseline_rank, near_duplicate_groups, rank
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
    assert ranking[0]["score"] == pytest.approx(1.0)
    low = conf.copy()
    low[0] = 0.3  # unsure: no confident disagreement
    assert rank(masks, pred, low)[0]["index"] != 0 or rank(masks, pred, low)[0]["score"] < 0.7


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
    ranking, pred, conf = audit(small_sample.dataset, folds=2, minutes=0.2)
    outliers = small_sample.truth["outlier_group"]
    assert {r["index"] for r in ranking[: len(outliers)]} == set(outliers)
    assert pred.shape == small_sample.dataset.masks.shape and conf.max() <= 1.0
    kinds = {x["kind"] for r in ranking for x in r["reasons"]}
    assert "model_disagreement" in kinds


def test_cli_audit_and_export(tmp_path, npz_path, small_sample, capsys):
    out = tmp_path / "issues.json"
    assert main(["audit", str(npz_path), "--folds", "2", "--minutes", "0.2", "--out", str(out)]) == 0
    ranking = json.loads(out.read_text())
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
