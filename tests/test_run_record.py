"""The GUI's Qt-free run record, the run-directory follower and per-image IoU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from marsviewer._run_record import RunFollower, RunRecord
from trainer.metrics import per_image_miou


def test_history_from_event_dicts():
    h = RunRecord()
    h.apply(
        {
            "kind": "started",
            "device": "cpu",
            "device_name": "CPU",
            "train_images": 9,
            "val_images": 1,
            "parameters": 10,
            "data": "whole images held in memory on cuda; each step replayed as one CUDA graph",
        }
    )
    assert h.message.endswith(
        "10 parameters; whole images held in memory on cuda; each step replayed as one CUDA graph"
    )
    h.apply(
        {
            "kind": "step",
            "epoch": 0,
            "step": 1,
            "loss": 2.0,
            "lr": 0.1,
            "images_per_s": 5.0,
            "progress": 0.5,
            "eta_s": 3,
        }
    )
    h.apply(
        {
            "kind": "validation",
            "epoch": 0,
            "step": 1,
            "iou": [0.1, 0.5, None, 0.3, None],
            "miou": 0.4,
            "miou_keras": 0.3,
            "pixel_accuracy": 0.5,
            "confusion": [[0] * 5] * 5,
            "best_miou": 0.4,
        }
    )
    h.apply({"kind": "validation", "epoch": 1, "step": 2, "iou": [None] * 5, "miou": 0.2, "miou_keras": 0.1})
    assert h.best_miou_keras == 0.3 and h.val_miou_keras == [0.3, 0.1]  # Keras figure at the best mIoU
    assert h.state == "running" and h.losses == [2.0] and "ETA 00:03" in h.status_line()
    h.apply({"kind": "progress", "text": "validating: 40 of 110 images", "done": 40, "total": 110})
    assert "validating: 40 of 110 images" in h.status_line() and "ETA" not in h.status_line()
    h.apply({"kind": "validation", "epoch": 0, "step": 1, "iou": [None] * 5, "miou": 0.1, "miou_keras": 0.1})
    assert "validating" not in h.status_line() and "ETA 00:03" in h.status_line()
    assert math.isnan(h.latest_iou[2]) and h.best_iou[1] == 0.5
    h.apply({"kind": "failed", "message": "boom", "last_good_checkpoint": "/x/last.pt"})
    assert h.state == "failed" and "boom" in h.message and "/x/last.pt" in h.message


def test_follower_reads_only_complete_lines(tmp_path):
    (tmp_path / "config.toml").write_text("")
    f = RunFollower(tmp_path)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"kind": "started"}) + "\n" + '{"kind": "st')
    assert [e["kind"] for e in f.new_events()] == ["started"]
    with open(events, "a") as fh:
        fh.write('ep", "step": 1}\n')
    assert f.new_events() == [{"kind": "step", "step": 1}]
    with pytest.raises(FileNotFoundError):
        RunFollower(tmp_path / "nothing")


def test_checkpoints_of_an_attached_run_are_found_in_its_directory(tmp_path):
    """The trainer records checkpoint paths as it was given them (here relative to where it
    ran); a run attached from elsewhere, or moved since, finds them in its own directory."""
    run = tmp_path / "moved" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"x")
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    h = RunRecord(run_dir=str(run))
    h.apply({"kind": "checkpoint", "path": "../run/checkpoints/best.pt", "which": "best"})
    assert h.best_checkpoint == h.last_checkpoint == str(run / "checkpoints" / "best.pt")
    h.apply({"kind": "checkpoint", "path": "../run/checkpoints/last.pt", "which": "last"})
    assert h.last_checkpoint == str(run / "checkpoints" / "last.pt")
    h.apply({"kind": "finished", "best_checkpoint": "/elsewhere/run/checkpoints/best.pt", "best_miou": 0.5})
    assert h.best_checkpoint == str(run / "checkpoints" / "best.pt")
    gone = RunRecord(run_dir=str(tmp_path / "empty"))  # no such file there: as recorded
    gone.apply({"kind": "checkpoint", "path": "/abs/checkpoints/best.pt", "which": "best"})
    assert gone.best_checkpoint == "/abs/checkpoints/best.pt"


def test_per_image_miou_by_hand():
    target = np.array([[[0, 1], [1, 2]], [[0, 0], [0, 0]]], np.uint8)
    pred = np.array([[[3, 1], [2, 2]], [[1, 1], [1, 1]]], np.uint8)
    m = per_image_miou(pred, target)
    # image 0: class 1 IoU 1/2 (one FN), class 2 IoU 1/2 (one FP), class 3 only on background: ignored
    assert m[0] == pytest.approx(0.5)
    assert math.isnan(m[1])  # all background: nothing to score


def test_numpy_confusion_matrix_has_true_classes_in_rows_like_the_torch_one():
    import torch

    from trainer.metrics import ConfusionMatrix, confusion_matrix

    target = np.array([[[0, 1], [1, 2]], [[4, 4], [3, 0]]], np.uint8)
    pred = np.array([[[3, 1], [2, 2]], [[1, 4], [3, 0]]], np.uint8)
    m = confusion_matrix(pred, target)
    assert m[1, 2] == 1 and m[2, 1] == 0  # a soil pixel predicted bedrock
    assert m[4, 1] == 1 and m[0, 3] == 1 and m.sum() == target.size
    cm = ConfusionMatrix()
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_array_equal(m, cm.matrix.numpy())


def test_worst_first_puts_images_with_nothing_to_score_last():
    from trainer.metrics import worst_first

    miou = np.array([0.9, np.nan, 0.1, 0.5, np.nan])
    assert worst_first(miou).tolist() == [2, 3, 0, 1, 4]


def test_the_progress_bar_holds_what_fits_and_the_status_line_the_rest():
    h = RunRecord()
    h.apply({"kind": "started", "device": "cpu"})
    h.apply({"kind": "step", "epoch": 2, "step": 30, "loss": 1.0, "lr": 1e-3, "images_per_s": 106.2,
             "progress": 0.42, "eta_s": 83.0, "cpu_cores": 0.2, "threads": 2})  # fmt: skip
    h.state = "running"
    assert h.progress_text() == "42% · epoch 3 · ETA 01:23"
    assert "106.2 img/s" in h.status_line() and "other programs are busy" in h.status_line()
