"""One frozen training configuration: it generates the CLI flags (and later the GUI form),
is saved in every run directory and checkpoint, and refuses unknown keys or bad values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib


class ConfigError(ValueError):
    """An invalid configuration; the message lists what is valid."""


def _opt(default, help: str, choices: tuple | None = None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


# Images per forward pass when predicting 64x128 images: larger batches stop paying once a
# batch's activations leave the CPU's caches (bench/train_throughput.py measures
# predict_img_s). Larger images go fewer to a batch, about as many pixels (inference.predict_batch).
PREDICT_BATCH = 32
# On a GPU (bench/train_throughput.py, two runs on an H200, gpu preset): 256 images of
# 64x128 a batch predicted 3.5x and 4.8x faster than 32; 512 and 1024 were 9% faster at
# best in one run, 1024 2.6x slower in the other.
GPU_PREDICT_BATCH = 256

LOSS_NAMES = ("ce", "focal", "dice", "tversky", "focal_tversky", "lovasz")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the ``cpu`` preset."""

    # -- model
    depth: int = _opt(3, "U-Net levels (downsamplings)")
    base_width: int = _opt(16, "channels of the first level; doubled at each level")
    norm: str = _opt("batch", "normalisation layer", ("batch", "group", "none"))
    residual: bool = _opt(False, "residual convolution blocks")
    squeeze_excitation: bool = _opt(False, "squeeze-and-excitation after each block")
    attention_gates: bool = _opt(False, "attention gates on the skip connections")
    dropout: float = _opt(0.0, "dropout before the classifier")
    # -- loss
    loss: str = _opt(
        "ce:1,dice:1", f"weighted sum of losses, e.g. 'ce:1,dice:0.5'; names: {', '.join(LOSS_NAMES)}"
    )
    background_weight: float = _opt(0.0, "loss weight of background pixels (0 ignores them, like the metric)")
    class_weighting: str = _opt(
        "sqrt_inverse", "class weights from pixel frequency", ("none", "sqrt_inverse")
    )
    focal_gamma: float = _opt(2.0, "focal loss exponent (Lin et al. 2017)")
    tversky_alpha: float = _opt(0.3, "Tversky weight of false positives (Salehi et al. 2017)")
    tversky_beta: float = _opt(0.7, "Tversky weight of false negatives")
    focal_tversky_gamma: float = _opt(
        0.75, "focal Tversky exponent: loss = (1 - TI)^gamma (Abraham & Khan 2019)"
    )
    # -- optimisation
    epochs: int = _opt(20, "training epochs (an epoch draws as many images as the training split holds)")
    minutes: float = _opt(
        0.0, "time budget in minutes, the final validation included; when > 0 it replaces epochs"
    )
    batch_size: int = _opt(32, "images per step (per process under torchrun)")
    lr: float = _opt(2e-3, "peak learning rate of AdamW")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    schedule: str = _opt("cosine", "learning-rate schedule", ("cosine", "plateau", "constant"))
    warmup_steps: int = _opt(50, "linear warm-up steps")
    patience: int = _opt(0, "early stopping: validations without mIoU improvement (0 = off)")
    val_fraction: float = _opt(0.1, "share of images held out for validation (stratified)")
    val_every: int = _opt(1, "validate every N epochs")
    log_every: int = _opt(1, "emit a step event every N steps (reading the loss back syncs a GPU)")
    # -- data
    augment: bool = _opt(True, "on-device augmentation (flips, small affine, photometric, noise)")
    hflip: bool = _opt(True, "horizontal flips")
    max_rotation: float = _opt(8.0, "largest rotation in degrees")
    max_scale: float = _opt(0.1, "largest zoom in or out (0.1 = 10%)")
    max_shift: float = _opt(0.06, "largest shift as a share of the image size")
    photometric: float = _opt(1.0, "strength of brightness/contrast/gamma/noise changes (0 = off)")
    oversample: float = _opt(
        0.5, "oversample images with rare classes: weight = (1/frequency)^this (0 = off)"
    )
    tile: int = _opt(
        0,
        "train on random crops of TILE x TILE pixels at native resolution, half of them around "
        "rare classes, read by background threads (0: whole images up to 256 pixels a side; larger "
        "frames, and a dataset too large for memory, train on crops of 256 unless set)",
    )
    data_workers: int = _opt(2, "threads that read crops from disk ahead of training (with tile)")
    crop_batch: int = _opt(
        0,
        "crops per step (with tile; 0: as many pixels as batch_size images of 64x128, such as 4 crops "
        "of 256x256 for a batch size of 32: as fast per pixel as small images, in a quarter of the memory)",
    )
    # -- run
    seed: int = _opt(0, "random seed: runs with the same seed and device are repeatable")
    device: str = _opt("auto", "auto picks CUDA, then Apple MPS, then CPU", ("auto", "cpu", "cuda", "mps"))
    precision: str = _opt(
        "auto",
        "autocast precision; auto picks bf16 on GPUs and on CPUs that compute bf16 natively, else fp32",
        ("auto", "fp32", "bf16"),
    )
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)")
    cuda_graph: bool = _opt(
        True, "on CUDA, replay each training step as one CUDA graph (one process, images in GPU memory)"
    )
    checkpoint_every: int = _opt(1, "save checkpoints/last every N epochs")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **changes})


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"ce:1,dice:0.5"`` -> ``[("ce", 1.0), ("dice", 0.5)]``."""
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip().lower()
        if name not in LOSS_NAMES:
            raise ConfigError(f"loss: unknown loss {name!r}; valid: {', '.join(LOSS_NAMES)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"loss: weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"loss: weight of {name!r} must be a finite number >= 0, got {weight.strip()}")
        terms.append((name, w))
    if not terms or sum(w for _, w in terms) <= 0:
        raise ConfigError(f"loss: {spec!r} has no positive term; e.g. 'ce:1,dice:1'")
    return terms


_POSITIVE = (
    "depth",
    "base_width",
    "batch_size",
    "val_every",
    "log_every",
    "checkpoint_every",
    "data_workers",
)
_NON_NEGATIVE = (
    "tile",
    "crop_batch",
    "epochs",
    "minutes",
    "weight_decay",
    "warmup_steps",
    "patience",
    "threads",
    "background_weight",
    "max_rotation",
    "max_scale",
    "max_shift",
    "photometric",
    "oversample",
    "focal_gamma",
    "tversky_alpha",
    "tversky_beta",
    "focal_tversky_gamma",
)


def validate(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}: must be a finite number, got {value}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: {value!r} is not valid; valid: {', '.join(choices)}")
    for name in _POSITIVE:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.tile and cfg.tile % 2**cfg.depth:
        raise ConfigError(f"tile: must be a multiple of 2**depth = {2**cfg.depth}, got {cfg.tile}")
    if cfg.depth > 6:
        raise ConfigError(f"depth: at most 6, got {cfg.depth}")
    if not 0 < cfg.lr < 1:
        raise ConfigError(f"lr: must be between 0 and 1, got {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout: must be in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.val_fraction < 0.9:
        raise ConfigError(f"val_fraction: must be in (0, 0.9), got {cfg.val_fraction}")
    if cfg.epochs == 0 and cfg.minutes == 0:
        raise ConfigError("epochs and minutes are both 0: give one of them")
    if cfg.norm == "group" and cfg.base_width % 8:
        raise ConfigError(
            f"norm 'group' uses 8 groups: base_width must be a multiple of 8, got {cfg.base_width}"
        )
    parse_loss_spec(cfg.loss)


PRESETS: dict[str, dict[str, Any]] = {
    # Trains in seconds on a few dozen images: for tests and trying things out.
    "tiny": dict(depth=2, base_width=8, epochs=4, batch_size=4, lr=5e-3, warmup_steps=2, log_every=1),
    # The default on CPU: a small U-Net (depth 3, base width 16), cross-entropy + Dice.
    "cpu": dict(),
    # The default on CUDA: deeper and wider, squeeze-excitation blocks, bigger batches.
    "gpu": dict(
        depth=4,
        base_width=32,
        squeeze_excitation=True,
        batch_size=128,
        lr=2e-3,
        epochs=60,
        warmup_steps=100,
        log_every=20,
    ),
    # A course team's published final model on the competition (test mIoU 0.503): a
    # depth-4 U-Net trained with focal Tversky loss on all five classes (background
    # included, no class weights), augmentation drawn anew every epoch and oversampling
    # of images with the rare class; Adam at 1e-3, halved when validation stalls.
    "course": dict(
        depth=4,
        base_width=32,
        loss="focal_tversky:1",
        background_weight=1.0,
        class_weighting="none",
        oversample=0.5,
        lr=1e-3,
        weight_decay=0.0,
        schedule="plateau",
        warmup_steps=0,
        epochs=40,
    ),
}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a config, refusing unknown keys and values of the wrong type."""
    valid = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    clean = {}
    for key, value in values.items():
        expected = type(valid[key].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"{where}: {key} must be {expected.__name__}, got {value!r} ({type(value).__name__})"
            )
        clean[key] = value
    return TrainConfig(**clean)


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return from_dict(PRESETS[name], where=f"preset {name}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file: top-level keys, or a ``[train]`` table."""
    from .dataset import not_a_regular_file

    path = Path(path)
    why = not_a_regular_file(path)
    if why and why != "no such file":
        raise ConfigError(f"{path}: {why} (a TOML config file)")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if "train" in data and isinstance(data["train"], dict):
        data = data["train"]
    return data


def to_toml(cfg: TrainConfig) -> str:
    lines = []
    for key, value in cfg.to_dict().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def build(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    device_kind: str = "cpu",
) -> TrainConfig:
    """Preset (by default ``gpu`` on CUDA, else ``cpu``) < config file < overrides."""
    name = preset_name or ("gpu" if device_kind == "cuda" else "cpu")
    values = dict(PRESETS[name]) if name in PRESETS else preset(name).to_dict()
    if config_file:
        values.update(load_toml(config_file))
        where = str(config_file)
    else:
        where = "config"
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(values, where=where)
