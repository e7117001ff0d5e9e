"""A job says what CPU it gets: a run starved by other programs says so while it runs
and, when a budget ended it before it could learn, in its final message and event."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from marsviewer._run_record import RunRecord
from trainer import events as ev
from trainer.epoch_end import EpochEnd


@pytest.mark.parametrize(
    "cores, threads, said",
    [
        (0.2, 2, "training gets 0.2 of its 2 cores: other programs are busy"),
        (0.3, 1, "training gets 0.3 of a core: other programs are busy"),
        (1.2, 2, ""),  # more than half of what it could use: nothing to say
        (None, None, ""),  # a GPU run
    ],
)
def test_the_share_of_the_cpu_is_said_when_far_below_what_the_run_could_use(cores, threads, said):
    assert ev.cpu_share_text(cores, threads) == said


def _run(steps: int, cpu_s: float, wall_s: float):
    now_wall, now_cpu = time.perf_counter(), time.process_time()
    return SimpleNamespace(
        state=SimpleNamespace(step=steps + 5), start_step=5, paused_s=0.0,
        wall0=now_wall - wall_s, cpu0=now_cpu - cpu_s, device=torch.device("cpu"),
    )  # fmt: skip


def test_a_budget_that_ended_a_starved_run_says_how_many_steps_and_why():
    note = EpochEnd.ending_note(_run(steps=20, cpu_s=6.0, wall_s=90.0), "time budget")
    assert note.startswith("only 20 training steps in the time budget (training gets 0.1 of")
    assert "other programs are busy" in note and "close other programs" in note
    threads = torch.get_num_threads()
    busy = EpochEnd.ending_note(_run(steps=20, cpu_s=90.0 * threads, wall_s=90.0), "time budget")
    assert busy.startswith("only 20 training steps") and "other programs" not in busy  # a short budget
    assert EpochEnd.ending_note(_run(steps=150, cpu_s=6.0, wall_s=90.0), "time budget") == ""
    assert EpochEnd.ending_note(_run(steps=20, cpu_s=6.0, wall_s=90.0), "completed") == ""


def test_the_train_tab_says_it_while_the_run_goes_and_at_its_end():
    record = RunRecord()
    record.apply({"kind": "started", "device": "cpu"})
    step = {"kind": "step", "epoch": 0, "step": 3, "loss": 1.0, "lr": 1e-3, "images_per_s": 4.0,
            "progress": 0.1, "eta_s": 60.0, "cpu_cores": 0.2, "threads": 2}  # fmt: skip
    record.apply(step)
    record.state = "running"
    assert record.status_line().endswith("training gets 0.2 of its 2 cores: other programs are busy")
    record.apply({**step, "cpu_cores": 1.9})
    assert "other programs" not in record.status_line()
    record.apply(
        {"kind": "finished", "best_miou": 0.05, "reason": "time budget", "note": "only 20 training steps"}
    )
    assert record.message == "Finished (time budget): best mIoU 0.050\nOnly 20 training steps."


def test_a_job_held_for_the_person_is_not_said_to_be_starved(tmp_path, small_sample):
    from marsviewer._session import Session

    s = Session(runs_root=tmp_path / "runs")
    ds = small_sample.dataset
    s.set_dataset(ds.images[:10].copy(), ds.masks[:10].copy(), None, "synthetic")
    t = s.training
    queued = []
    t.process = SimpleNamespace(
        events=lambda: [queued.pop()] if queued else [],
        running=True,
        hold=lambda _s: None,
        release=lambda: None,
    )
    low = ev.Step(0, 3, 1.0, 1e-3, 4.0, 0.1, 60.0, 0.2, 2)
    queued.append(low)
    t.poll()
    assert "other programs are busy" in t.record.cpu_note
    s.user_active()  # the person browses: the session holds the job itself
    queued.append(low)
    t.poll()
    assert t.record.cpu_note == ""
    t.process = None
    s.held = []


def test_training_steps_carry_the_cpu_they_got(tmp_path, small_sample):
    from trainer.config import preset
    from trainer.engine import fit

    events = list(fit(small_sample.dataset, preset("tiny").replace(epochs=1, log_every=1), tmp_path / "r"))
    steps = [e for e in events if isinstance(e, ev.Step)]
    assert steps and all(e.threads == torch.get_num_threads() for e in steps)
    assert all(e.cpu_cores is not None and 0 < e.cpu_cores < 4 * e.threads for e in steps)
    assert events[-1].kind == "finished" and events[-1].note == ""
