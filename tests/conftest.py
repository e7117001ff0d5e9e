"""Shared fixtures: tiny synthetic datasets and files in the competition format."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.formats import write_npz
from trainer.synth import generate

# How long a test waits for a child job that does a fixed amount of work (epochs, steps,
# a budget of compute) before calling it hung: generous, so that a busy machine makes the
# suite slower, never red.
JOB_WAIT_S = 600


@pytest.fixture(autouse=True)
def _private_user_data(tmp_path_factory, monkeypatch):
    """Stores and runs that fall back to the user data folder land in a temporary one,
    never in the real one, and never shared between tests."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


@pytest.fixture(scope="session")
def small_sample():
    """60 synthetic images with planted problems (generated once per test session)."""
    return generate(60, 8, seed=3)


@pytest.fixture
def npz_path(tmp_path, small_sample):
    """The small sample written as the real file is: float64 training_set and test_set."""
    ds = small_sample.dataset
    path = tmp_path / "mars_for_students.npz"
    write_npz(path, ds.images, ds.masks, ds.test_images, dtype="float64")
    return path


def hand_masks() -> np.ndarray:
    """Three 2x3 masks whose statistics are easy to count by hand."""
    return np.array(
        [
            [[0, 1, 1], [2, 2, 4]],
            [[1, 1, 1], [1, 1, 1]],
            [[0, 1, 1], [2, 2, 4]],
        ],
        np.uint8,
    )


@pytest.fixture
def npz_widget(make_napari_viewer, qtbot, npz_path, tmp_path):
    """The main widget in a viewer with the small sample opened from its .npz; every
    child process it started is stopped afterwards."""
    from marsviewer._widget import MarsViewerWidget

    viewer = make_napari_viewer()
    w = MarsViewerWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.open_path(npz_path)
    qtbot.waitUntil(lambda: not w.loading, timeout=30_000)
    w.session.training.runs_root = tmp_path / "runs"
    yield w
    w.session.shutdown()


@pytest.fixture
def pool_session(tmp_path, small_sample):
    """A Qt-free napari session on the sample's first 20 images, labelled, and 6 more as
    unlabelled rows after them."""
    from marsviewer._session import Session

    ds = small_sample.dataset
    s = Session(runs_root=tmp_path / "runs")
    images = ds.images[:26].copy()
    masks = np.concatenate([ds.masks[:20], np.zeros_like(ds.masks[20:26])])
    (tmp_path / "pool.npz").write_bytes(b"")
    s.set_dataset(images, masks, None, str(tmp_path / "pool.npz"), n_test=6)
    yield s
    s.shutdown()
