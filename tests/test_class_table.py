"""A dataset's own class table, and classes the training labels never hold: read from an
npz, a folder's classes.toml and a converted dataset; followed by training, metrics,
checkpoints, predictions, exports and the CLI; a checkpoint of another table refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import events as ev
from trainer.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from trainer.classes import COMPETITION, ClassTable, ClassTableError
from trainer.cli import main as cli_main
from trainer.config import preset
from trainer.dataset import DatasetError
from trainer.engine import TrainControl, fit
from trainer.formats import open_dataset, open_zarr, read_npz, write_npz
from trainer.inference import predict_arrays
from trainer.metrics import NOT_IN_IMAGES, NOT_IN_TRAINING, metrics_from_confusion
from trainer.model import UNet, build_model
from trainer.synth import ROCKS_TABLE, generate

SOIL_ROCK_ABSENT = [2, 3]  # bedrock and sand: never labelled in the soil-rock label set


@pytest.fixture(scope="module")
def soil_rock():
    """Masks of the competition's table that use only soil and big rocks (as rover frames
    labelled rock against soil do)."""
    return generate(40, 4, seed=2, labels="soil-rock").dataset


@pytest.fixture(scope="module")
def rocks():
    """A dataset with a table of its own: 0 no label, 1 Ground, 2 Rock."""
    return generate(40, 4, seed=2, labels="rocks").dataset


@pytest.fixture(scope="module")
def soil_rock_run(soil_rock, tmp_path_factory):
    run = tmp_path_factory.mktemp("soil_rock_run")
    events = list(
        fit(soil_rock, preset("tiny").replace(epochs=2), run, control=TrainControl(preview_indices=[0, 1]))
    )
    return run, events


# -- the table itself ------------------------------------------------------------------------


def test_a_table_reads_its_three_forms_and_refuses_what_it_cannot_use():
    assert ClassTable.from_json(COMPETITION.to_json()) == COMPETITION
    listed = ClassTable.from_records([[0, "no label", "#282830"], [1, "Rock", [255, 0, 0]]])
    toml_like = ClassTable.from_records({"0": "no label", "1": {"name": "Rock", "color": "#ff0000"}})
    assert listed == toml_like and listed.scored == (1,) and listed.miou_label() == "mIoU (1)"
    assert listed.find("rock") == 1 and listed.find("1") == 1 and listed.find("Sand") is None
    assert not listed.same_classes(COMPETITION)
    bad = {
        "gaps": [[0, "a"], [2, "b"]],
        "given twice": [[0, "a"], [0, "b"]],
        "given to two ids": [[0, "a"], [1, "A"]],
        "not a whole number": [[0, "a"], ["x", "b"]],
        "colour": [[0, "a"], [1, "b", "#12"]],
        "only class 0": [[0, "a"]],
        'marsviewer numbers "not labelled" 0': {"classes": [[0, "a"], [1, "b"]], "not_labelled": 255},
    }
    for words, records in bad.items():
        with pytest.raises(ClassTableError, match=words):
            ClassTable.from_records(records, "f.npz")


def test_an_npz_carries_its_table_beside_the_arrays(tmp_path, rocks):
    path = tmp_path / "rocks.npz"
    write_npz(path, rocks.images, rocks.masks, rocks.test_images, classes=rocks.classes)
    back = read_npz(path)
    assert back.classes == ROCKS_TABLE and back.num_classes == 3
    assert np.array_equal(back.masks, rocks.masks)
    # a mask value beyond the declared table is refused, naming the table
    masks = rocks.masks.copy()
    masks[5, 0, 0] = 3
    write_npz(tmp_path / "bad.npz", rocks.images, masks, classes=rocks.classes)
    with pytest.raises(
        DatasetError, match=r"image 5 has the value 3; expected whole numbers 0\.\.2 .*1=Ground"
    ):
        read_npz(tmp_path / "bad.npz")
    # a table that is not one: said, naming the file
    np.savez(tmp_path / "junk.npz", training_set=np.zeros((2, 2, 4, 4)), classes=np.array("[[0, 'a']"))
    with pytest.raises(DatasetError, match="junk.npz: its 'classes' array: not a JSON class table"):
        read_npz(tmp_path / "junk.npz")
    # the competition's file has no table: today's classes
    write_npz(tmp_path / "plain.npz", rocks.images, np.minimum(rocks.masks, 4))
    assert read_npz(tmp_path / "plain.npz").classes == COMPETITION


def _write_rock_folder(root, n=6):
    """Frames whose mask files say 0 for ground, 1 for rock and 255 for no label."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48), np.uint8)).save(root / "images" / f"f{i}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[:8] = 255
        mask[20:30, 10 + i : 20 + i] = 1
        Image.fromarray(mask).save(root / "masks" / f"f{i}.png")


def test_a_folder_declares_its_classes_in_classes_toml(tmp_path):
    root = tmp_path / "rockfolder"
    _write_rock_folder(root)
    (root / "classes.toml").write_text(
        '[classes]\n0 = "no label"\n1 = "Ground"\n2 = { name = "Rock", color = "#dc323c" }\n\n'
        '[mask_mapping]\n"255" = "no label"\n"0" = "Ground"\n"1" = "Rock"\n'
    )
    ds = open_dataset(root)
    assert ds.classes.names == ("no label", "Ground", "Rock") and ds.classes[2].hex == "#dc323c"
    assert set(np.unique(ds.masks)) == {0, 1, 2} and (ds.masks[:, :8] == 0).all()
    # converted, the table travels with the frames
    assert cli_main(["convert", str(root), "--out", str(tmp_path / "rocks.zarr")]) == 0
    stored = open_zarr(tmp_path / "rocks.zarr")
    assert stored.classes == ds.classes and stored.class_pixels.shape == (6, 3)
    assert stored.to_memory().classes == ds.classes
    # exported again (a zarr, an npz), the table goes along
    assert cli_main(["export", str(tmp_path / "rocks.zarr"), "--out", str(tmp_path / "again.zarr")]) == 0
    assert open_zarr(tmp_path / "again.zarr").classes == ds.classes
    assert cli_main(["export", str(root), "--out", str(tmp_path / "again.npz")]) == 0
    assert read_npz(tmp_path / "again.npz").classes == ds.classes
    # a pair naming a class the table lacks is refused with the table's classes
    (root / "classes.toml").write_text(
        '[classes]\n0 = "no label"\n1 = "Ground"\n\n[mask_mapping]\n"1" = "Rock"\n'
    )
    with pytest.raises(DatasetError, match="'Rock' is not a class; valid: 0=no label, 1=Ground"):
        open_dataset(root)


# -- classes the training labels never hold ---------------------------------------------------


def test_a_class_left_out_is_never_predicted_by_any_copy_of_the_model(tmp_path):
    """A model that favours bedrock and sand predicts them; left out, a class is never the
    arg-max and has probability 0, in the model, its folded copy, a checkpoint and a
    TorchScript export."""
    torch.manual_seed(0)
    model = UNet(depth=2, base_width=8).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 4.0, 0.0]))
    images = np.random.default_rng(0).integers(0, 255, (6, 64, 128), np.uint8)
    before = predict_arrays(model, images)["masks"]
    assert np.isin(before, SOIL_ROCK_ABSENT).mean() > 0.5  # the case to fix
    model.set_absent(SOIL_ROCK_ABSENT)
    assert model.absent() == SOIL_ROCK_ABSENT
    out = predict_arrays(model, images, with_probs=True)
    assert not np.isin(out["masks"], SOIL_ROCK_ABSENT).any()
    assert float(out["probs"][:, SOIL_ROCK_ABSENT].max()) == 0.0
    cfg = preset("tiny")
    save_checkpoint(tmp_path / "m.pt", model=model, config=cfg)
    data = load_checkpoint(tmp_path / "m.pt")
    assert data["absent_classes"] == SOIL_ROCK_ABSENT
    again, _ = model_from_checkpoint(data)
    assert again.absent() == SOIL_ROCK_ABSENT
    assert (
        cli_main(["export-model", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.ts")])
        == 0
    )
    exported = torch.jit.load(str(tmp_path / "m.ts"))
    x = torch.from_numpy(images).unsqueeze(1).float() / 255
    assert not np.isin(exported(x).argmax(1).numpy(), SOIL_ROCK_ABSENT).any()


def test_a_checkpoint_written_before_classes_could_be_left_out_predicts_every_class(tmp_path):
    model = build_model(preset("tiny"))
    weights = {k: v for k, v in model.state_dict().items() if k != "class_offset"}
    fresh = build_model(preset("tiny"))
    fresh.set_absent([2])
    fresh.load_state_dict(weights)  # the old file has no offsets: nothing is left out
    assert fresh.absent() == []


def test_training_leaves_out_the_classes_its_labels_never_hold(soil_rock_run, soil_rock):
    run, events = soil_rock_run
    started = events[0]
    assert started.absent_classes == SOIL_ROCK_ABSENT and started.classes == COMPETITION.records()
    vals = [e for e in events if isinstance(e, ev.Validation)]
    for v in vals:
        assert v.absent == SOIL_ROCK_ABSENT
        assert v.left_out[2] == NOT_IN_TRAINING and v.left_out[3] == NOT_IN_TRAINING
        assert set(v.scored) <= {1, 4} and 1 in v.scored
        assert np.asarray(v.confusion)[:, SOIL_ROCK_ABSENT].sum() == 0  # never predicted
    previews = [e for e in events if isinstance(e, ev.Preview)]
    assert previews and not any(np.isin(p.masks, SOIL_ROCK_ABSENT).any() for p in previews)
    recorded = json.loads((run / "classes.json").read_text())
    assert recorded["absent"] == SOIL_ROCK_ABSENT and recorded["classes"][4]["name"] == "Big Rock"
    data = load_checkpoint(run / "checkpoints" / "last.pt")
    assert data["absent_classes"] == SOIL_ROCK_ABSENT
    model, _ = model_from_checkpoint(data, classes=soil_rock.classes)
    masks = predict_arrays(model, soil_rock.test_images)["masks"]
    assert not np.isin(masks, SOIL_ROCK_ABSENT).any()


def test_a_correction_that_labels_a_class_brings_it_back(tmp_path, soil_rock):
    """Classes follow the training labels after corrections: a sand patch saved on a
    training image makes sand a class the model predicts from the next epoch on."""
    from trainer.corrections import CorrectionStore

    store = CorrectionStore.for_dataset(soil_rock, path=tmp_path / "c.sqlite")
    cfg = preset("tiny").replace(epochs=3)
    seen = []
    for e in fit(soil_rock, cfg, corrections=store):
        if isinstance(e, ev.Started):
            seen.append(("started", e.absent_classes))
        elif isinstance(e, ev.Validation) and e.epoch == 0:
            mask = soil_rock.masks[0].copy()
            mask[10:20, 10:40] = 3
            # every image trains (no split is asked for): rows of the training split
            store.save_mask(int(_a_training_row(tmp_path, soil_rock, cfg)), mask)
        elif isinstance(e, ev.DataUpdate) and e.absent_classes is not None:
            seen.append(("update", e.absent_classes))
    assert seen[0] == ("started", SOIL_ROCK_ABSENT)
    assert ("update", [2]) in seen  # sand is back; bedrock still left out


def _a_training_row(tmp_path, dataset, cfg):
    from trainer.inference import stratified_split
    from trainer.stats import class_presence

    train, _ = stratified_split(class_presence(dataset.masks), cfg.val_fraction, cfg.seed)
    return train[0]


def test_metrics_say_which_classes_were_scored_and_why_others_were_not():
    cm = np.zeros((5, 5), np.int64)
    cm[1, 1], cm[4, 4], cm[4, 1], cm[0, 1] = 50, 5, 5, 7
    result = metrics_from_confusion(cm.tolist(), absent=[2])
    assert result["scored"] == [1, 4]
    assert result["left_out"][2] == NOT_IN_TRAINING and result["left_out"][3] == NOT_IN_IMAGES
    assert "not labelled" in result["left_out"][0]
    assert result["miou"] == pytest.approx((50 / 55 + 5 / 10) / 2)


# -- a table of its own, end to end --------------------------------------------------------


def test_a_dataset_of_its_own_table_trains_scores_and_refuses_other_checkpoints(tmp_path, rocks, capsys):
    path = tmp_path / "rocks.npz"
    write_npz(path, rocks.images, rocks.masks, rocks.test_images, classes=rocks.classes)
    run = tmp_path / "run"
    assert cli_main(["train", str(path), "--preset", "tiny", "--epochs", "1", "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    out = out.out + out.err
    assert "Ground" in out and "mIoU (1-2)" in out and "Bedrock" not in out
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("iou_")] == ["iou_no_label", "iou_ground", "iou_rock"]
    data = load_checkpoint(run / "checkpoints" / "last.pt")
    assert data["class_table"] == ROCKS_TABLE
    model, _ = model_from_checkpoint(data)
    assert model.num_classes == 3
    # applied to a dataset of the competition's table: refused, both tables named
    other = tmp_path / "mars.npz"
    plain = generate(20, 2, seed=1).dataset
    write_npz(other, plain.images, plain.masks, plain.test_images)
    for argv in (
        ["evaluate", str(other), "--checkpoint", str(run)],
        ["predict", str(other), "--checkpoint", str(run), "--out", str(tmp_path / "p.npz")],
        ["submit", str(other), "--checkpoint", str(run), "--out", str(tmp_path / "s.csv")],
        ["train", str(other), "--preset", "tiny", "--resume", str(run / "checkpoints" / "last.pt"),
         "--run-dir", str(tmp_path / "run2")],
    ):  # fmt: skip
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "the checkpoint's classes (0=no label, 1=Ground, 2=Rock)" in err, argv
        assert "mars.npz's classes (0=Background, 1=Soil" in err, argv
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "s.csv").exists()
    with pytest.raises(CheckpointError, match="a model of other classes"):
        model_from_checkpoint(data, classes=COMPETITION)


# -- in napari ---------------------------------------------------------------------------------


def test_the_viewer_follows_the_dataset_table_and_says_which_classes_it_lacks(
    make_napari_viewer, qtbot, tmp_path, rocks, soil_rock
):
    from marsviewer._widget import MarsViewerWidget

    path = tmp_path / "rocks.npz"
    write_npz(path, rocks.images, rocks.masks, rocks.test_images, classes=rocks.classes)
    viewer = make_napari_viewer()
    w = MarsViewerWidget(viewer)
    viewer.window.add_dock_widget(w)
    try:
        w.open_path(path)
        qtbot.waitUntil(lambda: not w.loading, timeout=30_000)
        assert w.browser.classes == ROCKS_TABLE
        assert w.masks_layer.features["class"].tolist() == ["no label", "Ground", "Rock"]
        assert w.dataset_panel.share_bars.classes == ROCKS_TABLE
        names = [
            w.dataset_panel.filter_combo.itemText(i) for i in range(w.dataset_panel.filter_combo.count())
        ]
        assert any(n.startswith("Rock (") for n in names) and not any("Sand" in n for n in names)
        table = w.training.iou_table
        rows = [table.verticalHeaderItem(r).text() for r in range(table.rowCount())]
        assert rows == ["no label", "Ground", "Rock", "mIoU (1-2)", "mIoU as Keras"]
        assert w.training.confusion_table.columnCount() == 3
        # a run of the competition's table that never saw bedrock or sand: named as such
        sr = tmp_path / "sr.npz"
        write_npz(sr, soil_rock.images, soil_rock.masks, soil_rock.test_images)
        run = tmp_path / "run"
        assert cli_main(["train", str(sr), "--run-dir", str(run), "--preset", "tiny", "--epochs", "1"]) == 0
        assert w.session.training.attach(run)
        w.training._redraw()
        rows = [table.verticalHeaderItem(r).text() for r in range(table.rowCount())]
        assert rows[:5] == ["Background", "Soil", "Bedrock", "Sand", "Big Rock"]
        assert table.item(2, 0).text() == "not in this dataset" == table.item(3, 0).text()
        assert table.item(1, 0).text() not in ("", "–", "not in this dataset")
        assert [s[0] for s in w.training.iou_plot.series] == ["Soil", "Big Rock", "mIoU"]
    finally:
        w.session.shutdown()


def test_a_class_left_out_weighs_nothing_in_the_loss(soil_rock):
    """Dice averages its classes by weight: an absent class at the rare-class cap would
    dilute the loss of the classes there are."""
    from trainer.engine import _Trainer

    run = _Trainer(soil_rock, preset("tiny"), None, TrainControl(), None, None)
    weights = run.criterion.class_weights.tolist()
    assert weights[2] == weights[3] == 0.0 and weights[1] > 0 and weights[4] > 0
    run.presence[run.train_idx[0], 3] = True  # sand labelled since: weighed again
    run.leave_out_absent()
    assert run.criterion.class_weights[3] == run.base_weights[3] > 0 and run.model.absent() == [2]
