"""What a bad day does to the real CLI: every writer killed with SIGKILL just before its
output would take its final name, a full disk, a read-only location, an output that is
or holds an input, an output that exists. Each case: exit 2, one line naming the file,
no traceback, and the bytes of every input unchanged."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.checkpoint import save_checkpoint
from trainer.cli import main
from trainer.config import preset
from trainer.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    """A hash of a file, or of every file under a folder (names and bytes)."""
    h = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in paths:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def work(tmp_path, npz_path):
    """A dataset (npz), a folder of image/mask pairs, a checkpoint, in one folder."""
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 128), dtype=np.uint8)).save(folder / "images" / f"f{i}.png")
        Image.fromarray(rng.integers(0, 5, (64, 128), dtype=np.uint8)).save(folder / "masks" / f"f{i}.png")
    ckpt = save_checkpoint(tmp_path / "ck.pt", model=build_model(preset("tiny")), config=preset("tiny"))
    return {"npz": npz_path, "folder": folder, "ckpt": ckpt, "tmp": tmp_path}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(argv, capsys, named, *fragments):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert str(named) in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# -- an output that is, holds or lies inside an input: refused, with or without --overwrite


def _input_cases(w):
    npz, folder, ck, tmp = w["npz"], w["folder"], w["ckpt"], w["tmp"]
    image = folder / "images" / "f0.png"
    return [
        (["predict", folder / "images", "--checkpoint", ck, "--out", folder / "images"], folder / "images"),
        (["predict", image, "--checkpoint", ck, "--out", folder / "images"], folder / "images"),
        (["predict", image, "--checkpoint", ck, "--out", tmp], tmp),
        (["predict", npz, "--checkpoint", ck, "--out", npz], npz),
        (
            ["predict", npz, "--checkpoint", ck, "--out", tmp / "mars_for_students.marsviewer" / "p.npz"],
            "p.npz",
        ),
        (["submit", npz, "--checkpoint", ck, "--out", npz], npz),
        (["export", npz, "--out", npz], npz),
        (["export-model", "--checkpoint", ck, "--out", ck], ck),
        (["convert", folder, "--out", folder / "inside.zarr"], "inside.zarr"),
        (["audit", npz, "--checkpoint", ck, "--out", ck], ck),
        (["suggest", npz, "--checkpoint", ck, "--out", npz], npz),
        (["train", folder, "--run-dir", folder / "run", "--preset", "tiny", "--epochs", "1"], folder / "run"),
    ]


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_or_holds_an_input_is_refused(work, capsys, overwrite):
    before = {k: digest(work[k]) for k in ("npz", "folder", "ckpt")}
    for argv, named in _input_cases(work):
        argv = argv + (["--overwrite"] if overwrite and argv[0] != "train" else [])
        err = refused(argv, capsys, named)
        assert "an input of this command" in err, (argv, err)
    assert {k: digest(work[k]) for k in ("npz", "folder", "ckpt")} == before
    assert not list(work["tmp"].rglob("*.partial"))


# -- an existing output is replaced only with --overwrite


def _existing_cases(w):
    npz, folder, ck, tmp = w["npz"], w["folder"], w["ckpt"], w["tmp"]
    return [
        (["predict", npz, "--checkpoint", ck, "--out", tmp / "p.npz"], tmp / "p.npz"),
        (
            ["predict", folder / "images", "--checkpoint", ck, "--out", tmp / "masks"],
            tmp / "masks" / "f2.png",
        ),
        (["submit", npz, "--checkpoint", ck, "--out", tmp / "s.csv"], tmp / "s.csv"),
        (["export", npz, "--out", tmp / "other.npz"], tmp / "other.npz"),
        (["export", npz, "--out", tmp / "x.zarr"], tmp / "x.zarr.changelog.json"),
        (["export-model", "--checkpoint", ck, "--out", tmp / "m.pt"], tmp / "m.pt"),
        (["synth", tmp / "syn.npz", "--train", 12], tmp / "syn.truth.json"),
        (["convert", folder, "--out", tmp / "c.zarr"], tmp / "c.zarr"),
        (["audit", npz, "--checkpoint", ck, "--out", tmp / "a.json"], tmp / "a.json"),
        (["suggest", npz, "--checkpoint", ck, "--out", tmp / "g.json"], tmp / "g.json"),
    ]


def test_an_existing_output_is_kept_without_overwrite(work, capsys):
    for argv, existing in _existing_cases(work):
        if existing.suffix == ".zarr":
            existing.mkdir()
            (existing / "mine.txt").write_text("a person's file")
        else:
            existing.parent.mkdir(exist_ok=True)
            existing.write_bytes(b"a person's file")
        before = digest(existing)
        refused(argv, capsys, existing, "already exists", "--overwrite")
        assert digest(existing) == before
    # with --overwrite, the same commands write (the folder's other files stay)
    for argv, existing in _existing_cases(work):
        if argv[0] in ("audit", "convert"):
            continue  # slow or covered in test_zarr; the rule is the same module
        code, _, err = run(argv + ["--overwrite"], capsys)
        assert code == 0, (argv, err)
        assert digest(existing) != hashlib.sha256(b"a person's file").hexdigest()


def test_exports_to_npz_and_zarr_of_one_name_keep_their_own_changelogs(work, capsys):
    npz, tmp = work["npz"], work["tmp"]
    assert run(["export", npz, "--out", tmp / "x.zarr"], capsys)[0] == 0
    zarr_log = digest(tmp / "x.zarr.changelog.json")
    assert run(["export", npz, "--out", tmp / "x.npz"], capsys)[0] == 0
    assert digest(tmp / "x.zarr.changelog.json") == zarr_log
    assert (tmp / "x.npz.changelog.json").is_file()


def test_two_inputs_that_would_write_one_mask_are_refused(work, capsys):
    folder, tmp = work["folder"], work["tmp"]
    Image.open(folder / "images" / "f0.png").save(folder / "images" / "f0.jpg")
    refused(
        ["predict", folder / "images", "--checkpoint", work["ckpt"], "--out", tmp / "o"],
        capsys,
        "f0.png",
        "two inputs",
    )
    assert not (tmp / "o").exists() or not list((tmp / "o").iterdir())


# -- SIGKILL just before the rename: nothing under the final name


KILL_AT_RENAME = """
import os, signal, sys
import trainer.outputs as outputs

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

outputs.replace_into = die
os.replace = die
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_writer_killed_before_its_rename_leaves_nothing_under_the_final_name(work):
    npz, folder, ck, tmp = work["npz"], work["folder"], work["ckpt"], work["tmp"]
    cases = [
        (["predict", npz, "--checkpoint", ck, "--out", tmp / "p.npz"], tmp / "p.npz"),
        (["predict", folder / "images", "--checkpoint", ck, "--out", tmp / "pm"], tmp / "pm"),
        (["submit", npz, "--checkpoint", ck, "--out", tmp / "s.csv"], tmp / "s.csv"),
        (["export", npz, "--out", tmp / "e.npz"], tmp / "e.npz"),
        (["export", npz, "--out", tmp / "e.zarr"], tmp / "e.zarr"),
        (["export-model", "--checkpoint", ck, "--out", tmp / "m.pt"], tmp / "m.pt"),
        (["convert", folder, "--out", tmp / "c.zarr"], tmp / "c.zarr"),
        (["synth", tmp / "syn.npz", "--train", 12], tmp / "syn.npz"),
    ]
    before = {k: digest(work[k]) for k in ("npz", "folder", "ckpt")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", KILL_AT_RENAME, *map(str, argv)],
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for argv, _ in cases
    ]
    for (argv, out), proc in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, (argv, err.decode())
        partial = Path(str(out) + ".partial")
        if out.name == "pm":  # a folder of masks: each mask is moved in whole, or not at all
            assert not [p for p in out.rglob("*") if p.is_file()], argv
            assert len(list(partial.rglob("*.png"))) == 4
        else:
            assert not out.exists(), argv
            assert partial.exists(), argv  # killed with the output complete
    assert {k: digest(work[k]) for k in ("npz", "folder", "ckpt")} == before


# -- full disk, read-only location (a small tmpfs, where this machine lets a test mount one)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _writer_cases(w, where: Path):
    npz, folder, ck = w["npz"], w["folder"], w["ckpt"]
    return [
        (["export", npz, "--out", where / "e.npz"], where / "e.npz"),
        (["export", npz, "--out", where / "e.zarr"], where / "e.zarr"),
        (["submit", npz, "--checkpoint", ck, "--out", where / "s.csv"], where / "s.csv"),
        (["export-model", "--checkpoint", ck, "--out", where / "m.pt"], where / "m.pt"),
        (["convert", folder, "--out", where / "c.zarr"], where / "c.zarr"),
        (["synth", where / "syn.npz", "--train", 40], where / "syn.npz"),
    ]


def test_a_full_disk_is_said_and_leaves_nothing(work, capsys, small_disk):
    for argv, out in _writer_cases(work, small_disk):
        refused(argv, capsys, out, "disk is full")
        assert not list(small_disk.iterdir()), argv


def test_a_read_only_location_is_said_before_any_work(work, capsys, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for argv, out in [*_writer_cases(work, small_disk)]:
        refused(argv, capsys, out, "read-only")


# -- a damaged converted dataset: an error naming the frame and the file, never zeros


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A zarr dataset of 300 small frames (three chunk files of 128) and a checkpoint."""
    from trainer.convert import convert
    from trainer.formats import write_npz
    from trainer.synth import generate

    tmp = tmp_path_factory.mktemp("converted")
    ds = generate(300, 20, seed=1, plant_problems=False).dataset
    write_npz(tmp / "s.npz", ds.images, ds.masks, ds.test_images, dtype="uint8")
    convert(tmp / "s.npz", tmp / "L.zarr")
    ckpt = save_checkpoint(tmp / "ck.pt", model=build_model(preset("tiny")), config=preset("tiny"))
    return tmp / "L.zarr", ckpt


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "bit flipped":  # one bit: zstd alone decodes this one silently wrong
        data = bytearray(path.read_bytes())
        data[len(data) * 3 // 4] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(
            np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes()
        )


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage", "bit flipped"])
def test_a_damaged_chunk_is_an_error_for_every_command(converted, tmp_path, capsys, how):
    import shutil

    src, ck = converted
    data = tmp_path / "L.zarr"
    shutil.copytree(src, data)
    chunk = data / "images" / "c" / "1" / "0" / "0"  # frames 128-255
    _damage(chunk, how)
    before = digest(data)
    why = "is missing" if how == "deleted" else "is damaged"
    for argv in (
        ["train", data, "--run-dir", tmp_path / "run", "--preset", "tiny", "--epochs", "1"],
        ["predict", data, "--checkpoint", ck, "--out", tmp_path / "p.npz", "--split", "all"],
        ["evaluate", data, "--checkpoint", ck],
        ["export", data, "--out", tmp_path / "e.zarr"],
        ["export", data, "--out", tmp_path / "e.npz"],
    ):
        err = refused(argv, capsys, chunk, "frame 128 (128)", why, "convert the dataset again")
        assert "Traceback" not in err
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "e.npz").exists()
    assert not (tmp_path / "p.npz").exists()
    assert digest(data) == before


def test_a_frame_read_from_a_damaged_chunk_is_never_zeros(converted, tmp_path):
    import shutil

    from trainer.dataset import DatasetError
    from trainer.formats import open_zarr

    src, _ = converted
    data = tmp_path / "L.zarr"
    shutil.copytree(src, data)
    (data / "masks" / "c" / "2" / "0" / "0").unlink()  # masks of frames 256-299
    stored = open_zarr(data)
    assert stored.mask(255).any()  # the chunk before is whole
    for read in (lambda: stored.mask(256), lambda: stored.masks[260, :8, :8], lambda: stored.masks[250:270]):
        with pytest.raises(DatasetError, match=r"frame (256|260) \((256|260)\).*masks/c/2/0/0 is missing"):
            read()
    with pytest.raises(DatasetError, match="masks/c/2/0/0 is missing"):
        stored.to_memory()
    assert stored.image(299).any()  # images are another array, whole


def test_large_frames_a_shard_each_missing_or_truncated(tmp_path, capsys):
    """Frames larger than 256x256 are a shard (file) each; an older dataset (written
    before every chunk was stored) may lack the shard of a mask with no labelled pixel,
    and that mask reads as unlabelled; in a dataset written now a missing shard is an error."""
    import json

    from trainer.dataset import DatasetError
    from trainer.formats import open_zarr

    folder = tmp_path / "big"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (300, 320), dtype=np.uint8)).save(
            folder / "images" / f"f{i}.png"
        )
        mask = np.zeros((300, 320), np.uint8) if i == 1 else rng.integers(1, 5, (300, 320), dtype=np.uint8)
        Image.fromarray(mask).save(folder / "masks" / f"f{i}.png")
    assert main(["convert", str(folder), "--out", str(tmp_path / "B.zarr")]) == 0
    data = tmp_path / "B.zarr"
    (data / "masks" / "c" / "1" / "0" / "0").unlink()  # the all-unlabelled mask's shard
    with pytest.raises(DatasetError, match=r"frame 1 \(images/f1\).*B.zarr/masks/c/1/0/0 is missing"):
        open_zarr(data).mask(1)
    meta = json.loads((data / "zarr.json").read_text())
    del meta["attributes"]["every_chunk_written"]  # as an older version wrote it
    (data / "zarr.json").write_text(json.dumps(meta))
    assert not open_zarr(data).mask(1).any()  # zarr left such shards out then
    (data / "masks" / "c" / "0" / "0" / "0").unlink()  # but a labelled mask's shard: damage
    with pytest.raises(DatasetError, match=r"frame 0 \(images/f0\).*masks/c/0/0/0 is missing"):
        open_zarr(data).mask(0)
    _damage(data / "masks" / "c" / "2" / "0" / "0", "truncated")
    with pytest.raises(DatasetError, match=r"frame 2 \(images/f2\).*masks/c/2/0/0 is damaged"):
        open_zarr(data).mask(2)
    (data / "images" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(DatasetError, match=r"frame 0 \(images/f0\).*images/c/0/0/0 is missing"):
        open_zarr(data).image(0)


def test_a_checkpoint_with_a_nan_weight_is_refused(work, capsys, tmp_path):
    import torch

    model = build_model(preset("tiny"))
    with torch.no_grad():
        next(iter(model.parameters()))[0].fill_(float("nan"))
    bad = save_checkpoint(tmp_path / "nan.pt", model=model, config=preset("tiny"))
    refused(
        ["evaluate", work["npz"], "--checkpoint", bad], capsys, bad, "NaN or infinite", "earlier checkpoint"
    )


# -- masks as label tools save them, read to the exact classes


def _pair(folder: Path, name: str, image: Image.Image, mask: Image.Image, **save) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    image.save(folder / "images" / f"{name}.png")
    mask.save(folder / "masks" / f"{name}{save.pop('suffix', '.png')}", **save)


def _classes(h=6, w=8) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 5).astype(np.uint8)


def test_palette_masks_are_read_as_their_indices(tmp_path):
    from trainer.formats import read_folder

    want = _classes()
    voc = Image.fromarray(want, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * 750)
    same = Image.fromarray(want, mode="P")
    same.putpalette([0, 0, 0] * 256)  # every class drawn black: colours cannot tell them apart
    _pair(tmp_path, "voc", Image.fromarray(want * 50), voc)
    _pair(tmp_path, "same", Image.fromarray(want * 50), same)
    ds = read_folder(tmp_path)
    for name in ("voc", "same"):
        np.testing.assert_array_equal(ds.masks[ds.names.index(f"images/{name}")], want)


def test_palette_masks_with_a_colour_mapping_are_read_by_colour(tmp_path):
    from trainer.formats import read_folder

    want = _classes()
    voc = Image.fromarray(want, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * 750)
    _pair(tmp_path, "voc", Image.fromarray(want * 50), voc)
    ds = read_folder(tmp_path, "#000000:0,#800000:4,#008000:3,#808000:2,#000080:1")
    np.testing.assert_array_equal(ds.masks[0], np.array([0, 4, 3, 2, 1])[want])


def test_transparent_mask_pixels_are_not_labelled(tmp_path):
    from trainer.formats import read_folder

    want = _classes()
    rgba = np.zeros((*want.shape, 4), np.uint8)
    rgba[..., :3] = want[..., None] * 40
    rgba[..., 3] = 255
    rgba[:2, :, 3] = 0  # the top rows: not labelled, whatever colour lies under them
    _pair(tmp_path, "a", Image.fromarray(want * 50), Image.fromarray(rgba, mode="RGBA"))
    ds = read_folder(tmp_path, "#000000:1,#282828:2,#505050:3,#787878:4,#a0a0a0:4")
    expected = np.array([1, 2, 3, 4, 4])[want]
    expected[:2] = 0
    np.testing.assert_array_equal(ds.masks[0], expected)


def test_exif_rotated_jpeg_images_are_turned_upright_as_their_masks_are(tmp_path, capsys):
    from trainer.formats import read_folder
    from trainer.images import read_image

    out = tmp_path / "p.zarr"
    tmp_path = tmp_path / "photos"

    upright = np.zeros((40, 64), np.uint8)
    upright[:10, :] = 255  # bright sky at the top, as a viewer shows the photo
    stored = np.rot90(upright, 1)  # a camera held sideways stores it turned (64x40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    Image.fromarray(stored).save(tmp_path / "images" / "p.jpg", exif=exif, quality=100)
    mask = np.where(upright > 0, 1, 2).astype(np.uint8)  # drawn on the upright view
    Image.fromarray(mask).save(tmp_path / "masks" / "p.png")
    image = read_image(tmp_path / "images" / "p.jpg")
    assert image.shape == (40, 64) and image[:10].mean() > 200 and image[12:].mean() < 50
    ds = read_folder(tmp_path)
    assert ds.images.shape == (1, 40, 64)
    np.testing.assert_array_equal(ds.masks[0], mask)
    # convert reads the size from the header the same way
    assert main(["convert", str(tmp_path), "--out", str(out)]) == 0
    from trainer.formats import open_zarr

    np.testing.assert_array_equal(open_zarr(out).image(0), image)
    np.testing.assert_array_equal(open_zarr(out).mask(0), mask)


def test_jpeg_masks_are_warned_of_and_their_stray_values_counted(tmp_path):
    from trainer.formats import read_folder
    from trainer.formats.folder import LossyMaskWarning

    want = np.zeros((32, 32), np.uint8)
    want[:, 16:] = 4
    want[8:24, 4:12] = 2
    want[::3, ::5] = 4
    _pair(tmp_path, "j", Image.fromarray(want * 60), Image.fromarray(want), suffix=".jpg", quality=10)
    raw = np.asarray(Image.open(tmp_path / "masks" / "j.jpg"))
    stray = int((raw > 4).sum())
    assert stray > 0  # JPEG made values that are no class
    with pytest.warns(LossyMaskWarning, match=rf"j.jpg: a JPEG mask.* {stray} pixels were not a class value"):
        ds = read_folder(tmp_path)
    assert (ds.masks[0][raw > 4] == 0).all()  # left unlabelled, not a guessed class


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("0:1,0:2", "value 0 is given twice"),
        ("#ff0000:1,#FF0000:2", "#FF0000 is given twice"),
    ],
)
def test_a_mapping_that_lists_a_value_twice_is_refused(spec, fragment):
    from trainer.dataset import DatasetError
    from trainer.mask_mapping import MaskMapping

    with pytest.raises(DatasetError, match=fragment):
        MaskMapping.parse(spec)
    assert MaskMapping.parse("0:1,0:1").lut[0] == 1  # said twice alike: one meaning


def test_negative_mask_values_are_named(tmp_path):
    from trainer.dataset import DatasetError
    from trainer.mask_mapping import MaskMapping

    with pytest.raises(
        DatasetError, match=r"m.png: mask holds negative values \(down to -1\); expected 0..4"
    ):
        MaskMapping.parse("identity").apply(np.array([[0, -1]], np.int32), "m.png")


def test_a_header_of_too_many_pixels_is_refused_by_name_and_can_be_allowed(tmp_path, monkeypatch, capsys):
    import struct
    import zlib

    from trainer.dataset import DatasetError
    from trainer.images import read_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a PNG whose header declares 20000x20000 pixels and that holds almost nothing
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )
    with pytest.raises(
        DatasetError, match=r"bomb.png: its header declares 20000x20000 pixels.*MARSVIEWER_MAX_PIXELS"
    ):
        read_image(bomb)
    (tmp_path / "data").mkdir()
    bomb.rename(tmp_path / "data" / "bomb.png")
    refused(["stats", tmp_path / "data"], capsys, "bomb.png", "20000x20000", "MARSVIEWER_MAX_PIXELS")
    monkeypatch.setenv("MARSVIEWER_MAX_PIXELS", "1000")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(small)
    with pytest.raises(DatasetError, match=r"40x40 pixels \(1,600\), more than the 1,000 allowed"):
        read_image(small)
    monkeypatch.setenv("MARSVIEWER_MAX_PIXELS", "0")
    assert read_image(small).shape == (40, 40)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path, capsys, kind):
    from trainer.dataset import DatasetError
    from trainer.images import read_image

    if kind == "device":
        path = Path("/dev/zero")
    else:
        path = tmp_path / "pipe.png"
        os.mkfifo(path)
    with pytest.raises(DatasetError, match="not a regular file"):
        read_image(path)
    code, _, err = run(["stats", path], capsys)
    assert code == 2 and "Traceback" not in err and str(path) in err


# -- messages that say what is wrong and the way out


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "{npz}", "--run-dir", "{tmp}/r", "--minutes", "nan"], ["minutes", "finite"]),
        (["train", "{npz}", "--run-dir", "{tmp}/r", "--epochs", "1", "--loss", "ce:nan"], ["loss", "finite"]),
        (["convert", "{folder}", "--out", "{tmp}/w.zarr", "--workers", "-3"], ["--workers", "at least 1"]),
        (["stats", "{npz}", "--mask-mapping", "0:1,1:2"], ["--mask-mapping", "folders"]),
        (["stats", "{npz}", "--size", "32x32"], ["--size", "folders"]),
        (["stats", "{folder}", "--mask-mapping", "0:1,0:2"], ["value 0 is given twice"]),
        (["stats", "{folder}", "--size", "100000x100000"], ["GB of memory available", "--size"]),
        (
            ["suggest", "{npz}", "--checkpoint", "{ckpt}", "--diversity", "nan"],
            ["--diversity", "between 0 and 1"],
        ),
        (
            ["suggest", "{npz}", "--checkpoint", "{ckpt}", "--diversity", "-5"],
            ["--diversity", "between 0 and 1"],
        ),
        (
            ["export-model", "--checkpoint", "/dev/zero", "--out", "{tmp}/m.pt"],
            ["/dev/zero", "not a regular file"],
        ),
    ],
)
def test_bad_values_are_named(work, capsys, argv, fragments):
    argv = [str(a).format(**{k: str(v) for k, v in work.items()}) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_stopped_conversion_is_named_before_no_such_dataset(work, capsys):
    (work["tmp"] / "L.zarr.partial").mkdir()
    refused(["stats", work["tmp"] / "L.zarr"], capsys, "L.zarr", "did not finish", "run convert again")


def test_a_fractional_npz_value_is_said_as_a_number(tmp_path, capsys):
    arr = np.zeros((2, 2, 4, 4))
    arr[1, 0, 2, 2] = 1.5
    np.savez(tmp_path / "f.npz", training_set=arr)
    err = refused(["stats", tmp_path / "f.npz"], capsys, "f.npz", "the value 1.5,")
    assert "np." not in err


@pytest.mark.parametrize("damage", [b"", b"garbage " * 100, b"SQLite format 3\0" + b"\x07" * 200])
def test_a_damaged_corrections_store_says_the_way_out(work, capsys, damage):
    from trainer.corrections import CorrectionStore
    from trainer.formats import read_npz

    folder = work["tmp"] / "mars_for_students.marsviewer"
    folder.mkdir()
    store = folder / "corrections.sqlite"
    store.write_bytes(damage)
    if not damage:  # an empty file: a new store, and said so
        with pytest.warns(UserWarning, match="was an empty file"):
            CorrectionStore.for_dataset(read_npz(work["npz"])).close()
        return
    err = refused(["stats", work["npz"]], capsys, store, "move the folder", "--no-corrections")
    assert "Traceback" not in err
    assert store.read_bytes() == damage
    assert run(["stats", work["npz"], "--no-corrections"], capsys)[0] == 0


def test_a_corrections_folder_that_is_not_a_folder_is_refused_not_replaced(work, capsys):
    beside = work["tmp"] / "mars_for_students.marsviewer"
    beside.write_text("not a folder")
    refused(["stats", work["npz"]], capsys, beside, "is not a folder", "move it aside")
    assert beside.read_text() == "not a folder"


def test_corrections_of_images_whose_names_are_not_utf8_are_saved_and_found_again(tmp_path):
    from trainer.corrections import CorrectionStore
    from trainer.formats import read_folder

    name = os.fsdecode(b"caf\xe9")  # a Latin-1 name on a UTF-8 system
    folder = tmp_path / "d"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for stem in (name, "plain"):
        Image.fromarray(np.full((4, 6), 9, np.uint8)).save(folder / "images" / f"{stem}.png")
        Image.fromarray(np.ones((4, 6), np.uint8)).save(folder / "masks" / f"{stem}.png")
    ds = read_folder(folder)
    row = ds.names.index(f"images/{name}")
    store = CorrectionStore.for_dataset(ds)
    store.save_mask(row, np.full((4, 6), 3, np.uint8))
    store.close()
    again = CorrectionStore.for_dataset(read_folder(folder))
    edited, _ = again.snapshot()
    assert list(edited) == [row] and (edited[row] == 3).all()
    assert again.orphans() == []
    again.close()


def test_napari_shows_a_damaged_frame_as_a_notification_once_and_stays_usable(converted, tmp_path):
    import shutil

    from marsviewer._layers import ShownFrames
    from trainer.formats import open_zarr

    src, _ = converted
    data = tmp_path / "L.zarr"
    shutil.copytree(src, data)
    (data / "images" / "c" / "1" / "0" / "0").unlink()
    stored = open_zarr(data)
    said = []
    shown = ShownFrames(stored.images, notify=said.append)
    assert shown.shape == stored.images.shape and len(shown) == 320
    np.testing.assert_array_equal(shown[5], stored.image(5))
    for _ in range(3):
        frame = shown[130]
        assert frame.shape == (64, 128) and not frame.any()
    assert shown[130:132, :4].shape == (2, 4, 128)
    assert len(said) == 1 and "frame 130 (130)" in said[0] and "images/c/1/0/0 is missing" in said[0]


def test_training_into_a_full_disk_stops_with_the_reason(work, capsys, small_disk):
    code, _, err = run(
        ["train", work["npz"], "--run-dir", small_disk / "run", "--preset", "tiny", "--epochs", "1"], capsys
    )
    assert code in (1, 2) and "Traceback" not in err, err
    assert "disk is full" in err and str(small_disk / "run") in err, err
    assert not list(small_disk.rglob("*.tmp")) and not list(small_disk.rglob("*.partial"))


def test_a_dataset_given_to_predict_into_a_folder_is_named(work, capsys):
    refused(["predict", work["npz"], "--checkpoint", work["ckpt"], "--out", work["tmp"] / "o"], capsys,
            work["npz"], "not an image file", "--out NAME.npz")  # fmt: skip


def test_a_masks_folder_that_cannot_be_listed_is_an_error_not_unlabelled_images(work, capsys, monkeypatch):
    """(As root every folder can be listed: the refusal is what a person without the
    permission gets.)"""
    folder = work["folder"]
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "masks":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    refused(["stats", folder], capsys, folder / "masks", "cannot be read", "permissions")
    refused(["train", folder, "--run-dir", work["tmp"] / "r", "--preset", "tiny"], capsys, folder / "masks")


@pytest.mark.parametrize("table", ["sizes", "class_pixels", "class_cells"])
def test_a_missing_table_chunk_is_damage_not_zeros(converted, tmp_path, table):
    import shutil

    from trainer.dataset import DatasetError
    from trainer.formats import open_zarr

    src, _ = converted
    data = tmp_path / "L.zarr"
    shutil.copytree(src, data)
    chunk = next((data / table / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    with pytest.raises(DatasetError, match=f"{table}/c/.* is missing"):
        open_zarr(data).class_cells()


def test_a_corrections_folder_without_permission_is_refused_not_replaced(work, capsys, monkeypatch):
    """(As root every folder can be read: the refusal is what a person without the
    permission gets; a new, empty store elsewhere would leave their corrections behind.)"""
    beside = work["tmp"] / "mars_for_students.marsviewer"
    beside.mkdir()
    (beside / "corrections.sqlite").write_bytes(b"")
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == beside else real(p, mode, **kw)
    )
    refused(["stats", work["npz"]], capsys, beside, "cannot be read (no permission)", "--no-corrections")
    refused(["train", work["npz"], "--run-dir", work["tmp"] / "r", "--preset", "tiny"], capsys, beside)


def test_a_corrections_database_named_but_missing_is_refused_not_skipped(work, capsys):
    missing = work["tmp"] / "nope.sqlite"
    for argv in (["export", work["npz"], "--out", work["tmp"] / "e.npz", "--corrections", missing],
                 ["audit", work["npz"], "--checkpoint", work["ckpt"], "--out", work["tmp"] / "a.json",
                  "--corrections", missing]):  # fmt: skip
        refused(argv, capsys, missing, "no such corrections database")
    assert not (work["tmp"] / "e.npz").exists() and not (work["tmp"] / "a.json").exists()


def test_an_npz_larger_than_the_memory_there_is_says_so_before_allocating(work, capsys, monkeypatch):
    import trainer.dataset

    monkeypatch.setattr(trainer.dataset, "_available_memory", lambda: 1000)
    refused(["stats", work["npz"]], capsys, work["npz"], "GB of memory available", "mars-trainer convert")
