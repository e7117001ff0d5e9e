"""Checkpoints that load without unpickling arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with
``torch.save`` and read with ``torch.load(weights_only=True)``: a file that would run code
when loaded is refused. Files are written to a temporary name and renamed, so a crash
mid-write never replaces the last good checkpoint.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .classes import COMPETITION, ClassTable, ClassTableError, both_tables
from .config import ConfigError, TrainConfig, from_dict
from .dataset import not_a_regular_file
from .model import UNet, build_model

FORMAT = "marsviewer-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, not a checkpoint, unsafe or incompatible."""


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: TrainConfig,
    classes: ClassTable = COMPETITION,
    **state: Any,
) -> Path:
    """Atomically write a checkpoint: weights, config, class table (with the classes the
    model leaves out: not in its training labels) and any extra state (optimizer, epoch,
    step, split, best mIoU...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes],
        "absent_classes": module.absent() if hasattr(module, "absent") else [],
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        **state,
    }
    tmp = path.with_name(path.name + ".tmp")
    # Serialised in memory and written by Python, which raises on a full disk (torch's
    # own file writer aborts the process in C++ there).
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def adopt_best(best: Path, resumed: str | Path, best_miou: float) -> bool:
    """Resuming into another run directory: copy the resumed run's best checkpoint (the
    ``best.pt`` beside ``resumed``) to ``best`` when there is none there yet and it holds
    the best mIoU the resumed state knows, so that the new run directory has its best
    weights even if no epoch of its own beats them. True when copied."""
    import shutil

    source = Path(resumed).with_name(best.name)
    if best.exists() or not source.is_file() or source.resolve() == best.resolve():
        return False
    try:
        data = load_checkpoint(source)
    except CheckpointError:
        return False
    if data.get("miou") != best_miou:  # a best of another run, or of a later state
        return False
    tmp = best.with_name(best.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, best)
    return True


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely. Raises :class:`CheckpointError` with a plain message."""
    path = Path(path)
    why = not_a_regular_file(path)
    if why == "no such file":
        raise CheckpointError(f"{path}: no such checkpoint file")
    if why:
        raise CheckpointError(f"{path}: {why} (a checkpoint)")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of files it will refuse anyway.
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: refused: the file contains objects other than weights and plain data, "
            f"and loading it could run code ({first[:160]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:160]})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a marsviewer checkpoint (expected a file written by mars-trainer train)"
        )
    try:
        data["config_obj"] = from_dict(data["config"], where=f"{path} config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        data["class_table"] = (
            ClassTable.from_records(data["classes"], f"{path}: its class table")
            if "classes" in data
            else COMPETITION
        )
    except ClassTableError as exc:
        raise CheckpointError(str(exc)) from None
    weights = data.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds no model weights (a damaged or foreign checkpoint)")
    broken = [
        k
        for k, v in weights.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} weight tensor(s) hold NaN or infinite values ({', '.join(broken[:3])}); "
            "the model diverged or the file is damaged: use an earlier checkpoint"
        )
    return data


def check_classes(
    data: dict, classes: ClassTable | None, path: str | Path, dataset: str = "the dataset"
) -> None:
    """Refuse a checkpoint whose class table is not ``classes`` (a dataset's), naming both:
    its ids would mean other classes there."""
    if classes is None:
        return
    theirs = data.get("class_table", COMPETITION)
    if not theirs.same_classes(classes):
        raise CheckpointError(
            f"{path}: a model of other classes than {dataset}'s: "
            + both_tables(theirs, classes, "the checkpoint's", f"{dataset}'s")
            + "; use a checkpoint trained on data of this class table"
        )


def model_from_checkpoint(
    data: dict,
    path: str | Path = "checkpoint",
    classes: ClassTable | None = None,
    dataset: str = "the dataset",
) -> tuple[UNet, TrainConfig]:
    """The checkpoint's model (in training mode, on the CPU) and config; with ``classes``
    (the table of the data it is to be applied to) a checkpoint of another table is refused."""
    check_classes(data, classes, path, dataset)
    cfg = data["config_obj"]
    model = build_model(cfg, len(data.get("class_table", COMPETITION)))
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the weights do not fit the architecture in its config "
            f"(depth {cfg.depth}, base width {cfg.base_width}): {str(exc).splitlines()[0][:200]}"
        ) from None
    return model, cfg


def check_compatible(data: dict, cfg: TrainConfig, path: str | Path) -> None:
    """Refuse to resume a checkpoint into a different architecture."""
    from .model import MODEL_KEYS

    old = data["config_obj"]
    diffs = [
        f"{k}: checkpoint {getattr(old, k)!r}, asked {getattr(cfg, k)!r}"
        for k in MODEL_KEYS
        if getattr(old, k) != getattr(cfg, k)
    ]
    if diffs:
        raise CheckpointError(f"{path}: a checkpoint of another architecture ({'; '.join(diffs)})")
