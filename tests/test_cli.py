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


def test_stats_count_the_saved_corrections_as_napari_does(tmp_path, capsys, monkeypatch):
    """A corrected mask counts as corrected, an unlabelled image labelled since as a
    labelled one, an excluded image still counts (it is in the dataset); the same from a
    zarr read from disk (corrections carried by convert). --no-corrections: the file."""
    from trainer import formats
    from trainer.corrections import CorrectionStore

    masks = hand_masks()  # 3 masks of 2x3; pixels by class [2, 10, 4, 0, 2]
    path = tmp_path / "hand.npz"
    write_npz(path, np.zeros_like(masks), masks, np.zeros((2, *masks.shape[1:]), np.uint8))
    store = CorrectionStore.for_dataset(read_npz(path))
    store.save_mask(1, np.full(masks.shape[1:], 3, np.uint8))  # 6 pixels of Sand, not Soil
    store.save_mask(3 + 1, np.full(masks.shape[1:], 4, np.uint8))  # unlabelled image 1: Big Rock
    store.exclude(0)
    store.close()
    want = np.array([2, 10 - 6, 4, 6, 2 + 6])
    code, text, err = run(["stats", path, "--json"], capsys)
    js = json.loads(text)
    assert code == 0 and js["images"] == 4 and js["unlabelled_images"] == 1
    assert [c["pixels"] for c in js["classes"]] == want.tolist()
    assert "1 corrected, 1 labelled since, 1 excluded (counted)" in err
    plain = json.loads(run(["stats", path, "--json", "--no-corrections"], capsys)[1])
    assert plain["images"] == 3 and [c["pixels"] for c in plain["classes"]] == [2, 10, 4, 0, 2]
    assert run(["convert", path, "--out", tmp_path / "d.zarr"], capsys)[0] == 0
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 10)  # read from disk, from its class table
    disk = json.loads(run(["stats", tmp_path / "d.zarr", "--json"], capsys)[1])
    assert disk["images"] == 4 and disk["unlabelled_images"] == 1
    assert disk["classes"] == js["classes"]


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
