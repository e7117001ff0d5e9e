"""The allocator tuning that keeps freed tensor memory for the next training step."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).resolve().parents[1]

# Ten 8 MiB buffers allocated, touched and freed, five rounds: what a training step does
# with its activations. Counts the page faults of the last four rounds.
_ROUNDS = """
import json, resource, numpy as np
from trainer.allocator import keep_freed_memory
state = keep_freed_memory()
for r in range(5):
    if r == 1:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [np.ones(1 << 20) for _ in range(10)]
    del xs
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4
print(json.dumps({"state": state, "faults": faults}))
"""


def _faults_per_round(setting: str) -> dict:
    env = {**os.environ, allocator.OPT_OUT: setting}
    for name in allocator.USER_SETTINGS:
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc's allocator only")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    system, tuned = _faults_per_round("system"), _faults_per_round("tuned")
    assert system["state"].startswith(allocator.OPT_OUT)
    assert tuned["state"] == "tuned"
    # 80 MiB freed and allocated again per round: ~5,000 fresh pages a round with the
    # system's settings (the heap's free top is trimmed), none once tuned.
    assert system["faults"] > 2_000
    assert tuned["faults"] < 200


def test_user_settings_and_opt_out_leave_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT, "System")
    assert "left as it is" in allocator._tune()
    monkeypatch.delenv(allocator.OPT_OUT)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert "left as the user set it" in allocator._tune() or not GLIBC


def test_trim_threshold_is_bounded():
    assert allocator.MMAP_THRESHOLD <= allocator.trim_threshold() <= 1 << 30


def test_fit_tunes_the_allocator_once(monkeypatch, tmp_path):
    from trainer.config import preset
    from trainer.engine import fit
    from trainer.synth import generate

    calls = []
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator, "_tune", lambda: calls.append(1) or "tuned")
    cfg = preset("tiny").replace(epochs=1, device="cpu")
    data = generate(12, 0, seed=0).dataset
    list(fit(data, cfg, tmp_path / "run"))
    list(fit(data, cfg, tmp_path / "run2"))
    assert calls == [1]
