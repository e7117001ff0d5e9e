"""The training child process without a GUI: events, commands, crashes and orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer import events as ev
from trainer.config import preset
from trainer.process import DatasetSpec, TrainingProcess, describe_exit


def wait_for(proc: TrainingProcess, predicate, timeout: float = 60.0) -> list:
    seen = []
    end = time.time() + timeout
    while time.time() < end:
        seen.extend(proc.events())
        if predicate(seen):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"timed out; kinds seen: {[e.kind for e in seen]}")


def test_events_commands_and_graceful_stop(tmp_path):
    proc = TrainingProcess(
        DatasetSpec(path="synthetic:40:2"),
        preset("tiny").replace(epochs=100),
        str(tmp_path),
        preview_indices=[1],
    )
    try:
        seen = wait_for(proc, lambda s: any(isinstance(e, ev.Step) for e in s))
        assert isinstance(seen[0], ev.Started)
        proc.request_preview([7])
        seen += wait_for(proc, lambda s: any(isinstance(e, ev.Preview) and e.indices == [7] for e in s))
        proc.stop()
        seen += wait_for(proc, lambda s: any(isinstance(e, ev.Stopped) for e in s))
        assert not proc.running and (tmp_path / "checkpoints" / "last.pt").exists()
    finally:
        proc.kill()


def test_bad_input_in_the_child_is_a_failed_event(tmp_path):
    proc = TrainingProcess(
        DatasetSpec(path=str(tmp_path / "missing.npz")), preset("tiny"), str(tmp_path / "run")
    )
    seen = wait_for(proc, lambda s: any(isinstance(e, ev.Failed) for e in s))
    assert "no such file" in seen[-1].message and "Traceback" not in seen[-1].message


def test_describe_exit():
    assert "SIGKILL" in describe_exit(-9) and "code 3" in describe_exit(3)
    # A child killed outright was most often killed for memory: the person is told so.
    assert "out of memory" in describe_exit(-9) and "out of memory" not in describe_exit(-15)
    assert describe_exit(-15) == "was ended by SIGTERM" and describe_exit(None) == "is still running"


@pytest.mark.skipif(not hasattr(os, "getppid"), reason="POSIX only")
def test_no_orphan_when_the_gui_process_is_killed(tmp_path):
    """A parent killed with SIGKILL: its training child notices and ends by itself."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from trainer.config import preset
        from trainer.process import DatasetSpec, TrainingProcess
        if __name__ == "__main__":
            p = TrainingProcess(DatasetSpec(path="synthetic:40:2"), preset("tiny").replace(epochs=1000), {str(tmp_path)!r})
            while not p.events():
                time.sleep(0.05)
            print(p.child.process.pid, flush=True)
            time.sleep(600)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=10)
    end = time.time() + 60
    while time.time() < end:
        try:
            os.kill(child_pid, 0)
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # exited; only waiting for an init that does not reap
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.2)
    else:
        os.kill(child_pid, 9)
        raise AssertionError("the training child outlived its parent by a minute")


def test_prediction_job_sends_progress_then_its_result(tmp_path):
    from trainer.process import PredictionProcess

    proc = TrainingProcess(
        DatasetSpec(path="synthetic:30:4"), preset("tiny").replace(epochs=1), str(tmp_path)
    )
    wait_for(proc, lambda s: any(isinstance(e, ev.Finished) for e in s), timeout=90)
    job = PredictionProcess(
        DatasetSpec(path="synthetic:30:4"), str(tmp_path / "checkpoints" / "last.pt"), "cpu", 8
    )
    seen = wait_for(job, lambda s: any(isinstance(e, ev.JOB_END) for e in s))
    assert [e.done for e in seen if isinstance(e, ev.Progress)][-1] == 30
    result = seen[-1]
    assert isinstance(result, ev.Predicted) and result.masks.shape == (30, 64, 128) and not job.running


def test_a_job_whose_checkpoint_is_missing_fails_with_a_message(tmp_path):
    from trainer.process import PredictionProcess

    job = PredictionProcess(DatasetSpec(path="synthetic:10:4"), str(tmp_path / "nope.pt"), "cpu", 8)
    seen = wait_for(job, lambda s: any(isinstance(e, ev.Failed) for e in s))
    assert "nope.pt" in seen[-1].message and "Traceback" not in seen[-1].message


def test_audit_job_ranks_with_a_compute_budget(small_sample):
    from trainer.process import AuditProcess

    ds = small_sample.dataset
    job = AuditProcess(ds.images, ds.masks, {0}, minutes=0.1, folds=2)
    seen = wait_for(job, lambda s: any(isinstance(e, ev.JOB_END) for e in s), timeout=120)
    assert any(isinstance(e, ev.Progress) for e in seen)
    result = seen[-1]
    assert isinstance(result, ev.Ranked) and result.predictions.shape == ds.masks.shape
    assert {r["index"] for r in result.ranking} == set(range(1, len(ds)))  # image 0 was excluded


def test_pause_holds_training_between_steps_but_answers_previews(tmp_path):
    """The cooperative pause (used where a child cannot be suspended): no steps while
    paused, a preview still answered, and the run goes on by itself afterwards. The pause
    starts when the run has started (its start-up, imports included, can outlast a pause
    set before it), from the consumer of its events: before the generator takes a step."""
    import threading

    from trainer.control import TrainControl
    from trainer.engine import fit
    from trainer.synth import generate

    ds = generate(20, 0, seed=1).dataset
    control = TrainControl(preview_indices=[2])
    kinds: list[tuple[float, str]] = []
    started, paused_at = threading.Event(), []

    def run() -> None:
        for e in fit(ds, preset("tiny").replace(epochs=3, log_every=1), control=control):
            kinds.append((time.monotonic(), e.kind))
            if e.kind == "started":
                paused_at.append(time.monotonic())
                control.pause(1.0)
                started.set()

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    control.request_preview([5])
    worker.join(timeout=60)
    steps = [t for t, k in kinds if k == "step"]
    previews = [t for t, k in kinds if k == "preview"]
    assert steps and steps[0] - paused_at[0] >= 1.0  # no step before the pause ran out
    assert previews and previews[0] < steps[0]  # the preview was answered while paused
    assert kinds[-1][1] == "finished"


def _say_hello(conn) -> None:
    conn.send("hello")
    conn.close()


def test_a_script_without_a_main_guard_is_not_run_again_by_a_child_job(tmp_path):
    """napari scripts are often written without ``if __name__ == "__main__":``; a child
    job started from one must not run the script again."""
    script = tmp_path / "my_script.py"
    script.write_text(
        "print('script ran', flush=True)\n"
        "from trainer.process import _Spawned\n"
        "from tests.test_process import _say_hello\n"
        "job = _Spawned(_say_hello)\n"
        "print(job.conn.recv(), flush=True)\n"
        "job.process.join(60)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)}, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["script ran", "hello"]
