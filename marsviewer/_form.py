"""The training form, generated with magicgui from the trainer's config dataclass: each
field's name, type, choices and help become a widget, its label and its tooltip, and the
form's values go back through :meth:`TrainConfig.replace`, so the messages for bad values
are the CLI's."""

from __future__ import annotations

from dataclasses import Field, fields

from magicgui.widgets import ComboBox, Container, Widget, create_widget

from trainer.config import LOSS_NAMES, PRESETS, TrainConfig, preset

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
# Spin-box steps (the number of decimals shown follows the step).
STEPS = {"lr": 0.0005, "minutes": 0.5}


def list_devices() -> list[tuple[str, str]]:
    """(label, config value) pairs: the GPU torch sees first, then CPU."""
    import torch

    out = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        more = f" (+{n - 1} more through torchrun)" if n > 1 else ""
        out.append((f"GPU: {torch.cuda.get_device_name(0)}{more}", "cuda"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(("Apple GPU (MPS)", "mps"))
    out.append(("CPU", "cpu"))
    return out


def field_widget(f: Field) -> Widget:
    """The magicgui widget for one config field: a combo box where the field has choices,
    else the widget magicgui picks for the default's type, bounded at zero."""
    default, help_text = f.default, f.metadata.get("help", "")
    label = LABELS.get(f.name, f.name.replace("_", " "))
    if f.name == "loss":
        help_text += f" (the registry's names: {', '.join(LOSS_NAMES)})"
    options: dict = {"tooltip": help_text}
    if f.metadata.get("choices"):
        options["choices"] = list(f.metadata["choices"])
        return create_widget(default, name=f.name, label=label, widget_type="ComboBox", options=options)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        options.update(min=0, max=100_000)
        if isinstance(default, float):
            options["step"] = STEPS.get(f.name, 0.1)
    return create_widget(default, annotation=type(default), name=f.name, label=label, options=options)


class ConfigForm(Container):
    """Preset, device and the SHOWN fields of :class:`TrainConfig`. ``.native`` is the QWidget."""

    def __init__(self) -> None:
        self.devices = list_devices()
        meta = {f.name: f for f in fields(TrainConfig)}
        self.editors: dict[str, Widget] = {name: field_widget(meta[name]) for name in SHOWN}
        gpu = self.devices[0][1] == "cuda"
        self.preset = ComboBox(
            name="preset",
            choices=list(PRESETS),
            value="gpu" if gpu else "cpu",
            tooltip="starting values for every field; changing it reloads them",
        )
        self.device = ComboBox(name="device", choices=self.devices, value=self.devices[0][1])
        super().__init__(widgets=[self.preset, self.device, *self.editors.values()], labels=True)
        self.margins = (0, 0, 0, 0)
        self.preset.changed.connect(self.load_preset)
        self.load_preset(self.preset.value)

    def load_preset(self, name: str) -> None:
        self.set_values(preset(name))

    def set_values(self, cfg: TrainConfig) -> None:
        for name, w in self.editors.items():
            w.value = getattr(cfg, name)

    def config(self) -> TrainConfig:
        """The preset with the form's values; raises ``ConfigError`` on invalid values."""
        values = {name: w.value for name, w in self.editors.items()}
        values["device"] = self.device.value
        return preset(self.preset.value).replace(**values)
