"""A trained model as a file that runs without this package: TorchScript or ONNX.

The exported model takes an image batch and returns class logits (N, 5, H, W):

* TorchScript: (N, H, W) or (N, 1, H, W), uint8 (0..255) or float (0..1), or RGB batches
  (N, 3, H, W) turned into luma as in training;
* ONNX: (N, 1, H, W) float32 in 0..1 (ONNX fixes an input's type; divide uint8 by 255).

Any height and width of at least 2**depth pixels: the input is padded to a multiple of
2**depth by reflection and the logits cropped back, as the U-Net does itself.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("torchscript", "onnx")


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not predict what the checkpoint does."""


class _Padded(nn.Module):
    """Float (N, 1, H, W) in 0..1 -> logits, padding to a multiple of ``multiple``."""

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h = (self.multiple - h % self.multiple) % self.multiple
        pad_w = (self.multiple - w % self.multiple) % self.multiple
        x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect")
        return self.net(x)[:, :, :h, :w]


class _AnyInput(nn.Module):
    """uint8 or float, (N, H, W), (N, 1, H, W) or (N, 3, H, W) -> logits."""

    def __init__(self, padded: nn.Module) -> None:
        super().__init__()
        self.padded = padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            x = x.float()
        if x.shape[1] == 3:
            x = x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114  # training's luma rule
        return self.padded(x)


def _reference(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).unsqueeze(1).float() / 255.0).argmax(1).numpy()


def check_images(seed: int = 0) -> list[np.ndarray]:
    """Test batches of two sizes, one not a multiple of the U-Net's stride."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (2, 64, 128), dtype=np.uint8),
        rng.integers(0, 256, (1, 45, 77), dtype=np.uint8),
    ]


def export(model: nn.Module, fmt: str, out: str | Path, images: list[np.ndarray] | None = None) -> float:
    """Write ``model`` (a U-Net in eval mode on the CPU) to ``out`` as ``fmt`` and check it:
    returns the share of pixels where the export's arg-max equals the model's on ``images``
    (random test batches by default); raises ExportError below 0.999."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    model = model.float().eval().to("cpu", memory_format=torch.contiguous_format)
    multiple = 2**model.depth
    images = images if images is not None else check_images()
    out = Path(out)
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            # TorchScript is deprecated in favour of torch.export, but it is still what
            # most deployment code loads; the U-Net's own padding branch is never taken
            # in the trace (the wrapper pads first), which the TracerWarning is about.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, torch.rand(1, 1, 64, 128), check_trace=False)
            scripted = torch.jit.script(_AnyInput(_Padded(traced, multiple)))
        # Serialised in memory and written by Python: torch's own file writer aborts the
        # process (in C++) on a full disk instead of raising.
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # as for torch.jit.script above
            torch.jit.save(scripted, buffer)
        with open(out, "wb") as f:
            f.write(buffer.getbuffer())
        run = _torchscript_runner(out)
    else:
        _export_onnx(_Padded(model, multiple).eval(), out)
        run = _onnx_runner(out)
    same = total = 0
    for batch in images:
        want = _reference(model, batch)
        got = run(batch)
        same += int((got == want).sum())
        total += want.size
    agreement = same / total
    if agreement < 0.999:
        raise ExportError(
            f"{out}: the export agrees with the checkpoint on only {100 * agreement:.2f}% of pixels"
        )
    return agreement


def _torchscript_runner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path))

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(batch)).argmax(1).numpy()

    return run


def _export_onnx(module: nn.Module, out: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
            "pip install 'marsviewer[onnx]'"
        ) from None
    multiple = module.multiple
    h, w = torch.export.Dim("height", min=multiple), torch.export.Dim("width", min=multiple)
    n = torch.export.Dim("batch", min=1)
    example = torch.rand(2, 1, 64, 128)
    quiet = logging.getLogger("torch.onnx")  # notes on torchvision ops this model does not use
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: n, 2: h, 3: w},),
            verbose=False,
        )
    quiet.setLevel(level)
    program.save(str(out))


def _onnx_runner(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "checking the ONNX export needs onnxruntime: pip install 'marsviewer[onnx]'"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        x = (batch.astype(np.float32) / 255.0)[:, None]
        return session.run(None, {"image": x})[0].argmax(1)

    return run
