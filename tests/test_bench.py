"""The benchmarks' own helpers, on tiny inputs: what they measure must be what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_synthetic_data_drawn_in_blocks_is_the_blocks_drawn_alone(monkeypatch):
    from trainer.synth import generate

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the processes import the bench by name
    import train_throughput as tt

    d = tt.synthetic(25, (16, 32), block=10)
    assert d.images.shape == d.masks.shape == (25, 16, 32)
    for k, (start, n) in enumerate([(0, 10), (10, 10), (20, 5)]):
        alone = generate(n, 0, seed=k, shape=(16, 32)).dataset
        assert (d.images[start : start + n] == alone.images).all()
        assert (d.masks[start : start + n] == alone.masks).all()
    assert np.array_equal(
        tt.synthetic(8, (16, 32), block=10).images, generate(8, 0, seed=0, shape=(16, 32)).dataset.images
    )


def test_step_profile_counts_the_steps_it_profiles(tmp_path):
    """Two windows of warm-up, then ``active`` windows of ``log_every`` steps: the operators
    of those steps, per step."""
    cmd = [sys.executable, str(ROOT / "bench/step_profile.py"), "--preset", "tiny", "--images", "120"]
    cmd += ["--log-every", "2", "--active", "2", "--top", "5", "--json", str(tmp_path / "p.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["steps"] == 4 and out["batch_size"] == 4 and out["busy"] is None  # no GPU here
    assert out["img_s"] > 0 and out["ops_per_step"] > 100
    top = out["top"]
    assert len(top) == 5 and all(r["ms_per_step"] > 0 for r in top)
    assert [r["ms_per_step"] for r in top] == sorted((r["ms_per_step"] for r in top), reverse=True)
    assert not any(r["op"].startswith("ProfilerStep") for r in top)
    parts = out["parts"]  # the parts the engine names: a step, all but the bookkeeping between them
    assert set(parts) == {
        f"step/{p}" for p in ("batch", "augment", "forward", "loss", "backward", "finite", "optimizer")
    }
    host = sum(p["host_ms"] for p in parts.values())
    assert 0.5 * out["wall_ms_per_step"] < host <= out["wall_ms_per_step"], (host, out["wall_ms_per_step"])
    # every training step takes the gradient of each convolution once
    from trainer.config import preset
    from trainer.model import build_model

    convs = sum(isinstance(m, torch.nn.Conv2d) for m in build_model(preset("tiny")).modules())
    backward = [r for r in top if r["op"] == "aten::convolution_backward"]
    assert backward and backward[0]["calls_per_step"] == convs, top


def test_norm_cost_times_each_batch_norm_a_step_runs(tmp_path, monkeypatch):
    """The shapes are those the preset's batch norms see (each counted per call), and the
    step's totals are the per-shape figures times their calls."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import norm_cost

    from trainer.config import preset

    cfg = preset("cpu").replace(precision="fp32")
    shapes = norm_cost.norm_inputs(cfg)
    assert sum(shapes.values()) == 2 * (2 * cfg.depth + 1)  # two per block: encoders and decoders
    assert shapes[((32, 16, 64, 128), torch.float32)] == 4 and shapes[((32, 128, 8, 16), torch.float32)] == 2
    cmd = [sys.executable, str(ROOT / "bench/norm_cost.py"), "--preset", "tiny", "--reps", "3"]
    run = subprocess.run(
        cmd + ["--json", str(tmp_path / "n.json")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads((tmp_path / "n.json").read_text())
    for part in norm_cost.PARTS:
        total = sum(r["calls"] * r[part] for r in out["shapes"])
        assert abs(out["step_ms"][part] - total) <= 0.01 + 0.01 * total, part
    assert all(r["copy"] > 0 and r["bn_forward"] > 0 for r in out["shapes"])
