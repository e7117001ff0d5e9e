"""The command line as a person first meets it: short usage errors, help for every
option, a run directory by default, a synthetic file shaped like the competition's."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from trainer.cli import build_parser, main


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_option_of_every_command_says_what_it_does():
    missing = [
        f"{name} {opt.option_strings[0]}"
        for name, sub in _subparsers(build_parser()).items()
        for opt in sub._actions
        if opt.option_strings and opt.dest != "help" and not (opt.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    "argv, wrong",
    [
        (["train"], "the following arguments are required: dataset"),
        (["predict", "x.npz"], "the following arguments are required: --checkpoint, --out"),
        (["train", "x.npz", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_a_usage_error_is_a_short_usage_and_the_one_thing_wrong(capsys, argv, wrong):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("usage: mars-trainer") and lines[0].endswith("[options]")
    assert wrong in lines[1] and "--help" in lines[2]


def test_train_without_a_run_directory_makes_one_and_says_where(tmp_path, npz_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(npz_path), "--preset", "tiny", "--epochs", "1"])
    err = capsys.readouterr().err
    runs = list((tmp_path / "runs").iterdir())
    assert code == 0 and len(runs) == 1 and runs[0].name.startswith("mars_for_students-")
    assert err.splitlines()[0] == f"run directory: {runs[0].relative_to(tmp_path)}"
    assert (runs[0] / "checkpoints" / "best.pt").is_file()


def test_train_of_a_dataset_that_cannot_be_read_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(tmp_path / "missing.npz"), "--preset", "tiny"]) == 2
    assert not (tmp_path / "runs").exists()


def test_synth_makes_a_test_set_in_the_competitions_proportion(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s.npz"), "--train", "30", "--no-problems"]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["training_set"].shape[0] == 30 and z["test_set"].shape[0] == round(30 * 10022 / 2615)
    assert main(["synth", str(tmp_path / "t.npz"), "--train", "30", "--test", "0", "--no-problems"]) == 0
    with np.load(tmp_path / "t.npz") as z:
        assert "test_set" not in z


def test_a_default_run_directory_inside_the_dataset_is_refused_before_anything_is_made(
    tmp_path, capsys, monkeypatch
):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 9 * i, np.uint8)).save(tmp_path / "images" / f"f{i}.png")
        Image.fromarray(np.full((8, 8), 1 + i % 4, np.uint8)).save(tmp_path / "masks" / f"f{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main(["train", ".", "--preset", "tiny", "--epochs", "1"]) == 2
    assert "lies inside an input" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
