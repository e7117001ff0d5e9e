"""The training child process without a GUI: events, commands, crashes and orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

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
