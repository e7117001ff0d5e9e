"""Every job belongs to the dataset it started on: opening another dataset stops it, or
keeps its result away from the new one. Child processes are stood in for by fakes that
answer as the real ones do, so these run in milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

import trainer.process
from marsviewer._session import Session
from trainer import events as ev
from trainer.config import preset


class FakeJob:
    """A child job whose events the test hands it."""

    made: list = []

    def __init__(self, *args, **kwargs) -> None:
        self.queued: list = []
        self.running, self.killed, self.previews_asked = True, False, []
        FakeJob.made.append(self)

    @classmethod
    def of_stored(cls, *args, **kwargs):
        return cls()

    def events(self):
        out, self.queued = self.queued, []
        return out

    @property
    def finished(self) -> bool:
        return not self.running

    def kill(self) -> None:
        self.running, self.killed = False, True

    def stop(self) -> None:
        self.running = False

    def close(self, timeout: float = 0) -> None:
        self.running = False

    def hold(self, seconds: float) -> None:
        pass

    def release(self) -> None:
        pass

    def request_preview(self, indices) -> None:
        self.previews_asked.append(list(indices))


@pytest.fixture
def session(pool_session, monkeypatch):
    """The pool session (conftest), its child jobs stood in for by fakes."""
    for name in ("AuditProcess", "SuggestProcess", "PredictionProcess", "TrainingProcess"):
        monkeypatch.setattr(trainer.process, name, FakeJob)
    FakeJob.made = []
    return pool_session


def _open_other(s: Session, tmp_path, small_sample) -> None:
    ds = small_sample.dataset
    (tmp_path / "b.npz").write_bytes(b"")
    s.set_dataset(ds.images[30:40].copy(), ds.masks[30:40].copy(), None, str(tmp_path / "b.npz"))


def test_a_ranking_of_the_dataset_before_is_stopped_and_never_fills_the_new_queue(
    session, tmp_path, small_sample
):
    review = session.review
    job = review.start_audit(0.1)
    assert isinstance(job, FakeJob)
    job.queued.append(
        ev.Ranked(
            [{"index": 3, "score": 1.0, "reasons": [{"kind": "single_class", "score": 1.0, "class": 1}]}]
        )
    )
    _open_other(session, tmp_path, small_sample)
    assert job.killed and review.auditor is None
    session.poll()
    assert review.queue == [] and review.audit_masks is None
    assert isinstance(review.start_audit(0.1), FakeJob)  # Rank works on the new dataset at once


def test_a_label_next_ranking_and_a_start_from_prediction_are_stopped(session, tmp_path, small_sample):
    ln = session.label_next
    session.training.record.best_checkpoint = str(tmp_path / "best.pt")
    job = ln.start()
    assert isinstance(job, FakeJob)
    job.queued.append(ev.Suggested([{"index": 0, "score": 1.0, "reasons": []}]))
    _open_other(session, tmp_path, small_sample)
    assert job.killed and ln.job is None and ln.seed is None
    session.poll()
    assert ln.entries == []


def test_a_prediction_of_the_dataset_before_is_stopped(session, tmp_path, small_sample):
    t = session.training
    t.record.best_checkpoint = str(tmp_path / "best.pt")
    job = t.predict_all()
    assert isinstance(job, FakeJob)
    job.queued.append(ev.Predicted(np.full((26, 64, 128), 2, np.uint8), np.zeros((26, 64, 128), np.float32)))
    _open_other(session, tmp_path, small_sample)
    assert job.killed and t.predictor is None
    session.poll()
    assert t.prediction.shape == (10, 64, 128) and not t.prediction.any() and t.worst_order is None


def test_a_training_run_goes_on_but_its_previews_stay_off_another_dataset(session, tmp_path, small_sample):
    t = session.training
    run = t.start(preset("tiny"))
    assert isinstance(run, FakeJob)
    _open_other(session, tmp_path, small_sample)
    assert not run.killed  # the run goes on with the data it has
    run.queued.append(ev.Preview(0, 1, [2], np.full((1, 64, 128), 3, np.uint8)))
    session.browser.set_index(2)
    t.poll()
    assert not t.prediction.any()  # image 2 of the old dataset is not image 2 of this one
    assert run.previews_asked == []  # nor is the image on screen asked of the old run
    # the same shape, another dataset: a fresh prediction array, not the last one's
    assert t.prediction is not None and t.prediction.shape == (10, 64, 128)


def test_another_dataset_of_the_same_shape_starts_with_no_prediction(session, tmp_path, small_sample):
    t = session.training
    t.prediction[:] = 3  # a prediction of the first dataset
    ds = small_sample.dataset
    (tmp_path / "c.npz").write_bytes(b"")
    session.set_dataset(
        ds.images[30:56].copy(), ds.masks[30:56].copy(), None, str(tmp_path / "c.npz"), n_test=6
    )
    assert t.prediction.shape == (26, 64, 128) and not t.prediction.any()


def test_the_progress_bar_says_starting_as_the_status_line_does(session):
    t = session.training
    states, said = [], []
    t.record_changed.connect(lambda: states.append(t.record.state))
    t.status.connect(lambda text, _error: said.append(text))
    t.start(preset("tiny"))
    assert said[-1].startswith("Starting") and states[-1] == "starting"
