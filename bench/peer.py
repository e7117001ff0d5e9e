"""Time to quality against what a user would write instead: mIoU after the same minutes of
training on the same images, marsviewer against a segmentation_models_pytorch U-Net.

The peer is the tool people reach for: ``segmentation_models_pytorch.Unet`` with a
resnet18 encoder (no pretrained weights: nothing is downloaded), a plain PyTorch loop
with AdamW (lr 1e-3), cross-entropy ignoring class 0 ("not labelled", as the metric
does), random horizontal and vertical flips, fp32; whole 64x128 images in batches of
16, and on large frames random 256x256 crops in batches of 8 (a frame predicted whole,
padded to a multiple of 32). Its clock counts training only: at each budget it is
stopped, scored on the test images, and goes on (no schedule depends on the budget).

marsviewer trains the ``cpu`` preset with ``--minutes`` set to each budget, one run per
budget as a user would (its schedule fits the budget; the validation it runs is inside
the budget), and its best checkpoint is scored on the same test images.

Both are scored alike: the mean IoU over classes 1-4 of the test images' confusion
matrix (pixels labelled 0 left out), a class predicted but never labelled counting 0.

Two datasets, made by the generator, each split once into training and test images:

* ``competition``: the competition's format, 2,300 training and 315 test images of
  64x128 (an npz);
* ``frames``: a folder of 500x560 frames labelled soil against big rock only (as rover
  frames often are): FRAMES_TRAIN training frames, FRAMES_TEST test frames.

Both tools run in this one process, one after the other, on the same threads and the
same torch. Needs ``segmentation-models-pytorch`` (``make bench`` installs it in a venv
of its own, ``.venv-peer``, since it brings torchvision).

    python bench/peer.py [--minutes 1,2,4,8] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _report import report

from trainer import events as ev
from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.config import preset
from trainer.engine import fit
from trainer.formats import open_dataset, write_npz
from trainer.inference import predict_arrays
from trainer.metrics import confusion_matrix, metrics_from_confusion
from trainer.synth import Site, generate
from trainer.tiling import predict_any

N_CLASSES = 5
COMPETITION_TRAIN, COMPETITION_TEST = 2300, 315
FRAMES_TRAIN, FRAMES_TEST = 90, 30
FRAME = (500, 560)
PEER_LR = 1e-3
PEER_BATCH = {"competition": 16, "frames": 8}
PEER_CROP = 256


# -- the data ---------------------------------------------------------------------------------


def make_data(name: str, tmp: Path):
    """(training path for marsviewer, training images, training masks, test images, test masks)."""
    if name == "competition":
        ds = generate(COMPETITION_TRAIN + COMPETITION_TEST, 0, seed=11).dataset
        n = COMPETITION_TRAIN
        path = tmp / "competition.npz"
        write_npz(path, ds.images[:n], ds.masks[:n], ds.images[n:], dtype="uint8")
        return path, ds.images[:n], ds.masks[:n], ds.images[n:], ds.masks[n:]
    from PIL import Image

    rocky = Site(rock_rate=0.8)
    ds = generate(FRAMES_TRAIN + FRAMES_TEST, 0, seed=12, shape=FRAME, plant_problems=False, site=rocky,
                  labels="soil-rock").dataset  # fmt: skip
    n = FRAMES_TRAIN
    root = tmp / "frames"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(ds.images[i]).save(root / "images" / f"frame{i:03d}.png")
        Image.fromarray(ds.masks[i]).save(root / "masks" / f"frame{i:03d}.png")
    return root, ds.images[:n], ds.masks[:n], ds.images[n:], ds.masks[n:]


def score(pred: np.ndarray, truth: np.ndarray, absent=()) -> dict:
    m = metrics_from_confusion(confusion_matrix(pred, truth, N_CLASSES).tolist(), absent)
    return {"miou": round(m["miou"], 4), "iou": [None if v != v else round(v, 4) for v in m["iou"]]}


# -- marsviewer -------------------------------------------------------------------------------


def marsviewer_run(train_path: Path, minutes: float, test_images, test_masks, run_dir: Path) -> dict:
    ds = open_dataset(train_path)
    cfg = preset("cpu").replace(minutes=minutes)
    steps, data, finished = 0, "", None
    t0 = time.perf_counter()
    for e in fit(ds, cfg, run_dir):
        if isinstance(e, ev.Started):
            data = e.data
        elif isinstance(e, ev.Step):
            steps = e.step
        elif isinstance(e, ev.Finished):
            finished = e
    seconds = time.perf_counter() - t0
    model, _ = model_from_checkpoint(load_checkpoint(finished.best_checkpoint))
    if test_images.shape[1:] == (64, 128):
        pred = predict_arrays(model, test_images)["masks"]
    else:
        pred = np.stack([predict_any(model, im, "cpu").argmax(0) for im in test_images]).astype(np.uint8)
    return {"minutes": minutes, **score(pred, test_masks, model.absent()), "steps": steps,
            "seconds": round(seconds, 1), "data": data, "left_out": model.absent()}  # fmt: skip


# -- the peer ---------------------------------------------------------------------------------


def _pad32(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % 32, (-w) % 32
    return (F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x), h, w


@torch.no_grad()
def peer_predict(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    out = []
    step = 32 if images.shape[1:] == (64, 128) else 1
    for s in range(0, len(images), step):
        x = torch.from_numpy(images[s : s + step]).float().div_(255).unsqueeze(1)
        x, h, w = _pad32(x)
        out.append(model(x)[..., :h, :w].argmax(1).to(torch.uint8).numpy())
    model.train()
    return np.concatenate(out)


def peer_batch(rng, images, masks, batch: int, crop: int | None):
    idx = rng.integers(len(images), size=batch)
    if crop is None:
        x, y = images[idx], masks[idx]
    else:
        h, w = images.shape[1:]
        ys, xs = rng.integers(h - crop + 1, size=batch), rng.integers(w - crop + 1, size=batch)
        x = np.stack([images[i, a : a + crop, b : b + crop] for i, a, b in zip(idx, ys, xs, strict=True)])
        y = np.stack([masks[i, a : a + crop, b : b + crop] for i, a, b in zip(idx, ys, xs, strict=True)])
    if rng.random() < 0.5:
        x, y = x[:, :, ::-1], y[:, :, ::-1]
    if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255).unsqueeze(1)
    return x, torch.from_numpy(np.ascontiguousarray(y)).long()


def peer_run(name: str, images, masks, test_images, test_masks, budgets: list[float]) -> list[dict]:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=N_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=PEER_LR)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=0)
    crop = None if images.shape[1:] == (64, 128) else PEER_CROP
    batch = PEER_BATCH[name]
    trained, steps, out = 0.0, 0, []
    for minutes in sorted(budgets):
        while trained < minutes * 60:
            t = time.perf_counter()
            x, y = peer_batch(rng, images, masks, batch, crop)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trained += time.perf_counter() - t
            steps += 1
        pred = peer_predict(model, test_images)
        out.append({"minutes": minutes, **score(pred, test_masks), "steps": steps, "batch": batch})
        print(f"peer {name} {minutes} min: {out[-1]}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", default="1,2,4,8", help="training budgets, comma-separated")
    p.add_argument("--datasets", default="competition,frames")
    p.add_argument("--json")
    args = p.parse_args()
    budgets = [float(m) for m in args.minutes.split(",")]
    import segmentation_models_pytorch as smp

    result = {
        "budgets": budgets,
        "peer": f"segmentation_models_pytorch {smp.__version__} Unet(resnet18, no pretrained weights), "
        f"AdamW lr {PEER_LR}, cross-entropy ignoring 0, flips, fp32",
        "threads": torch.get_num_threads(),
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            path, images, masks, test_images, test_masks = make_data(name, Path(tmp))
            mars = []
            for k, minutes in enumerate(budgets):
                mars.append(
                    marsviewer_run(path, minutes, test_images, test_masks, Path(tmp) / f"{name}-run{k}")
                )
                print(f"marsviewer {name} {minutes} min: {mars[-1]}", file=sys.stderr, flush=True)
            peer = peer_run(name, images, masks, test_images, test_masks, budgets)
            result["datasets"][name] = {
                "train": len(images),
                "test": len(test_images),
                "size": list(images.shape[1:]),
                "marsviewer": mars,
                "peer": peer,
                "ahead_at_every_budget": all(a["miou"] > b["miou"] for a, b in zip(mars, peer, strict=True)),
            }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
