"""``mars-trainer synth`` and ``stats``: the formats scripts rely on, and messages for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import hand_masks
from trainer.cli import main
from trainer.formats import read_npz, write_npz


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_writes_competition_format_and_truth(tmp_path, capsys):
    out = tmp_path / "mars.npz"
    code, text, _ = run(["synth", out, "--train", 30, "--test", 5, "--seed", 4], capsys)
    assert code == 0 and "wrote" in text
    with np.load(out) as z:
        assert z["training_set"].shape == (30, 2, 64, 128) and z["training_set"].dtype == np.float64
        assert z["test_set"].shape == (5, 64, 128)
    truth = json.loads((tmp_path / "mars.truth.json").read_text())
    assert len(truth["outlier_group"]) >= 3 and len(truth["corrupted"]) >= 2
    ds = read_npz(out)
    group = truth["outlier_group"]
    assert all(np.array_equal(ds.masks[i], ds.masks[group[0]]) for i in group)


def test_stats_json_exact(tmp_path, capsys):
    masks = hand_masks()
    path = tmp_path / "hand.npz"
    write_npz(path, np.zeros_like(masks), masks)
    code, text, _ = run(["stats", path, "--json"], capsys)
    assert code == 0
    js = json.loads(text)
    assert js["images"] == 3
    assert [c["id"] for c in js["classes"]] == [0, 1, 2, 3, 4]
    assert [c["name"] for c in js["classes"]] == ["Background", "Soil", "Bedrock", "Sand", "Big Rock"]
    assert [c["pixels"] for c in js["classes"]] == [2, 10, 4, 0, 2]
    assert [c["images"] for c in js["classes"]] == [2, 3, 2, 0, 2]
    assert js["duplicate_mask_groups"] == [{"size": 2, "indices": [0, 2]}]


def test_stats_table(npz_path, capsys):
    code, text, _ = run(["stats", npz_path], capsys)
    assert code == 0
    assert "Big Rock" in text and "group(s) of images with identical masks" in text


def test_stats_on_folder(tmp_path, capsys):
    from tests.test_folder import make_pairs

    make_pairs(tmp_path)
    code, text, _ = run(["stats", tmp_path, "--json"], capsys)
    assert code == 0 and json.loads(text)["images"] == 3


@pytest.mark.parametrize(
    "content, fragment",
    [(b"plain text", "not an npz"), (None, "no such file")],
)
def test_bad_input_one_message_no_traceback(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.npz"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run(["stats", path], capsys)
    assert code == 2
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_empty_folder_message(tmp_path, capsys):
    code, _, err = run(["stats", tmp_path], capsys)
    assert code == 2 and "no images found" in err


def test_synth_refuses_bad_output(tmp_path, capsys):
    code, _, err = run(["synth", tmp_path / "x.txt", "--train", 10], capsys)
    assert code == 2 and "must end in .npz" in err


def test_module_entry_point_exit_code(tmp_path):
    """``python -m trainer`` is a real process: its exit code and stderr are what scripts see."""
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "stats", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(bad) in proc.stderr
