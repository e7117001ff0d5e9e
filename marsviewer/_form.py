"""A Qt form generated from the trainer's config dataclass (names, types, choices, help)."""

from __future__ import annotations

from dataclasses import fields

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox, QWidget

from trainer.config import PRESETS, TrainConfig, preset

# The fields a person tunes most; the rest keep the preset's values.
SHOWN = (
    "epochs",
    "minutes",
    "batch_size",
    "lr",
    "loss",
    "background_weight",
    "class_weighting",
    "augment",
    "oversample",
    "depth",
    "base_width",
    "attention_gates",
    "squeeze_excitation",
)
LABELS = {"lr": "learning rate", "oversample": "oversample power", "minutes": "minutes (0 = use epochs)"}


def list_devices() -> list[tuple[str, str]]:
    """(label, config value) pairs: the GPUs torch sees, then CPU."""
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"GPU {i}: {torch.cuda.get_device_name(i)}", "cuda"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(("Apple GPU (MPS)", "mps"))
    out.append(("CPU", "cpu"))
    return out


class ConfigForm(QWidget):
    """Preset, device and the SHOWN fields of :class:`TrainConfig`, each with its help as tooltip."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.devices = list_devices()
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(PRESETS))
        layout.addRow("preset", self.preset_combo)
        self.device_combo = QComboBox()
        for label, value in self.devices:
            self.device_combo.addItem(label, value)
        layout.addRow("device", self.device_combo)
        self.editors: dict[str, QWidget] = {}
        meta = {f.name: f for f in fields(TrainConfig)}
        for name in SHOWN:
            f = meta[name]
            default, choices = f.default, f.metadata.get("choices")
            if choices:
                w = QComboBox()
                w.addItems(list(choices))
            elif isinstance(default, bool):
                w = QCheckBox()
            elif isinstance(default, int):
                w = QSpinBox()
                w.setRange(0, 100000)
            elif isinstance(default, float):
                w = QDoubleSpinBox()
                w.setDecimals(5 if name == "lr" else 3)
                w.setSingleStep(0.0005 if name == "lr" else 0.1)
                w.setRange(0.0, 10000.0)
            else:
                w = QLineEdit()
            w.setToolTip(f.metadata.get("help", ""))
            self.editors[name] = w
            layout.addRow(LABELS.get(name, name.replace("_", " ")), w)
        gpu = self.devices[0][1] == "cuda"
        self.preset_combo.setCurrentText("gpu" if gpu else "cpu")
        self.preset_combo.currentTextChanged.connect(self.load_preset)
        self.load_preset(self.preset_combo.currentText())

    def load_preset(self, name: str) -> None:
        self.set_values(preset(name))

    def set_values(self, cfg: TrainConfig) -> None:
        for name, w in self.editors.items():
            value = getattr(cfg, name)
            if isinstance(w, QComboBox):
                w.setCurrentText(str(value))
            elif isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                w.setValue(value)
            else:
                w.setText(str(value))

    def config(self) -> TrainConfig:
        """The preset with the form's values; raises ``ConfigError`` on invalid values."""
        values = {}
        for name, w in self.editors.items():
            if isinstance(w, QComboBox):
                values[name] = w.currentText()
            elif isinstance(w, QCheckBox):
                values[name] = w.isChecked()
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                values[name] = w.value()
            else:
                values[name] = w.text()
        values["device"] = self.device_combo.currentData()
        return preset(self.preset_combo.currentText()).replace(**values)
