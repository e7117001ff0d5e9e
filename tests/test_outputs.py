"""trainer.outputs: the one module every writer goes through."""

from __future__ import annotations

import pytest

from trainer.outputs import OutputError, check_output, written, written_files


def test_an_error_inside_the_block_leaves_nothing_under_either_name(tmp_path):
    out = tmp_path / "o.bin"
    with pytest.raises(ValueError, match="half way"):
        with written(out) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("half way")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with written(out, folder=True) as tmp:
            (tmp / "a").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_complete_output_replaces_only_when_asked(tmp_path):
    out = tmp_path / "o.txt"
    out.write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        with written(out) as tmp:
            tmp.write_text("new")
    assert out.read_text() == "mine"
    with written(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["o.txt"]


def test_a_folder_output_replaces_the_old_folder_only_once_complete(tmp_path):
    out = tmp_path / "d.zarr"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with written(out, overwrite=True, folder=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError
    assert (out / "old").read_text() == "old"  # the failure kept the old one whole
    with written(out, overwrite=True, folder=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]


def test_inputs_are_refused_through_symlinks_and_hard_links(tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(b"data")
    (tmp_path / "link.npz").symlink_to(data)
    (tmp_path / "hard.npz").hardlink_to(data)
    for out in ("link.npz", "hard.npz"):
        with pytest.raises(OutputError, match="is an input"):
            check_output(tmp_path / out, [data], overwrite=True)
    with pytest.raises(OutputError, match="contains an input"):
        check_output(tmp_path, [data], overwrite=True)
    with pytest.raises(OutputError, match="lies inside an input"):
        check_output(tmp_path / "d.zarr" / "x", [tmp_path / "d.zarr"], overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "no" / "x.npz")
    assert data.read_bytes() == b"data"


def test_files_into_a_folder_keep_its_other_files(tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with written_files(out, ["a.png", "sub/b.png"]) as tmp:
        (tmp / "a.png").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.png").write_text("b")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "a.png").read_text() == "a" and (out / "sub" / "b.png").read_text() == "b"
    assert not (tmp_path / "masks.partial").exists()
    with pytest.raises(OutputError, match="a.png: already exists"):
        with written_files(out, ["a.png"]):
            pass
    with pytest.raises(OutputError, match="two inputs"):
        with written_files(out, ["c.png", "c.png"]):
            pass
    with pytest.raises(RuntimeError):
        with written_files(out, ["c.png"]) as tmp:
            (tmp / "c.png").write_text("c")
            raise RuntimeError
    assert not (out / "c.png").exists() and not (tmp_path / "masks.partial").exists()
