"""Guards a careful reviewer would break: each test here fails under the one-line bug
named in its docstring."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from trainer.checkpoint import adopt_best, load_checkpoint, save_checkpoint
from trainer.cli import main
from trainer.config import preset
from trainer.model import build_model


def _checkpoint(path, **state):
    return save_checkpoint(path, model=build_model(preset("tiny")), config=preset("tiny"), **state)


def test_after_a_failure_the_last_checkpoint_is_named_not_the_best(tmp_path):
    """Bug: the resume point after a failure names best.pt (an older state) first."""
    from trainer.epoch_end import EpochEnd

    last, best = _checkpoint(tmp_path / "last.pt", step=9), _checkpoint(tmp_path / "best.pt", step=4)
    run = SimpleNamespace(runs=SimpleNamespace(last=last, best=best))
    assert EpochEnd.last_good(run) == str(last)
    last.unlink()
    assert EpochEnd.last_good(run) == str(best)


def test_resuming_into_a_directory_keeps_the_best_checkpoint_already_there(tmp_path):
    """Bug: resuming into another directory copies the resumed run's best over one there."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _checkpoint(src / "best.pt", miou=0.5)
    resumed = _checkpoint(src / "last.pt", miou=0.5)
    mine = _checkpoint(dst / "best.pt", miou=0.7)
    before = mine.read_bytes()
    assert adopt_best(mine, resumed, 0.5) is False
    assert mine.read_bytes() == before
    mine.unlink()
    assert adopt_best(mine, resumed, 0.5) is True and load_checkpoint(mine)["miou"] == 0.5


@pytest.mark.parametrize("mask_size", [(6, 9), (7, 8)])
def test_a_mask_of_another_width_or_height_is_refused(tmp_path, mask_size):
    """Bug: the mask/image size check compares one dimension only."""
    from trainer.dataset import DatasetError
    from trainer.formats import read_folder

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.ones(mask_size, np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(
        DatasetError, match=rf"mask is {mask_size[0]}x{mask_size[1]} but its image a.png is 6x8"
    ):
        read_folder(tmp_path)


def test_an_in_memory_dataset_of_mismatched_masks_is_refused():
    from trainer.dataset import Dataset

    for masks in (
        np.zeros((2, 6, 9), np.uint8),
        np.zeros((2, 7, 8), np.uint8),
        np.zeros((3, 6, 8), np.uint8),
    ):
        with pytest.raises(ValueError, match="must both be"):
            Dataset(images=np.zeros((2, 6, 8), np.uint8), masks=masks)


def test_a_negative_frame_index_is_refused_not_read_from_the_end(tmp_path):
    """Bug: frame -1 reads the last frame (or an empty chunk slice) instead of an error."""
    from trainer.corrections import CorrectionStore
    from trainer.formats import open_zarr, read_npz, write_npz

    images = np.arange(3 * 4 * 6, dtype=np.uint8).reshape(3, 4, 6)
    masks = np.ones((3, 4, 6), np.uint8)
    write_npz(tmp_path / "d.npz", images, masks, dtype="uint8")
    assert main(["convert", str(tmp_path / "d.npz"), "--out", str(tmp_path / "d.zarr")]) == 0
    stored = open_zarr(tmp_path / "d.zarr")
    np.testing.assert_array_equal(stored.image(2), images[2])
    for i in (-1, 3):
        with pytest.raises(IndexError, match=f"frame {i} of images out of range 0..2"):
            stored.image(i)
    store = CorrectionStore.for_dataset(read_npz(tmp_path / "d.npz"))
    with pytest.raises(IndexError):
        store.save_mask(-1, np.zeros((4, 6), np.uint8))
    assert store.edited() == set()
    store.close()


def test_the_run_summary_counts_the_epochs_run(tmp_path, small_sample):
    """Bug: the summary's epoch count is off by one."""
    from trainer.engine import fit

    cfg = preset("tiny").replace(epochs=2)
    events = list(fit(small_sample.dataset, cfg, tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert summary["steps"] == events[-1].step > 0
    assert summary["reason"] == "completed"


def test_a_missing_test_set_and_an_unknown_export_format_are_clear_errors(tmp_path, capsys, small_sample):
    """Bug: they reach the person as a traceback or as another error."""
    from trainer.formats import write_npz
    from trainer.portable import ExportError, export

    ds = small_sample.dataset
    write_npz(tmp_path / "no_test.npz", ds.images[:6], ds.masks[:6], dtype="uint8")
    ck = _checkpoint(tmp_path / "ck.pt")
    code = main(
        ["submit", str(tmp_path / "no_test.npz"), "--checkpoint", str(ck), "--out", str(tmp_path / "s.csv")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "has no test_set" in err and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()
    code = main(
        ["predict", str(tmp_path / "no_test.npz"), "--checkpoint", str(ck), "--out", str(tmp_path / "p.npz")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "has no test_set to predict" in err
    with pytest.raises(ExportError, match="unknown format 'keras'"):
        export(build_model(preset("tiny")).eval(), "keras", tmp_path / "m.keras")
    with pytest.raises(SystemExit):
        main(["export-model", "--checkpoint", str(ck), "--out", str(tmp_path / "m"), "--format", "keras"])
    assert "invalid choice: 'keras'" in capsys.readouterr().err


# -- the napari session (Qt-free)


def test_training_gets_the_labelled_masks_only(pool_session, small_sample):
    """Bug: the session hands training the (blank) masks of the unlabelled rows too."""
    ds = small_sample.dataset
    spec = pool_session.training_data()
    assert spec.images.shape[0] == spec.masks.shape[0] == 20
    np.testing.assert_array_equal(spec.masks, ds.masks[:20])
    np.testing.assert_array_equal(spec.images, ds.images[:20])
    assert spec.pool is not None and len(spec.pool) == 6
    np.testing.assert_array_equal(spec.pool, ds.images[20:26])


def test_a_second_training_is_not_started_while_one_runs(pool_session, monkeypatch):
    """Bug: Train while a run is going starts a second child process."""
    import trainer.process

    made = []

    class FakeProcess:
        running = True

        def __init__(self, *args, **kwargs):
            made.append(self)

        def poll(self):
            return []

        def stop(self, *args, **kwargs):
            self.running = False

        def kill(self, *args, **kwargs):
            self.running = False

        def hold(self, *args):
            pass

        def release(self):
            pass

    monkeypatch.setattr(trainer.process, "TrainingProcess", FakeProcess)
    t = pool_session.training
    first = t.start(preset("tiny"))
    assert isinstance(first, FakeProcess) and t.running
    assert t.start(preset("tiny")) is first
    assert len(made) == 1
    first.running = False
    t.process = None


def test_prediction_arrays_follow_a_dataset_of_another_shape(pool_session, small_sample):
    """Bug: the prediction arrays are kept for a dataset of another shape."""
    t = pool_session.training
    assert t.prediction.shape == (26, 64, 128)
    images = np.zeros((4, 32, 48), np.uint8)
    pool_session.set_dataset(images, np.ones((4, 32, 48), np.uint8), None, "other")
    assert t.prediction.shape == t.entropy.shape == (4, 32, 48)
    assert not t.prediction.any()
