"""Unlabelled images from the command line: predict image files, rank the pool for
labelling (suggest), export the model, and their refusals."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.cli import main
from trainer.formats import write_npz
from trainer.inference import keep_confident, predict_arrays
from trainer.suggest import PoolScores, _doubt, _regions, describe, rank_pool, score_pool, typical_spacing


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on a small synthetic file with an unlabelled test_set of 12 images."""
    from trainer.synth import generate

    root = tmp_path_factory.mktemp("pool")
    ds = generate(40, 12, seed=5).dataset
    data = root / "mars.npz"
    write_npz(data, ds.images, ds.masks, ds.test_images)
    argv = ["train", str(data), "--run-dir", str(root / "run"), "--preset", "tiny", "--epochs", "2"]
    assert main(argv) == 0
    ckpt = root / "run" / "checkpoints" / "last.pt"
    model, _ = model_from_checkpoint(load_checkpoint(ckpt))
    return data, ckpt, ds, model.eval()


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def model_mask(model, image: np.ndarray) -> np.ndarray:
    return predict_arrays(model, image[None], 1, "cpu")["masks"][0]


# -- predict on image files ----------------------------------------------------------
def test_predict_image_files_any_size_gray_rgb_16bit(trained, tmp_path, capsys):
    _, ckpt, ds, model = trained
    src = tmp_path / "frames"
    (src / "sub").mkdir(parents=True)
    gray = ds.test_images[0][:45, :77].copy()  # not a multiple of the U-Net's stride
    Image.fromarray(gray).save(src / "gray.png")
    rgb = np.stack([ds.test_images[1]] * 3, -1)
    Image.fromarray(rgb).save(src / "sub" / "colour.png")
    deep = ds.test_images[2].astype(np.uint16) * 257  # 16-bit: stretched back onto 0..255
    Image.fromarray(deep).save(src / "deep.tif")
    (src / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "masks" / "gray.png")  # not an input
    out = tmp_path / "out"
    code, stdout, _ = run(["predict", src, "--checkpoint", ckpt, "--out", out, "--probs"], capsys)
    assert code == 0 and "wrote 3 mask(s)" in stdout
    got = {p.relative_to(out).as_posix(): np.asarray(Image.open(p)) for p in out.rglob("*.png")}
    assert set(got) == {"gray.png", "sub/colour.png", "deep.png"}
    assert got["gray.png"].shape == (45, 77) and got["gray.png"].dtype == np.uint8
    assert got["gray.png"].max() <= 4
    np.testing.assert_array_equal(got["gray.png"], model_mask(model, gray))
    np.testing.assert_array_equal(got["sub/colour.png"], model_mask(model, ds.test_images[1]))
    lo, hi = ds.test_images[2].min(), ds.test_images[2].max()
    stretched = ((ds.test_images[2].astype(float) - lo) * 255 / (hi - lo)).round().astype(np.uint8)
    np.testing.assert_array_equal(got["deep.png"], model_mask(model, stretched))
    probs = np.load(out / "gray_probs.npy")
    assert probs.shape == (5, 45, 77) and (probs.argmax(0) == got["gray.png"]).mean() > 0.999


def test_predict_min_confidence_leaves_doubtful_pixels_unlabelled(trained, tmp_path, capsys):
    _, ckpt, ds, model = trained
    Image.fromarray(ds.test_images[3]).save(tmp_path / "a.png")
    # float32 as the CLI decides: float16 probabilities round some pixels onto the level
    full = predict_arrays(model, ds.test_images[3][None], 1, "cpu", with_probs=True, probs_dtype=np.float32)
    level = float(np.median(full["probs"][0].max(0)))  # a tiny model: about half its pixels are sure
    code, _, _ = run(
        [
            "predict",
            tmp_path / "a.png",
            "--checkpoint",
            ckpt,
            "--out",
            tmp_path / "o",
            "--min-confidence",
            level,
        ],
        capsys,
    )
    assert code == 0
    kept = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    sure = full["probs"][0].max(0) >= level
    assert 0 < sure.mean() < 1  # the test needs both kinds of pixel
    np.testing.assert_array_equal(kept[sure], full["masks"][0][sure])
    assert (kept[~sure] == 0).all()
    np.testing.assert_array_equal(keep_confident(full["masks"], full["probs"].max(1), 0.0), full["masks"])


def test_predict_reports_unreadable_files_after_writing_the_rest(trained, tmp_path, capsys):
    _, ckpt, ds, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(ds.test_images[0]).save(src / "good.png")
    (src / "broken.png").write_bytes(b"not an image")
    code, out, err = run(["predict", src, "--checkpoint", ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "wrote 1 mask(s)" in out
    assert "broken.png: unreadable image" in err
    assert (tmp_path / "o" / "good.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["predict", empty, "--checkpoint", ckpt, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "empty: no images found" in err
    not_ckpt = tmp_path / "x.pt"
    torch.save({"hello": 1}, not_ckpt)
    code, _, err = run(
        ["predict", src / "good.png", "--checkpoint", not_ckpt, "--out", tmp_path / "o3"], capsys
    )
    assert code == 2 and "x.pt" in err


# -- the label-next queue ----------------------------------------------------------
def test_regions_ignore_speckle_and_boundary_strips():
    doubt = np.zeros((40, 60))
    doubt[::7, ::5] = 1.0  # speckle
    doubt[20, :] = 1.0  # a one-pixel boundary strip
    doubt[:, 30:32] = 1.0  # a two-pixel strip
    doubt[30:34, 40:44] = 1.0  # a blob of 16 pixels, below min_region
    kept, n = _regions(doubt, 0.5, 24)
    assert n == 0 and not kept.any()
    doubt[2:12, 2:14] = 0.9  # a real region of 120 pixels
    kept, n = _regions(doubt, 0.5, 24)
    assert n == 1 and kept[2:12, 2:14].all() and kept.sum() == 120
    # A region of exactly min_region pixels is kept; one pixel more asked, it is not.
    assert _regions(doubt, 0.5, 120)[1] == 1 and _regions(doubt, 0.5, 121)[1] == 0


def test_doubt_is_zero_when_sure_and_one_at_a_tie_or_uniform():
    p = torch.tensor([[1.0, 0, 0, 0, 0], [0.5, 0.3, 0.2, 0, 0], [0.4, 0.4, 0.2, 0, 0], [0.2] * 5])
    p = p[:, :, None, None]  # (4 pixels as images, C, 1, 1)
    margin = _doubt(p, "margin")[:, 0, 0]
    torch.testing.assert_close(margin, torch.tensor([0.0, 0.8, 1.0, 1.0]))
    entropy = _doubt(p, "entropy")[:, 0, 0]  # in units of the largest entropy, log(5)
    assert entropy[0] == 0 and 0 < entropy[1] < entropy[2] < entropy[3]
    torch.testing.assert_close(entropy[3], torch.tensor(1.0))


def test_pool_scores_are_the_flip_averaged_prediction_in_kept_regions(trained):
    """The scores read the prediction ``predict --tta`` makes (each image and its mirror
    image, averaged back in place), over the uncertain regions kept only."""
    from trainer.device import resolve_precision

    *_, ds, model = trained
    images = ds.test_images[:4]
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    probs = predict_arrays(
        model, images, with_probs=True, flip_tta=True, precision=fp32, probs_dtype=np.float32
    )
    doubt = _doubt(torch.from_numpy(probs["probs"]), "margin").numpy()
    threshold = float(np.median(doubt))  # a briefly trained model: about half its pixels doubtful
    scores = score_pool(model, images, threshold=threshold, min_region=10)
    for k in range(len(images)):
        kept, n = _regions(doubt[k], threshold, 10)
        assert scores.regions[k] == n and scores.uncertain_share[k] == pytest.approx(kept.mean(), abs=1e-3)
        assert scores.uncertainty[k] == pytest.approx(float((doubt[k] * kept).mean()), abs=1e-3)
        shares = np.bincount(probs["masks"][k].ravel(), minlength=5) / images[k].size
        np.testing.assert_allclose(scores.class_share[k], shares, atol=1e-3)
    assert scores.uncertain_share.max() < 0.9 and scores.uncertainty.max() > 0  # kept regions, not all


def test_typical_spacing_is_half_the_median_distance():
    features = np.array([[0.0], [1.0], [2.0], [3.0]])  # distances 1, 1, 1, 2, 2, 3: median 1.5
    assert typical_spacing(features) == pytest.approx(0.75)


def test_with_no_uncertainty_left_the_most_novel_image_comes_first():
    feats = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.7, 0.7, 0], [0, 0, 1.0]])
    scores = _scores([0.0] * 4, feats)
    labelled = np.array([[1.0, 0.0, 0.0]])  # image 0 is labelled already; image 3 is the farthest
    order = [e["index"] for e in rank_pool(scores, labelled_features=labelled)]
    assert order[0] in (1, 3) and order[-1] == 0


def _scores(uncertainty, features) -> PoolScores:
    m = len(uncertainty)
    f = np.asarray(features, float)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    shares = np.tile([0, 0.5, 0.3, 0.2, 0], (m, 1))
    return PoolScores(np.asarray(uncertainty, float), np.ones(m, int), np.asarray(uncertainty), shares, f)


def test_rank_pool_spreads_the_top_over_different_scenes():
    rng = np.random.default_rng(0)
    scene = rng.normal(size=8)
    near_copies = [scene + 0.01 * rng.normal(size=8) for _ in range(10)]  # one scene, ten frames
    others = [rng.normal(size=8) for _ in range(6)]
    scores = _scores([0.9] * 10 + [0.5] * 6, near_copies + others)
    plain = [e["index"] for e in rank_pool(scores, top=5, diversity=0)]
    assert all(i < 10 for i in plain)  # uncertainty alone: five frames of the same scene
    diverse = [e["index"] for e in rank_pool(scores, top=5)]
    assert diverse[0] < 10 and sum(i < 10 for i in diverse) == 1  # one frame of it, then other scenes
    top = rank_pool(scores, top=5)
    assert [e["score"] for e in top] == sorted((e["score"] for e in top), reverse=True)
    kinds = [r["kind"] for r in top[1]["reasons"]]
    assert kinds == ["uncertain", "diverse", "predicted"]
    assert "uncertain region" in describe(top[1]) and "Soil" in describe(top[1])


def test_rank_pool_puts_images_like_the_labelled_ones_last():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(6, 8))
    scores = _scores([0.5] * 6, feats)
    labelled = scores.features[[2]] + 1e-4  # image 2 is (nearly) labelled already
    order = [e["index"] for e in rank_pool(scores, labelled_features=labelled)]
    assert order[-1] == 2
    first = rank_pool(scores, top=1, labelled_features=labelled)[0]
    assert any(r.get("versus") == "labelled images" for r in first["reasons"])


def test_each_pick_names_what_it_is_near_the_labelled_images_or_those_above():
    """The second pick here lies next to a labelled image, far from the first pick: its
    reason names the labelled images; the third lies next to the first pick."""
    feats = [[1.0, 0, 0], [0, 1.0, 0], [1.0, 0.05, 0]]
    scores = _scores([0.9, 0.8, 0.1], feats)
    labelled = np.array([[0, 1.0, 0.02]]) / np.linalg.norm([0, 1.0, 0.02])
    picks = rank_pool(scores, labelled_features=labelled, diversity=0)
    assert [e["index"] for e in picks] == [0, 1, 2]
    versus = [next(r["versus"] for r in e["reasons"] if r["kind"] == "diverse") for e in picks]
    assert versus == ["labelled images", "labelled images", "images above"]
    assert "close to the labelled images" in describe(picks[1])


def test_suggest_cli_ranks_the_test_set(trained, tmp_path, capsys):
    data, ckpt, ds, _ = trained
    out = tmp_path / "next.json"
    code, stdout, _ = run(["suggest", data, "--checkpoint", ckpt, "--top", "5", "--out", out], capsys)
    assert code == 0 and "5 of 12 unlabelled images" in stdout
    ranking = json.loads(out.read_text())
    assert len(ranking) == 5 and len({e["index"] for e in ranking}) == 5
    assert all(0 <= e["index"] < len(ds.test_images) and e["reasons"] for e in ranking)
    assert [e["score"] for e in ranking] == sorted((e["score"] for e in ranking), reverse=True)
    code, _, err = run(["suggest", "synthetic:8", "--checkpoint", ckpt], capsys)
    assert code == 2 and "no unlabelled images" in err


def test_suggest_on_a_folder_ranks_its_images_without_masks(trained, tmp_path, capsys):
    _, ckpt, ds, _ = trained
    for i in range(3):
        Image.fromarray(ds.images[i]).save(tmp_path / f"lab{i}.png")
        Image.fromarray(ds.masks[i]).save(tmp_path / f"lab{i}_mask.png")
    for i in range(4):
        Image.fromarray(ds.test_images[i]).save(tmp_path / f"new{i}.png")
    code, stdout, _ = run(["suggest", tmp_path, "--checkpoint", ckpt], capsys)
    ranking = json.loads(stdout[stdout.index("[") :])
    assert code == 0 and sorted(e["name"] for e in ranking) == [f"new{i}" for i in range(4)]


def test_suggest_on_a_dataset_read_from_disk_ranks_as_in_memory(trained, tmp_path, capsys, monkeypatch):
    """A zarr dataset too large for memory is scored a frame at a time: the same ranking,
    names and reasons as the npz it was converted from, whose images are scored in batches."""
    from trainer import formats

    data, ckpt, ds, _ = trained
    store = tmp_path / "d.zarr"
    run(["convert", data, "--out", store], capsys)
    args = ["--checkpoint", ckpt, "--top", "6", "--out"]
    assert run(["suggest", data, *args, tmp_path / "a.json"], capsys)[0] == 0
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    code, out, _ = run(["suggest", store, *args, tmp_path / "b.json"], capsys)
    assert code == 0 and "6 of 12 unlabelled images" in out
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert [e["name"] for e in b] == [str(e["index"]) for e in b] == [e["name"] for e in a]
    np.testing.assert_allclose([e["score"] for e in b], [e["score"] for e in a], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_suggest_leaves_out_images_labelled_since_or_excluded(trained, tmp_path, capsys, monkeypatch, where):
    """An unlabelled image given a label in napari (saved in the dataset's store) is a
    labelled image now, and an excluded one is left out: re-running suggest after a round
    of labelling does not offer them again. --no-corrections ranks them all."""
    from trainer import formats
    from trainer.corrections import CorrectionStore
    from trainer.formats import open_dataset

    data, ckpt, ds, _ = trained
    source = tmp_path / "mars.npz"  # a copy: its store is made beside it
    shutil.copy(data, source)
    if where == "disk":
        run(["convert", source, "--out", tmp_path / "d.zarr"], capsys)
        source = tmp_path / "d.zarr"
        monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    opened = open_dataset(source, lazy=True)
    store = CorrectionStore.for_dataset(opened)
    n = len(ds)
    store.save_mask(n + 2, np.ones(ds.image_shape, np.uint8))  # unlabelled image 2, labelled
    store.exclude(n + 5)  # unlabelled image 5, excluded
    store.save_mask(n + 7, np.ones(ds.image_shape, np.uint8))
    store.restore(n + 7)  # labelled, then taken back: unlabelled again
    store.close()
    code, out, err = run(["suggest", source, "--checkpoint", ckpt, "--out", tmp_path / "a.json"], capsys)
    assert code == 0 and "10 of 10 unlabelled images" in out
    assert "1 unlabelled images labelled since" in err
    ranked = json.loads((tmp_path / "a.json").read_text())
    assert sorted(e["index"] for e in ranked) == [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    assert all(e["name"] == str(e["index"]) for e in ranked)
    argv = ["suggest", source, "--checkpoint", ckpt, "--no-corrections", "--out", tmp_path / "b.json"]
    code, plain, _ = run(argv, capsys)
    assert code == 0
    assert sorted(e["index"] for e in json.loads((tmp_path / "b.json").read_text())) == list(range(12))

    def soil(text: str) -> float:  # the labelled share in brackets: "Soil 12.3% (45.6%)"
        return float(re.search(r"Soil [\d.]+% \(([\d.]+)%\)", text).group(1))

    assert soil(out) > soil(plain)  # the image labelled since (all Soil) counts as labelled terrain


def test_pool_frames_of_any_size_and_by_tiles_score_as_whole_batches(trained, monkeypatch):
    """Frames scored one at a time equal the batched scores; a frame over the whole-image
    limit is scored from its tiled prediction, its features the mean over its tiles."""
    from trainer import tiling
    from trainer.suggest import FramesOf

    _, _, ds, model = trained

    class Stored:  # what FramesOf reads: frames by row
        def image(self, i):
            return ds.test_images[i]

    pool = ds.test_images[:5]
    said = {"batched": [], "framed": [], "mixed": []}
    batched = score_pool(model, pool, batch_size=2, progress=lambda *a: said["batched"].append(a))
    framed = score_pool(
        model, FramesOf(Stored(), range(5)), batch_size=2, progress=lambda *a: said["framed"].append(a)
    )
    # Frames of a sequence go in batches of one size: a frame of another size ends a batch.
    mixed = [pool[0], pool[1], pool[2][:48, :96], pool[3]]
    alone = [score_pool(model, [f]) for f in mixed]
    together = score_pool(model, mixed, progress=lambda *a: said["mixed"].append(a))
    assert said == {
        "batched": [(2, 5), (4, 5), (5, 5)],
        "framed": [(2, 5), (4, 5), (5, 5)],
        "mixed": [(2, 4), (3, 4), (4, 4)],
    }
    np.testing.assert_allclose(together.uncertainty, [a.uncertainty[0] for a in alone], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(framed.uncertainty, batched.uncertainty, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(framed.features, batched.features, atol=1e-5)
    np.testing.assert_array_equal(framed.regions, batched.regions)
    # Larger frames go in smaller batches, as prediction batches them (the same pixels a
    # batch): 128x256 frames, 4x the pixels of 64x128, four to a batch of 16.
    from trainer.suggest import _batches

    large = [np.zeros((128, 256), np.uint8)] * 9
    assert [len(b) for _, b in _batches(large, 16)] == [4, 4, 1]
    t = ds.test_images
    big = np.block([[t[4], t[0], t[0]]] * 3)  # two unlike scenes: the first tile mostly one
    whole = score_pool(model, [big])
    for name, value in (("WHOLE_IMAGE_PIXELS", 10_000), ("TILE", 0), ("OVERLAP", 0)):
        monkeypatch.setattr(tiling, name, value)  # tiles of the least size: 2 x 3 here
    assert len(tiling.tile_layout(192, *tiling.tile_size(model))) == 2
    tiled = score_pool(model, [big])
    twice = score_pool(model, [big, big], batch_size=4096)  # however large the batch: alone, by tiles
    np.testing.assert_allclose(twice.uncertainty, [tiled.uncertainty[0]] * 2, rtol=1e-6)
    # Flip-averaged as the whole frame is (without the flip the shares move by ~2e-3).
    np.testing.assert_allclose(tiled.class_share, whole.class_share, atol=5e-4)
    np.testing.assert_allclose(tiled.uncertainty, whole.uncertainty, rtol=5e-5)
    # Its features are the mean over all tiles (the first tile's alone: cosine ~0.987).
    assert float(tiled.features[0] @ whole.features[0]) > 0.997


# -- the model anywhere ------------------------------------------------------------
def test_export_torchscript_runs_without_this_package(trained, tmp_path, capsys):
    _, ckpt, ds, model = trained
    out = tmp_path / "model.pt"
    code, stdout, _ = run(
        ["export-model", "--checkpoint", ckpt, "--format", "torchscript", "--out", out], capsys
    )
    assert code == 0 and "100.00% of pixels" in stdout
    np.save(tmp_path / "x.npy", ds.test_images[:2])
    # A colour image, each channel another scene: the export takes it as its luma (ITU-R 601
    # weights, as training reads colour files), not as some other mix of the channels.
    rgb = np.stack([ds.test_images[2], ds.test_images[3], 255 - ds.test_images[4]])[None]
    np.save(tmp_path / "rgb.npy", rgb)
    script = (
        "import sys, numpy as np, torch\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "a = m(x)\n"  # uint8 (N, H, W)
        "b = m(x.float().unsqueeze(1) / 255)\n"  # float (N, 1, H, W)
        "c = m(x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous())\n"  # RGB uint8
        "assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-3)\n"
        f"rgb = torch.from_numpy(np.load({str(tmp_path / 'rgb.npy')!r}))\n"
        "luma = (rgb.double() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True) / 255\n"
        "assert torch.allclose(m(rgb), m(luma.float()), atol=1e-3)\n"
        "assert m(x[:, :45, :77]).shape == (2, 5, 45, 77)\n"
        "assert not any(k.startswith(('trainer', 'marsviewer')) for k in sys.modules)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, a.argmax(1).numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    want = predict_arrays(model, ds.test_images[:2], 2, "cpu", precision=None)["masks"]
    assert (np.load(tmp_path / "y.npy") == want).mean() > 0.999


def test_an_export_that_predicts_otherwise_is_refused(trained, tmp_path, monkeypatch):
    """The export is checked against the checkpoint: one that changes a pixel in a hundred
    is refused, naming its agreement."""
    from trainer import portable

    *_, model = trained
    real = portable._torchscript_runner

    def off_by_one(path):
        run = real(path)

        def wrong(batch):
            got = run(batch).copy()
            got.reshape(-1)[::100] = (got.reshape(-1)[::100] + 1) % 5
            return got

        return wrong

    monkeypatch.setattr(portable, "_torchscript_runner", off_by_one)
    with pytest.raises(portable.ExportError, match=r"agrees with the checkpoint on only 99\.0\d%"):
        portable.export(model, "torchscript", tmp_path / "m.pt")


def test_export_onnx_or_a_clear_message(trained, tmp_path, capsys, monkeypatch):
    _, ckpt, ds, _ = trained
    out = tmp_path / "model.onnx"
    try:
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        code, stdout, err = run(
            ["export-model", "--checkpoint", ckpt, "--format", "onnx", "--out", out], capsys
        )
        assert code == 0, err
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = session.run(
            None, {"image": (ds.test_images[:3, :45, :77].astype(np.float32) / 255)[:, None]}
        )[0]
        assert logits.shape == (3, 5, 45, 77)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    code, _, err = run(
        ["export-model", "--checkpoint", ckpt, "--format", "onnx", "--out", tmp_path / "b.onnx"], capsys
    )
    assert code == 2 and "pip install" in err and "onnxscript" in err


def test_export_format_follows_the_file_name(trained, tmp_path, capsys, monkeypatch):
    """``--format`` left out: ONNX for a ``.onnx`` name, else TorchScript. A name that says
    the other format is refused before anything is written."""
    import trainer.portable as portable

    _, ckpt, _, _ = trained
    wrote = []
    monkeypatch.setattr(portable, "export", lambda model, fmt, out: wrote.append((fmt, out.name)) or 1.0)
    for name, fmt in (
        ("m.onnx", "onnx"),
        ("m.ONNX", "onnx"),
        ("m.pt", "torchscript"),
        ("model", "torchscript"),
    ):
        code, stdout, _ = run(["export-model", "--checkpoint", ckpt, "--out", tmp_path / name], capsys)
        assert code == 0 and f"({fmt})" in stdout
    code, _, _ = run(
        ["export-model", "--checkpoint", ckpt, "--out", tmp_path / "x", "--format", "onnx"], capsys
    )
    assert code == 0
    assert wrote == [  # each written under its partial name, renamed when complete
        ("onnx", "m.onnx.partial"),
        ("onnx", "m.ONNX.partial"),
        ("torchscript", "m.pt.partial"),
        ("torchscript", "model.partial"),
        ("onnx", "x.partial"),
    ]
    assert all((tmp_path / name).is_file() for name in ("m.onnx", "m.ONNX", "m.pt", "model", "x"))
    for name, fmt, hint in (("m.onnx", "torchscript", "m.pt"), ("m.pth", "onnx", "m.onnx")):
        code, _, err = run(
            ["export-model", "--checkpoint", ckpt, "--out", tmp_path / name, "--format", fmt], capsys
        )
        assert code == 2 and f"name it {hint}" in err
    assert len(wrote) == 5


def test_a_run_directory_stands_for_its_checkpoint(trained, tmp_path, capsys):
    """``--checkpoint RUN`` (or RUN/checkpoints) is the run's best.pt, ``--resume RUN`` its
    last.pt; either falls back to the other; a folder without checkpoints is refused by name."""
    from trainer.cli_common import checkpoint_arg
    from trainer.runs import checkpoint_file

    data, ckpt, _, _ = trained
    run_dir = ckpt.parent.parent
    assert checkpoint_file(run_dir) == run_dir / "checkpoints" / "best.pt"
    assert checkpoint_file(run_dir / "checkpoints") == run_dir / "checkpoints" / "best.pt"
    assert checkpoint_file(run_dir, "last") == ckpt
    assert checkpoint_file(ckpt) == ckpt
    only_last = tmp_path / "stopped" / "checkpoints"
    only_last.mkdir(parents=True)
    (only_last / "last.pt").write_bytes(ckpt.read_bytes())
    assert checkpoint_file(only_last.parent) == only_last / "last.pt"
    with pytest.raises(argparse.ArgumentTypeError, match="without checkpoints"):
        checkpoint_arg("best")(str(tmp_path))
    code, by_dir, _ = run(["evaluate", "--checkpoint", run_dir, data, "--json"], capsys)
    code2, by_file, _ = run(
        ["evaluate", "--checkpoint", run_dir / "checkpoints/best.pt", data, "--json"], capsys
    )
    assert code == code2 == 0 and json.loads(by_dir) == json.loads(by_file)
    with pytest.raises(SystemExit) as exit_:
        run(["evaluate", "--checkpoint", tmp_path, data], capsys)
    assert exit_.value.code == 2 and "without checkpoints" in capsys.readouterr().err


def test_label_confidence_default_is_the_measured_one():
    """The default is the one the figures page (written from bench/label_confidence.py's
    output by bench/readme_figures.py) reports."""
    from pathlib import Path

    from trainer.inference import LABEL_CONFIDENCE

    figures = (Path(__file__).parent.parent / "docs" / "figures.md").read_text()
    line = next(x for x in figures.splitlines() if x.startswith("Predictions as starting labels"))
    assert f"**{LABEL_CONFIDENCE}**" in line


def test_predict_and_evaluate_a_zarr_dataset_from_disk(trained, tmp_path, capsys, monkeypatch):
    """Frames of a stored dataset are predicted one by one (unlabelled ones by default),
    and evaluate reads it frame by frame when it is too large for memory: the figures
    equal those of the npz it was converted from (up to bf16 rounding: one frame a batch
    here, 32 there)."""
    from trainer import formats

    data, ckpt, ds, model = trained
    store = tmp_path / "d.zarr"
    run(["convert", data, "--out", store], capsys)
    code, out, _ = run(["predict", store, "--checkpoint", ckpt, "--out", tmp_path / "masks"], capsys)
    assert code == 0 and "wrote 12 mask(s)" in out
    first = np.asarray(Image.open(tmp_path / "masks" / "0.png"))
    want = predict_arrays(model, ds.test_images[:1], with_probs=True)["masks"][0]
    np.testing.assert_array_equal(first, want)
    _, from_npz, _ = run(["evaluate", data, "--checkpoint", ckpt, "--split", "all", "--json"], capsys)
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    _, from_disk, _ = run(["evaluate", store, "--checkpoint", ckpt, "--split", "all", "--json"], capsys)
    a, b = json.loads(from_npz), json.loads(from_disk)
    ca, cb = np.array(a["confusion"]), np.array(b["confusion"])
    assert ca.sum() == cb.sum() and np.abs(ca - cb).sum() < 1e-3 * ca.sum()
    assert a["images"] == b["images"] == 40 and abs(a["miou"] - b["miou"]) < 0.005


def test_predict_a_frame_larger_than_a_megapixel_by_tiles(trained, tmp_path, capsys, monkeypatch):
    from trainer import tiling

    data, ckpt, ds, model = trained
    big = np.tile(ds.test_images[0], (3, 2))[:181, :250]  # 45k px: tiles when the limit is lower
    Image.fromarray(big).save(tmp_path / "frame.png")
    monkeypatch.setattr(tiling, "WHOLE_IMAGE_PIXELS", 10_000)
    code, out, _ = run(
        ["predict", tmp_path / "frame.png", "--checkpoint", ckpt, "--out", tmp_path / "o"], capsys
    )
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "o" / "frame.png"))
    whole = predict_arrays(model, big[None])["masks"][0]
    assert mask.shape == big.shape and (mask == whole).mean() >= 0.98
