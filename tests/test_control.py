"""TrainControl: the commands another thread gives a running fit(), and RunState: what a
checkpoint records of where a run stands."""

from __future__ import annotations

import time

from trainer.control import RunState, TrainControl


def test_a_pause_extends_and_never_shortens_and_a_stop_ends_it():
    control = TrainControl()
    assert not control.paused
    control.pause(60)
    control.pause(1)  # a shorter pause asked later leaves the longer one
    assert control.paused and control._paused_until - time.monotonic() > 50
    control.pause(-5)
    assert control.paused
    control.request_stop()
    assert not control.paused and control.stop_requested


def test_a_preview_request_is_taken_once():
    control = TrainControl()
    assert not control.take_preview_request()
    control.request_preview([3, 1])
    assert control.preview_indices == [3, 1]
    assert control.take_preview_request() and not control.take_preview_request()


def test_run_state_from_a_checkpoint():
    data = {
        "epoch": 4, "step": 90, "best_miou": 0.4, "plateau_factor": 0.25, "stale": 7,
        "elapsed_s": 12.5, "resume": {"epoch": 4, "batch": 6},
    }  # fmt: skip
    assert RunState.from_checkpoint(data) == RunState(4, 6, 90, 0.4, 0.25, 7, 12.5)
    # a checkpoint from before mid-epoch resume: its epoch was finished
    old = {"epoch": 4, "step": 90}
    assert RunState.from_checkpoint(old) == RunState(5, 0, 90, -1.0, 1.0, 0, 0.0)
