"""The plugin's session model without Qt or a viewer: review, training lifecycle,
worst-first navigation and yielding to the person at the screen."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from marsviewer._review_model import CHANGED, DISAGREEMENT, QueueEntry
from marsviewer._session import QUIET_S, Session
from tests.conftest import JOB_WAIT_S
from trainer.audit import move_mask
from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.config import preset
from trainer.inference import predict_arrays


class Recorder:
    """Collects what a psygnal signal emitted."""

    def __init__(self, signal) -> None:
        self.calls: list = []
        signal.connect(lambda *args: self.calls.append(args))


@pytest.fixture
def session(tmp_path, small_sample):
    ds = small_sample.dataset
    s = Session(runs_root=tmp_path / "runs")
    images, masks = ds.images.copy(), ds.masks.copy()
    (tmp_path / "sample.npz").write_bytes(b"")  # the store goes beside the dataset's file
    s.set_dataset(images, masks, None, str(tmp_path / "sample.npz"))
    yield s
    s.shutdown()


def wait(session: Session, predicate, timeout: float = JOB_WAIT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        session.poll()
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_save_undo_redo_restore_and_exclude(session):
    review, masks = session.review, session.browser.masks
    states, rewritten = Recorder(review.image_changed), Recorder(review.masks_changed)
    session.browser.set_index(4)
    original = masks[4].copy()
    masks[4, 10:20, 10:30] = 3  # a paint stroke writes into the array
    review.mask_edited()
    assert states.calls[-1][0].unsaved and "unsaved changes" in states.calls[-1][0].summary
    assert review.save()
    assert states.calls[-1][0].edited and not states.calls[-1][0].unsaved
    assert review.changed[4].sum() == (original != masks[4]).sum()  # the changed-pixels overlay
    edited = masks[4].copy()
    review.undo()
    np.testing.assert_array_equal(masks[4], original)
    assert rewritten.calls[-1] == ([4],)
    history = states.calls[-1][0].history  # undone: the file's mask is what is in effect, marked
    assert history[0] == "original mask (as in the file)  ◀" and not history[1].endswith("◀")
    review.redo()
    np.testing.assert_array_equal(masks[4], edited)
    review.restore()
    np.testing.assert_array_equal(masks[4], original)
    history = states.calls[-1][0].history
    assert len(history) == 3 and history[0] == "original mask (as in the file)" and history[2].endswith("◀")
    review.toggle_exclude()
    assert review.store.is_excluded(4) and states.calls[-1][0].excluded


def test_a_label_that_is_not_a_class_is_refused(session):
    notes = Recorder(session.notify)
    session.browser.masks[2, 0, 0] = 9
    assert not session.review.save(2)
    assert notes.calls and notes.calls[-1][1] == "error" and "not a class" in notes.calls[-1][0]


def test_corrections_come_back_in_a_new_session(session, tmp_path, small_sample):
    session.browser.set_index(2)
    session.browser.masks[2, :8] = 4
    session.review.save()
    session.review.toggle_exclude()
    session.shutdown()
    again = Session(runs_root=tmp_path / "runs")
    ds = small_sample.dataset
    masks = ds.masks.copy()
    again.set_dataset(ds.images.copy(), masks, None, str(tmp_path / "sample.npz"))
    assert (masks[2, :8] == 4).all() and again.review.store.is_excluded(2)
    spec = again.training_data()  # trains on the originals plus the saved store
    np.testing.assert_array_equal(spec.masks, ds.masks)
    assert spec.corrections_path == str(again.review.store.path)
    again.shutdown()


def test_autosave_when_moving(session):
    session.review.autosave = True
    session.browser.set_index(1)
    session.browser.masks[1, 0:5, 0:5] = 2
    session.browser.set_index(2)
    np.testing.assert_array_equal(session.review.store.state(1)[0][0:5, 0:5], 2)


def test_queue_entries_are_typed_and_group_exclusion_works(session, small_sample):
    review = session.review
    group = set(small_sample.truth["outlier_group"])
    top = review.queue[0]
    assert isinstance(top, QueueEntry) and top.group is not None and set(top.group) == group
    review.go_to(top)
    assert session.browser.index == top.index
    review.exclude_group(top)
    assert review.store.snapshot()[1] == group


def test_suggested_move_is_an_unsaved_edit(session):
    review, masks = session.review, session.browser.masks
    before = masks[3].copy()
    move = QueueEntry(3, 0.3, "misaligned (move 5 px right)", move=(0, 5))
    notes = Recorder(session.notify)
    review.apply_move(QueueEntry(1, 0.2, "model disagreement"))  # nothing to move
    assert "does not suggest" in notes.calls[-1][0]
    review.apply_move(move)
    assert session.browser.index == 3 and review.has_unsaved_edits(3)
    np.testing.assert_array_equal(masks[3], move_mask(before, 0, 5))


def test_disagreement_overlay_after_an_audit_result(session):
    review = session.review
    review.audit_masks = np.zeros_like(session.browser.masks)
    overlays = Recorder(review.overlay_changed)
    review.go_to(QueueEntry(5, 0.4, "model disagreement"))
    assert overlays.calls[-1] == (DISAGREEMENT, 5)
    assert review.disagreement[5].sum() == (session.browser.masks[5] != 0).sum()
    assert CHANGED != DISAGREEMENT


class FakeJob:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.running = True

    def hold(self, seconds: float) -> None:
        self.log.append("hold")

    def release(self) -> None:
        self.log.append("release")


def test_jobs_are_held_while_the_person_browses_and_go_on_when_quiet(session):
    now = [100.0]
    session.clock = lambda: now[0]
    job = FakeJob()
    session.jobs = lambda: [job]
    session.user_active()
    session.user_active()
    session.poll()
    assert job.log == ["hold", "hold"] and session.holding  # still inside the quiet period
    now[0] += QUIET_S / 2
    session.user_active()  # every interaction pushes the end of the hold further
    now[0] += QUIET_S * 0.9
    session.poll()
    assert session.holding
    now[0] += QUIET_S * 0.2
    session.poll()
    assert job.log[-1] == "release" and not session.holding


def test_a_runs_folder_that_cannot_be_written_says_so(session, tmp_path):
    t = session.training
    status = Recorder(t.status)
    t.runs_root = tmp_path / "a-file"
    t.runs_root.write_text("not a folder")
    assert t.start(preset("tiny")) is None and not t.running
    assert "cannot create a run directory in" in status.calls[-1][0] and status.calls[-1][1]


def test_training_needs_a_dataset():
    s = Session()
    status = Recorder(s.training.status)
    assert s.training.start(preset("tiny")) is None
    assert "open a dataset first" in status.calls[-1][0]


def test_train_preview_predict_and_worst_first(session):
    t = session.training
    ended = Recorder(t.run_ended)
    session.browser.set_index(3)
    assert t.start(preset("tiny").replace(epochs=2)) is not None
    assert t.running
    wait(session, lambda: ended.calls)
    assert ended.calls == [("finished",)] and not t.running
    assert t.record.val_miou and t.checkpoint.endswith("best.pt")
    assert t.prediction[3].any() and t.first_preview_s is not None  # the image on screen was previewed
    predicted = Recorder(t.predicted)
    assert t.predict_all() is not None
    wait(session, lambda: predicted.calls)
    assert t.worst_order is not None and len(t.worst_order) == len(session.browser.masks)
    assert "rank 1 of" in t.next_worst()
    assert session.browser.index == int(np.nanargmin(t.image_miou))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="suspension is Linux-only")
def test_a_held_training_makes_no_steps_and_goes_on_by_itself(session):
    t = session.training
    t.start(preset("tiny").replace(epochs=200))
    wait(session, lambda: len(t.record.steps) >= 1)
    session.user_active()
    job = t.process
    assert job.suspended
    time.sleep(0.3)
    t.poll()  # what was sent before the hold
    seen = len(t.record.steps)
    time.sleep(0.6)
    t.poll()
    assert len(t.record.steps) == seen  # nothing moved while held (no session.poll: never quiet)
    wait(session, lambda: len(t.record.steps) > seen)
    assert not job.suspended
    t.stop()
    wait(session, lambda: not t.running)
    assert t.record.state == "stopped"


def test_unlabelled_images_are_browsed_labelled_and_trained_on(pool_session, small_sample):
    s, b, review = pool_session, pool_session.browser, pool_session.review
    notes = Recorder(s.notify)
    assert b.n_labelled == 20 and b.show == "labelled" and b.stats.images == 20
    assert b.matching_indices().tolist() == list(range(20))
    b.set_show("unlabelled")
    assert b.index == 20 and b.matching_indices().tolist() == list(range(20, 26))
    review.toggle_exclude()  # nothing to exclude yet: a message, no store entry
    assert "saved label" in notes.calls[-1][0] and not review.store.is_excluded(20)
    b.masks[20] = small_sample.dataset.masks[20]  # the person paints the whole image
    assert review.save()
    assert b.pool_labelled == {20} and b.stats.images == 21  # it counts in the class balance
    assert 20 not in b.matching_indices()  # no longer unlabelled
    b.set_show("labelled")
    assert b.matching_indices().tolist() == list(range(21)) and 20 in b.labelled_rows()
    spec = s.training_data()
    assert len(spec.images) == 20 and len(spec.pool) == 6 and spec.corrections_path
    from trainer.corrections import CorrectionStore

    dataset = spec.load()
    applied, _ = spec.open_corrections(dataset).apply(dataset)
    assert len(applied) == 21  # the child trains on it
    b.set_index(20)
    review.restore()  # back to unlabelled
    assert b.pool_labelled == set() and not b.masks[20].any() and b.stats.images == 20
    assert isinstance(review.store, CorrectionStore) and review.store.n_pool == 6


def test_an_unlabelled_image_with_no_labelled_pixel_is_not_saved(pool_session):
    """A start from prediction that kept no pixel, saved, made an empty training image."""
    s, b, review = pool_session, pool_session.browser, pool_session.review
    notes = Recorder(s.notify)
    b.set_show("unlabelled")
    assert b.index == 20 and not b.masks[20].any()
    assert review.save() is False
    assert "no pixel of it is labelled" in notes.calls[-1][0] and notes.calls[-1][1] == "error"
    assert review.store.state(20)[0] is None and b.pool_labelled == set() and b.stats.images == 20
    b.masks[20][:2, :2] = 3  # one class painted: now it is a label
    assert review.save() and b.pool_labelled == {20}


def test_label_next_queue_and_start_from_prediction(pool_session, tmp_path):
    from trainer.cli import main

    run_dir = tmp_path / "run"
    assert (
        main(["train", "synthetic:24:3", "--run-dir", str(run_dir), "--preset", "tiny", "--epochs", "1"]) == 0
    )
    s, b, nxt = pool_session, pool_session.browser, pool_session.label_next
    notes = Recorder(s.notify)
    assert nxt.start_from_prediction(3) is None  # labelled: a message, nothing changes
    assert "has a label already" in notes.calls[-1][0]
    assert nxt.start() is None and "No checkpoint yet" in notes.calls[-1][0]
    assert s.training.attach(run_dir)
    s.review.store.exclude(25)  # excluded elsewhere (the command line): not ranked
    done = Recorder(nxt.done)
    assert nxt.start() is not None
    wait(s, lambda: done.calls)
    assert done.calls == [(True,)]
    rows = [e.row for e in nxt.entries]
    assert sorted(rows) == list(range(20, 25))  # every unlabelled image left, each once
    assert b.own_name(20) == b.own_name(3) == ""  # an npz's names are numbers: the row says it all
    s.review.store.include(25)
    assert all(e.text and "uncertain" in e.label for e in nxt.entries)
    assert b.show == "labelled"
    nxt.go_to(nxt.entries[0])
    row = b.index
    assert row == rows[0] and b.show == "unlabelled"  # Next and Prev stay among the unlabelled
    nxt.confidence = 0.0  # keep every pixel: the whole prediction becomes the mask
    assert nxt.start_from_prediction() is not None
    wait(s, lambda: nxt.seed is None)
    assert b.masks[row].min() >= 1 and s.review.has_unsaved_edits(row)  # unsaved until checked
    first = b.masks[row].copy()
    s.review.restore()  # back to the empty mask
    nxt.confidence = 0.99
    nxt.start_from_prediction()
    wait(s, lambda: nxt.seed is None)
    kept = b.masks[row] > 0
    assert (b.masks[row][kept] == first[kept]).all() and kept.sum() < first.size  # only the sure pixels
    if kept.any():
        assert s.review.save() and b.pool_labelled == {row}
    else:  # no pixel sure enough: not saved as a training image that teaches nothing
        assert not s.review.save() and b.pool_labelled == set()
        assert "no pixel of it is labelled" in notes.calls[-1][0]


def test_label_next_ranks_against_the_labelled_images_left_in(pool_session, monkeypatch):
    """The queue's diversity is measured against the labelled images training uses: an
    excluded one is not among them."""
    from trainer import process

    s, nxt = pool_session, pool_session.label_next
    monkeypatch.setattr(nxt, "_checkpoint", lambda: "model.pt")
    seen = []
    monkeypatch.setattr(process, "SuggestProcess", lambda pool, labelled, *a: seen.append((pool, labelled)))
    s.review.store.exclude(4)
    s.review.store.exclude(22)
    nxt.start()
    (pool, labelled), images = seen[0], s.review.images
    assert len(pool) == 5 and len(labelled) == 19
    assert not any(np.array_equal(x, images[4]) for x in labelled)
    assert not any(np.array_equal(x, images[22]) for x in pool)


def test_a_prediction_does_not_overwrite_paint_made_while_it_ran(pool_session):
    from types import SimpleNamespace

    s, b, nxt = pool_session, pool_session.browser, pool_session.label_next
    notes = Recorder(s.notify)
    b.masks[21][:4] = 2  # the person paints while the prediction runs
    shape = (1, *b.masks[21].shape)
    predicted = SimpleNamespace(masks=np.full(shape, 3, np.uint8), confidence=np.ones(shape, np.float16))
    nxt._take_seed(21, predicted)
    assert (b.masks[21][:4] == 2).all() and (b.masks[21][4:] == 0).all()
    assert "changed meanwhile" in notes.calls[-1][0]
    nxt._take_seed(20, predicted)  # untouched: the prediction goes in
    assert (b.masks[20] == 3).all() and s.review.has_unsaved_edits(20)


def test_folder_corrections_survive_images_added_to_the_folder(tmp_path):
    """The plugin's path: layers carry the images' names, the session keys the store by
    them, and the training child reads the same corrections at the images' new rows."""
    from PIL import Image

    from marsviewer._layers import dataset_layer_data
    from trainer.formats import open_dataset

    root = tmp_path / "frames"

    def add(name):
        for sub, value in (("images", 90), ("masks", 1)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 16), value, np.uint8)).save(root / sub / f"{name}.png")

    def open_session():
        ds = open_dataset(root)
        (images, image_kw, _), (masks, mask_kw, _) = dataset_layer_data(ds)
        info = mask_kw["metadata"]["marsviewer"]
        s = Session(runs_root=tmp_path / "runs")
        n_test = image_kw["metadata"]["marsviewer"]["n_test"]
        s.set_dataset(images, masks, info["names"], info["source"], n_test, info["keys"])
        return ds, s

    for name in ("b", "c"):
        add(name)
    ds, s = open_session()
    row = ds.names.index("images/c")
    s.browser.set_index(row)
    s.browser.masks[row] = 3
    assert s.review.save()
    s.shutdown()
    add("a")  # sorts first: "c" moves from row 1 to row 2
    ds, s = open_session()
    row = ds.names.index("images/c")
    assert row == 2 and (s.browser.masks[row] == 3).all() and (s.browser.masks[1] == 1).all()
    spec = s.training_data()
    dataset = spec.load()
    applied, _ = spec.open_corrections(dataset).apply(dataset)
    assert (applied.masks[row] == 3).all() and (applied.masks[:2] == 1).all()
    s.shutdown()


def test_a_zarr_dataset_on_disk_is_browsed_corrected_and_trained_lazily(tmp_path, monkeypatch):
    """A converted dataset too large for memory: the masks are a frame stack (nothing read
    but the frames shown), statistics come from its class table, a correction is saved at
    the frame's own size and comes back in a new session, and training reads it from disk."""
    from PIL import Image

    from marsviewer._layers import dataset_layer_data
    from marsviewer._stack import FrameStack
    from trainer import formats
    from trainer.convert import convert
    from trainer.formats import open_dataset

    root = tmp_path / "frames"
    for i, shape in enumerate([(40, 56), (24, 32), (40, 56), (32, 32), (36, 48)]):
        for sub in ("images", "masks") if i < 3 else ("images",):
            (root / sub).mkdir(parents=True, exist_ok=True)
            value = 100 if sub == "images" else 1 + i % 2
            Image.fromarray(np.full(shape, value, np.uint8)).save(root / sub / f"f{i}.png")
    convert(root, tmp_path / "d.zarr")
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)

    def open_session():
        (images, image_kw, _), (masks, mask_kw, _) = dataset_layer_data(
            open_dataset(tmp_path / "d.zarr", lazy=True)
        )
        info = mask_kw["metadata"]["marsviewer"]
        s = Session(runs_root=tmp_path / "runs")
        s.set_dataset(
            images,
            masks,
            info["names"],
            info["source"],
            image_kw["metadata"]["marsviewer"]["n_test"],
            info["keys"],
        )
        return s

    s = open_session()
    b, review = s.browser, s.review
    assert isinstance(b.masks, FrameStack) and review.active and b.n_labelled == 3 and len(b) == 5
    assert b.stats.images == 3 and b.stats.classes[2].images == 1  # from the class table
    assert b.masks.written == {}  # nothing held
    b.set_index(2)  # browsing an untouched frame reads its mask once: the original is not read
    state = review.state_of(2)
    assert not state.unsaved and state.changed_pixels == 0 and 2 not in review.original_masks._cache
    b.set_index(1)  # a 24x32 frame padded to 40x56
    b.masks[1, 0:4, 0:4] = 4  # a paint stroke
    state = review.state_of(1)
    assert state.unsaved and state.changed_pixels == 16 and not state.edited
    assert review.has_unsaved_edits(1) and review.save()
    assert 1 not in b.masks.written and (b.masks[1][:4, :4] == 4).all()  # saved: read back, not held
    state = review.state_of(1)  # nothing held, the saved mask against the original
    assert state.edited and not state.unsaved and state.changed_pixels == 16
    mask, _ = review.store.state(1)
    assert mask.shape == (24, 32) and (mask[:4, :4] == 4).all() and (mask[4:, 4:] == 2).all()
    b.set_index(3)  # the unlabelled frame: a saved label makes it a training image
    b.masks[3] = 1
    assert review.save() and b.pool_labelled == {3}
    spec = s.training_data()
    assert spec.lazy and spec.path.endswith("d.zarr") and spec.corrections_path
    dataset = spec.load()
    assert isinstance(dataset, formats.StoredDataset)
    edited, _ = spec.open_corrections(dataset).snapshot()
    assert edited[1].shape == (24, 32) and edited[3].shape == (32, 32)
    s.training.start(preset("tiny").replace(epochs=1, device="cpu"))  # the child reads the store
    wait(s, lambda: s.training.record.state in ("finished", "failed"))
    assert s.training.record.state == "finished", s.training.record.message
    assert set(s.training.prediction.written) == {b.index}  # the live preview of the frame on screen
    assert s.training.prediction[b.index].shape == (40, 56)
    done = Recorder(s.label_next.done)  # the pool still unlabelled, ranked from disk
    assert s.label_next.start() is not None
    wait(s, lambda: done.calls)
    assert done.calls == [(True,)] and [e.row for e in s.label_next.entries] == [4]
    assert b.own_name(4) == "images/f4"  # the queue's line names the file
    assert s.label_next.entries[0].line(b.own_name(4)).startswith("image     4 (images/f4) · ")
    predicted = Recorder(s.training.predicted)  # Predict all: into a zarr beside the runs, read by frame
    assert s.training.predict_all() is not None
    wait(s, lambda: predicted.calls)
    t = s.training
    assert t.prediction.written == {} and t.prediction.n_base == 5  # the live preview gave way
    run = Path(t.checkpoint).parent.parent.name
    (folder,) = (tmp_path / "runs" / "predictions").iterdir()
    assert folder.name.startswith("d-")
    from marsviewer._predictions import dataset_key  # of one name in two folders: apart

    assert dataset_key(str(tmp_path / "a" / "d.zarr")) != dataset_key(str(tmp_path / "b" / "d.zarr"))
    assert dataset_key(str(tmp_path / "a" / "d.zarr")) == dataset_key(
        str(tmp_path / "b" / ".." / "a" / "d.zarr")
    )
    first = list(folder.iterdir())
    assert len(first) == 1 and first[0].name.startswith(f"{run}-")
    other_run = folder / "other-run-20260101-000000"  # an earlier prediction of another run
    other_run.mkdir()
    model = model_from_checkpoint(load_checkpoint(t.checkpoint))[0]
    for row in range(5):  # each frame at its own size inside the padded frame
        h, w = b.masks.sizes[row]
        want = predict_arrays(model, s.images[row][None][:, :h, :w], device="cpu")["masks"][0]
        assert (t.prediction[row][:h, :w] == want).all() and not t.prediction[row][h:].any()
    assert np.isnan(t.image_miou[4]) and not np.isnan(t.image_miou[:4]).any()  # 3 was labelled since
    assert t.confusion.sum() == sum(int(np.prod(b.masks.sizes[r])) for r in range(4))
    assert "rank 1 of 4" in t.next_worst() and b.index == int(np.nanargmin(t.image_miou))
    assert t.predict_all() is not None  # again: a folder of its own, the one before removed
    wait(s, lambda: len(predicted.calls) == 2)
    t.removing.join(timeout=60)  # removed in a thread of its own
    (second,) = folder.iterdir()  # the earlier ones, of any run, removed
    assert second.name != first[0].name and second.name.startswith(f"{run}-")
    assert (
        t.prediction[1][:24, :32] == predict_arrays(model, s.images[1][None][:, :24, :32])["masks"][0]
    ).all()
    t.runs_root = tmp_path / "a-file"  # a runs folder that cannot be written: said, nothing starts
    t.runs_root.write_text("")
    assert t.predict_all() is None and t.predictor is None
    b.set_index(0)
    review.restore()  # nothing saved there: an entry, the original read again
    assert 0 not in b.masks.written
    s.shutdown()

    s = open_session()
    assert (s.browser.masks[1][:4, :4] == 4).all() and (s.browser.masks[1][24:] == 0).all()
    assert s.browser.pool_labelled == {3} and s.browser.masks.written == {}  # read from the store
    assert s.browser.masks.class_pixels[1][4] == 16 and s.browser.stats.classes[4].images == 1
    s.browser.set_index(1)
    s.review.restore()
    assert 1 not in s.browser.masks.written and (s.browser.masks[1][:4, :4] == 2).all()
    s.shutdown()


def test_a_runs_notices_reach_the_person_and_counts_do_not(session):
    """A Progress without a total tells the person something (a step that could not become
    a CUDA graph): a notification. One with a total is a count: the status line says it."""
    from trainer import events as ev

    class Running:
        running = True

        def events(self):
            return [
                ev.Progress("the training step could not be captured as a CUDA graph (...)"),
                ev.Progress("validating: 3 of 10 images", 3, 10),
            ]

        def request_preview(self, indices):
            pass

    notes = Recorder(session.notify)
    session.training.process = Running()
    try:
        session.training.poll()
    finally:
        session.training.process = None
    texts = [c[0] for c in notes.calls]
    assert texts == ["Training: the training step could not be captured as a CUDA graph (...)"]
    assert notes.calls[0][1] == "info"


def test_a_duplicate_group_is_visited_from_its_first_member_then_in_order():
    """Clicking a group from an image outside it starts at the group's first member (not
    the member after the image shown); from a member it goes on to the next, then wraps."""
    from marsviewer._browser import DatasetBrowser

    b = DatasetBrowser()
    b.set_dataset(np.random.default_rng(0).integers(0, 5, (12, 8, 8), dtype=np.uint8))
    b.set_index(5)
    seen = []
    for _ in range(4):
        b.visit_group([9, 3, 7])
        seen.append(b.index)
    assert seen == [3, 7, 9, 3]


def test_the_sample_says_it_keeps_earlier_corrections_and_starts_afresh(tmp_path):
    from marsviewer._sample import sample_dataset

    def open_sample():
        ds = sample_dataset()
        images, masks = ds.stacked()
        s = Session(runs_root=tmp_path / "runs")
        notes = Recorder(s.notify)
        s.set_dataset(images, masks, None, ds.source, n_test=len(ds.test_images))
        return s, notes, ds

    s, notes, ds = open_sample()
    assert s.browser.n_labelled == 200 and len(s.browser) == 260  # a pool: Label next works at once
    assert s.review.is_sample
    s.browser.masks[5] = 1
    assert s.review.save(5)
    folder = s.review.store.path.parent
    s.shutdown()
    s, notes, ds = open_sample()  # another session
    assert "earlier sessions" in notes.calls[-1][0] and (s.browser.masks[5] == 1).all()
    moved = s.review.start_afresh()
    np.testing.assert_array_equal(s.browser.masks[5], ds.masks[5])  # the original mask again
    assert s.review.store.edited() == set() and s.review.active
    assert (
        Path(moved).name.startswith(folder.name + ".replaced-")
        and (Path(moved) / "corrections.sqlite").exists()
    )
    assert "kept in" in notes.calls[-1][0]
    s.shutdown()
    s, notes, _ = open_sample()
    assert not any("earlier sessions" in c[0] for c in notes.calls)  # fresh now
    s.shutdown()


def test_only_the_sample_starts_afresh_from_the_panel(session):
    assert not session.review.is_sample and session.review.start_afresh() is None
    assert session.review.active


def test_the_image_title_and_the_counter_say_each_thing_once(pool_session):
    b = pool_session.browser
    assert b.image_title(3) == "Image 3"  # an npz's name is its number: not "Image 3 (3)"
    b.names = [*b.names[:3], "site_a/f3", *b.names[4:]]
    assert b.image_title(3) == "Image 3 (site_a/f3)"
    assert b.count_text() == "of 25 · 20 shown"  # the labelled images of 26
    b.set_show("all")
    assert b.count_text() == "of 25"
    b.set_filter(4)
    shown = len(b.matching_indices())
    assert 0 < shown < 26 and b.count_text() == f"of 25 · {shown} shown"
