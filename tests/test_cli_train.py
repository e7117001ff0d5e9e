"""train / evaluate / predict / submit from the command line, and their refusals."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trainer.cli import main
from trainer.formats import write_npz


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on a small synthetic file with a test_set."""
    from trainer.synth import generate

    root = tmp_path_factory.mktemp("cli")
    ds = generate(40, 6, seed=9).dataset
    data = root / "mars.npz"
    write_npz(data, ds.images, ds.masks, ds.test_images)
    code = main(
        [
            "train",
            str(data),
            "--run-dir",
            str(root / "run"),
            "--preset",
            "tiny",
            "--epochs",
            "2",
            "--lr",
            "0.004",
        ]
    )
    assert code == 0
    return data, root / "run", ds


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_run_and_flags_override_preset(trained):
    _, run_dir, _ = trained
    config = (run_dir / "config.toml").read_text()
    assert "epochs = 2" in config and "lr = 0.004" in config and "depth = 2" in config
    kinds = [json.loads(x)["kind"] for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert kinds.count("validation") == 2 and kinds[-1] == "finished"


def test_evaluate_json(trained, capsys):
    data, run_dir, _ = trained
    code, out, _ = run(["evaluate", data, "--checkpoint", run_dir / "checkpoints/best.pt", "--json"], capsys)
    assert code == 0
    js = json.loads(out)
    assert set(js) == {
        "iou", "miou", "miou_keras", "pixel_accuracy", "confusion", "images", "scored", "left_out", "absent"
    }  # fmt: skip
    assert js["scored"] == [c for c in (1, 2, 3, 4) if js["iou"][c] is not None]
    assert "not labelled" in js["left_out"]["0"] and js["absent"] == []
    assert js["images"] == len(json.loads((run_dir / "split.json").read_text())["val"])
    assert js["miou_keras"] <= js["miou"] + 1e-9  # Keras can only add class 0 to the average
    assert len(js["iou"]) == 5 and np.asarray(js["confusion"]).shape == (5, 5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert js["miou"] == pytest.approx(summary["best_miou"], abs=1e-6)
    code, out, _ = run(
        ["evaluate", data, "--checkpoint", run_dir / "checkpoints/best.pt", "--split", "all"], capsys
    )
    assert code == 0 and "all split: 40 images" in out and "Big Rock" in out


def test_predict_and_probs(trained, tmp_path, capsys):
    data, run_dir, ds = trained
    out = tmp_path / "pred.npz"
    code, _, _ = run(
        ["predict", data, "--checkpoint", run_dir / "checkpoints/last.pt", "--out", out, "--probs"], capsys
    )
    assert code == 0
    with np.load(out) as z:
        assert z["masks"].shape == (6, 64, 128) and z["masks"].dtype == np.uint8
        assert z["probs"].shape == (6, 5, 64, 128)
        # probs are float16: near-ties may round to equal values, so allow a few pixels
        assert (z["probs"].argmax(1) == z["masks"]).mean() > 0.999
        np.testing.assert_allclose(z["probs"].astype(np.float32).sum(1), 1.0, atol=5e-3)
    code, _, _ = run(
        ["predict", data, "--checkpoint", run_dir / "checkpoints/last.pt", "--split", "all", "--out", out],
        capsys,
    )
    assert code == 2  # the first prediction is not replaced unasked
    code, _, _ = run(
        ["predict", data, "--checkpoint", run_dir / "checkpoints/last.pt", "--split", "all", "--out", out]
        + ["--overwrite"],
        capsys,
    )
    assert code == 0
    with np.load(out) as z:
        assert z["masks"].shape == (40, 64, 128)


def test_submit_csv(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    out = tmp_path / "submission.csv"
    code, _, _ = run(["submit", data, "--checkpoint", run_dir / "checkpoints/best.pt", "--out", out], capsys)
    assert code == 0
    pred = tmp_path / "p.npz"
    run(["predict", data, "--checkpoint", run_dir / "checkpoints/best.pt", "--out", pred], capsys)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id"] + [str(i) for i in range(64 * 128)]
    assert len(rows) == 7 and [r[0] for r in rows[1:]] == [str(i) for i in range(6)]
    with np.load(pred) as z:
        np.testing.assert_array_equal(np.asarray(rows[3][1:], int), z["masks"][2].reshape(-1))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["evaluate", "{data}", "--checkpoint", "{data}"], "not a readable checkpoint"),
        (["evaluate", "{data}", "--checkpoint", "{tmp}/missing.pt"], "no such checkpoint"),
        (
            ["train", "{data}", "--run-dir", "{data}/sub", "--preset", "tiny"],
            "lies inside an input of this command",
        ),
        (
            ["train", "{data}", "--run-dir", "/dev/null/run", "--preset", "tiny"],
            "cannot write the run directory",
        ),
        (["train", "{data}", "--run-dir", "{tmp}/r", "--epochs", "1", "--minutes", "1"], "not both"),
        (["train", "{data}", "--run-dir", "{tmp}/r", "--config", "{tmp}/nope.toml"], "no such config file"),
        (["train", "{tmp}/no.npz", "--run-dir", "{tmp}/r"], "no such file"),
    ],
)
def test_bad_input_gets_a_message_and_exit_2(trained, tmp_path, capsys, argv, fragment):
    data, _, _ = trained
    argv = [a.format(data=data, tmp=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_unknown_config_key_in_toml(trained, tmp_path, capsys):
    data, _, _ = trained
    cfg = tmp_path / "c.toml"
    cfg.write_text("depth = 2\nlearning_rate = 0.1\n")
    code, _, err = run(["train", data, "--run-dir", tmp_path / "r", "--config", cfg], capsys)
    assert code == 2 and "unknown key(s) learning_rate" in err and "valid: depth" in err


def test_cuda_requested_without_gpu(trained, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    data, _, _ = trained
    code, _, err = run(["train", data, "--run-dir", tmp_path / "r", "--device", "cuda"], capsys)
    assert code == 2 and "no GPU" in err


def test_submit_needs_a_test_set(tmp_path, trained, capsys):
    _, run_dir, ds = trained
    no_test = tmp_path / "nt.npz"
    write_npz(no_test, ds.images, ds.masks)
    code, _, err = run(
        ["submit", no_test, "--checkpoint", run_dir / "checkpoints/best.pt", "--out", tmp_path / "s.csv"],
        capsys,
    )
    assert code == 2 and "has no test_set" in err


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "trainer",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)


def _why(proc) -> str:
    """What the ranks said before failing, without torchrun's own traceback."""
    said = [
        line
        for line in proc.stderr.splitlines()
        if any(k in line for k in ("what()", "terminate", "Error", "error:", "Exception"))
        and "torch/distributed" not in line
    ]
    return "\n".join(said[-20:]) + "\n---\n" + proc.stderr[-1500:]


def test_ddp_two_cpu_processes_evaluate_equal_and_train(trained, tmp_path, capsys):
    """Under torchrun with gloo: evaluation equals the single-process result for the same
    weights, and a 2-process training run writes one run directory and improves."""
    data, run_dir, _ = trained
    ckpt = run_dir / "checkpoints/best.pt"
    _, single, _ = run(
        ["evaluate", data, "--checkpoint", ckpt, "--split", "all", "--json", "--batch-size", "7"], capsys
    )
    proc = _torchrun(
        ["evaluate", data, "--checkpoint", ckpt, "--split", "all", "--json", "--batch-size", "7"], tmp_path
    )
    assert proc.returncode == 0, _why(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    assert json.loads(lines[0])["confusion"] == json.loads(single)["confusion"]

    from trainer.synth import generate

    bigger = generate(80, 0, seed=9).dataset
    write_npz(tmp_path / "m80.npz", bigger.images, bigger.masks)
    ddp_run = tmp_path / "ddp_run"
    proc = _torchrun(
        ["train", tmp_path / "m80.npz", "--run-dir", ddp_run, "--preset", "tiny", "--epochs", "6"], tmp_path
    )
    assert proc.returncode == 0, _why(proc)
    events = [json.loads(x) for x in (ddp_run / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2
    vals = [e for e in events if e["kind"] == "validation"]
    assert len(vals) == 6 and max(v["miou"] for v in vals[1:]) > vals[0]["miou"] + 0.05, [
        v["miou"] for v in vals
    ]
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_ctrl_c_stops_gracefully_and_saves(trained, tmp_path):
    import signal

    data, _, _ = trained
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer",
            "train",
            str(data),
            "--run-dir",
            str(run_dir),
            "--preset",
            "tiny",
            "--epochs",
            "500",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stderr.readline()  # "training on ..." is printed once the run has started
    assert first.startswith("training on"), first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped at epoch" in err and (run_dir / "checkpoints" / "last.pt").exists()


def test_evaluate_applies_the_corrections_as_training_validated(trained, tmp_path, capsys, monkeypatch):
    """Trained on a dataset with saved corrections, the best checkpoint's validation mIoU
    is what evaluate gives: corrected masks as the truth, excluded images left out, images
    labelled since among the training images. --no-corrections scores the file as it is."""
    import shutil

    from trainer import formats
    from trainer.corrections import CorrectionStore
    from trainer.formats import read_npz

    data, _, ds = trained
    copy = tmp_path / "mars.npz"  # its store is made beside it
    shutil.copy(data, copy)
    split = json.loads((trained[1] / "split.json").read_text())  # the same seed: the same split
    val = split["val"]
    store = CorrectionStore.for_dataset(read_npz(copy))
    store.exclude(val[0])
    store.save_mask(val[1], np.full(ds.image_shape, 2, np.uint8))
    store.save_mask(40 + 0, np.full(ds.image_shape, 1, np.uint8))  # unlabelled image 0, labelled
    store.close()
    run_dir = tmp_path / "run"
    assert run(["train", copy, "--run-dir", run_dir, "--preset", "tiny", "--epochs", "1"], capsys)[0] == 0
    assert json.loads((run_dir / "split.json").read_text())["val"] == val
    best = json.loads((run_dir / "summary.json").read_text())["best_miou"]
    ckpt = run_dir / "checkpoints" / "best.pt"
    code, out, err = run(["evaluate", copy, "--checkpoint", ckpt, "--json"], capsys)
    got = json.loads(out)
    assert code == 0 and got["images"] == len(val) - 1 and got["miou"] == pytest.approx(best, abs=1e-6)
    assert "1 corrected, 0 labelled since, 1 excluded of this split" in err
    code, out, _ = run(["evaluate", copy, "--checkpoint", ckpt, "--json", "--no-corrections"], capsys)
    plain = json.loads(out)
    assert plain["images"] == len(val) and plain["miou"] != pytest.approx(best, abs=1e-6)
    code, out, err = run(["evaluate", copy, "--checkpoint", ckpt, "--json", "--split", "all"], capsys)
    assert json.loads(out)["images"] == 40 - 1 + 1 and "1 labelled since" in err
    # Converted (the corrections carried along) and read from disk frame by frame: the same
    # (up to bf16 rounding: a frame a batch there).
    assert run(["convert", copy, "--out", tmp_path / "d.zarr"], capsys)[0] == 0
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    code, out, _ = run(["evaluate", tmp_path / "d.zarr", "--checkpoint", ckpt, "--json"], capsys)
    disk = json.loads(out)
    assert disk["images"] == len(val) - 1 and abs(disk["miou"] - best) < 0.005
    assert (
        np.abs(np.array(disk["confusion"]) - np.array(got["confusion"])).sum()
        < 1e-3 * got["images"] * 64 * 128
    )
