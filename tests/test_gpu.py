"""CUDA checks, run where a GPU is present (``pytest -m gpu``); skipped elsewhere."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer import events as ev
from trainer.config import preset
from trainer.engine import fit
from trainer.synth import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


@pytest.fixture(scope="module")
def data():
    return generate(256, 0, seed=1).dataset


def test_gpu_preset_trains_with_finite_loss_and_weights(data, tmp_path):
    cfg = preset("gpu").replace(epochs=2, batch_size=32, log_every=1, device="cuda")
    events = list(fit(data, cfg, tmp_path))
    started, finished = events[0], events[-1]
    assert started.device.startswith("cuda") and started.precision == "bf16" and started.channels_last
    assert isinstance(finished, ev.Finished), finished
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, ev.Step))
    from trainer.checkpoint import load_checkpoint

    weights = load_checkpoint(tmp_path / "checkpoints/last.pt")["model"]
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def _step_losses(events) -> list[float]:
    return [e.loss for e in events if isinstance(e, ev.Step)]


def test_the_step_replayed_as_a_cuda_graph_learns_as_the_eager_step_does(data, tmp_path):
    """The same run with the step as a CUDA graph and without: the graph is used (and says
    so), its replays draw what the eager steps draw (the same seeds), and the losses agree."""
    cfg = preset("gpu").replace(epochs=2, batch_size=32, log_every=1, device="cuda", seed=3)
    graphed = list(fit(data, cfg, tmp_path / "graph"))
    eager = list(fit(data, cfg.replace(cuda_graph=False), tmp_path / "eager"))
    assert "one CUDA graph" in graphed[0].data, graphed[0].data
    assert "steps run eagerly (cuda_graph is off)" in eager[0].data
    assert not [e for e in graphed if isinstance(e, ev.Progress) and "graph" in e.text]  # captured
    assert isinstance(graphed[-1], ev.Finished) and isinstance(eager[-1], ev.Finished)
    a, b = np.array(_step_losses(graphed)), np.array(_step_losses(eager))
    assert len(a) == len(b) >= 10 and np.isfinite(a).all()
    # bf16 sums in another order drift apart slowly; different draws would differ at once
    assert np.abs(a - b).max() < 0.05 * b.max(), (a, b)
    assert a[-3:].mean() < a[:3].mean()  # it learns


def test_a_graph_run_resumes_and_its_checkpoint_loads_anywhere(data, tmp_path):
    from trainer.checkpoint import load_checkpoint
    from trainer.control import TrainControl

    cfg = preset("gpu").replace(epochs=2, batch_size=32, log_every=1, device="cuda")
    control = TrainControl()
    for e in fit(data, cfg, tmp_path / "a", control=control):
        if isinstance(e, ev.Step) and e.step == 6:  # after the capture, mid-epoch
            control.request_stop()
    last = tmp_path / "a/checkpoints/last.pt"
    groups = load_checkpoint(last)["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in groups)
    resumed = list(fit(data, cfg, tmp_path / "b", resume=last))
    assert isinstance(resumed[-1], ev.Finished), resumed[-1]
    assert np.isfinite(_step_losses(resumed)).all()
    on_cpu = list(fit(data, cfg.replace(device="cpu", epochs=2), tmp_path / "c", resume=last))
    assert isinstance(on_cpu[-1], ev.Finished), on_cpu[-1]


def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_so(data, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused for the test")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    cfg = preset("gpu").replace(epochs=1, batch_size=32, log_every=1, device="cuda")
    events = list(fit(data, cfg, tmp_path))
    notices = [e.text for e in events if isinstance(e, ev.Progress) and "CUDA graph" in e.text]
    assert len(notices) == 1 and "capture refused" in notices[0], notices
    assert isinstance(events[-1], ev.Finished) and math.isfinite(_step_losses(events)[-1])


def test_same_weights_predict_the_same_classes_on_cuda_and_cpu(data, tmp_path):
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.inference import predict_arrays

    cfg = preset("gpu").replace(epochs=1, batch_size=32, device="cuda")
    list(fit(data, cfg, tmp_path))
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoints/last.pt"))
    on_gpu = predict_arrays(model, data.images[:64], device="cuda")["masks"]
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoints/last.pt"))
    on_cpu = predict_arrays(model, data.images[:64], device="cpu")["masks"]
    assert np.mean(on_gpu == on_cpu) >= 0.99


def test_the_audit_predicts_on_the_gpu_as_on_the_cpu(data, tmp_path):
    """Its models train on the GPU (``auto``), and predict there too."""
    from trainer.inference import predict_arrays
    from trainer.model import build_model
    from trainer.out_of_fold import audit_device, audit_predict

    assert audit_device().type == "cuda"
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    on_gpu = audit_predict(model, data.images[:64])
    on_cpu = predict_arrays(model, data.images[:64], 64, "cpu", with_probs=True, flip_tta=True)
    assert on_gpu["probs"].shape == on_cpu["probs"].shape
    # an untrained model's classes are near ties: its probabilities are compared (bf16 on both)
    assert np.abs(on_gpu["probs"].astype(np.float32) - on_cpu["probs"]).mean() < 0.01


def test_a_training_child_gives_its_gpu_memory_back(tmp_path):
    """The child process ends and the GPU's used memory returns to what it was."""
    code = (
        "import torch; from trainer.config import preset; from trainer.engine import fit; "
        "from trainer.synth import generate; "
        "list(fit(generate(64, 0, seed=0).dataset, preset('gpu').replace(epochs=1, batch_size=32, device='cuda')))"
    )

    def used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    torch.cuda.init()
    before = used()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert used() - before < 64 * 2**20  # within 64 MiB of where it started


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_torchrun_trains_on_two_gpus_with_nccl(tmp_path):
    """Two ranks under torchrun, one GPU each, NCCL between them: one run directory, both
    ranks counted, every validation finite."""
    import json

    from trainer.formats import write_npz

    d = generate(512, 0, seed=2).dataset
    write_npz(tmp_path / "d.npz", d.images, d.masks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "trainer", "train", str(tmp_path / "d.npz"), "--run-dir", str(tmp_path / "run")]
    cmd += ["--preset", "gpu", "--epochs", "2", "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(x) for x in (tmp_path / "run/events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2 and events[-1]["kind"] == "finished"
    assert all(math.isfinite(e["miou"]) for e in events if e["kind"] == "validation")
