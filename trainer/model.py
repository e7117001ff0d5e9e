"""U-Net (Ronneberger et al. 2015) for grayscale terrain, trained from scratch.

Optional blocks: residual convolutions (He et al. 2016), squeeze-and-excitation (Hu et al.
2018) and attention gates on the skip connections (Oktay et al. 2018). Inputs whose size
is not divisible by 2**depth are padded (reflect) and the output cropped back.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .classes import NUM_CLASSES
from .config import TrainConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool -> bottleneck MLP -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and ReLU; optionally residual and SE."""

    def __init__(self, cin: int, cout: int, norm: str, residual: bool, se: bool) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, cout)
        self.skip = (
            (nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()) if residual else None
        )
        self.se = SqueezeExcitation(cout) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        if self.se is not None:
            y = self.se(y)
        if self.skip is not None:
            y = y + self.skip(x)
        return F.relu(y, inplace=True)


class AttentionGate(nn.Module):
    """Additive attention on a skip connection, gated by the coarser decoder features."""

    def __init__(self, skip_ch: int, gate_ch: int) -> None:
        super().__init__()
        inter = max(skip_ch // 2, 4)
        self.theta = nn.Conv2d(skip_ch, inter, 1, bias=False)
        self.phi = nn.Conv2d(gate_ch, inter, 1)
        self.psi = nn.Conv2d(inter, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.theta(skip) + self.phi(gate), inplace=True)
        return skip * torch.sigmoid(self.psi(a))


class _ChannelCat(torch.autograd.Function):
    """``torch.cat([a, b], dim=1)`` whose backward hands each input a gradient of its own
    in the layout of the incoming one, not a slice of it. In channels_last, a channel
    slice is strided: the ops downstream of it (the skip's gradient sum, the upsampling's
    backward) then run several times slower than on a tensor of their own (on CPU, 3.5 ms
    against 0.4 for a sum at the first level), more than the copy costs."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.split = a.shape[1]
        return torch.cat([a, b], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cl = grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
        fmt = torch.channels_last if cl else torch.contiguous_format
        a, b = grad[:, : ctx.split], grad[:, ctx.split :]
        return a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)


def _cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.requires_grad or b.requires_grad:
        return _ChannelCat.apply(a, b)
    return torch.cat([a, b], dim=1)  # inference, tracing and export: the plain op


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling in the dtype it is given. Autocast would run it in fp32: on a
    GPU the fp32 kernels and the casts around them, and the concatenation with the skip
    that then runs in fp32 too, took 2 of a step's 15.6 ms (bf16 training, H200)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# Added to the logit of a class the training labels never held: its probability is 0 (to
# float32's precision) and it is never the arg-max, in training, validation, prediction and
# every exported model alike. Finite, so a loss over such logits stays finite; within
# float16's and bfloat16's range.
ABSENT_LOGIT = -1.0e4


def _default_class_offset(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before classes could be left out hold no ``class_offset``:
    their models predicted every class."""
    key = prefix + "class_offset"
    if key not in state_dict and isinstance(getattr(module, "class_offset", None), torch.Tensor):
        state_dict[key] = torch.zeros_like(module.class_offset)


class UNet(nn.Module):
    """U-Net mapping (B, 1, H, W) images in [0, 1] to (B, classes, H, W) logits.

    Classes the training labels never held are left out of its predictions: their logits
    are offset by :data:`ABSENT_LOGIT` (:meth:`set_absent`), a buffer saved with the
    weights, so every copy of the model (a checkpoint, a TorchScript or ONNX export)
    leaves them out too.
    """

    def __init__(
        self,
        depth: int = 3,
        base_width: int = 16,
        norm: str = "batch",
        residual: bool = False,
        squeeze_excitation: bool = False,
        attention_gates: bool = False,
        dropout: float = 0.0,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        block = lambda i, o: ConvBlock(i, o, norm, residual, squeeze_excitation)  # noqa: E731
        self.encoders = nn.ModuleList([block(in_channels, widths[0])])
        self.encoders.extend(block(widths[i], widths[i + 1]) for i in range(depth))
        self.reduce = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(depth))
        self.gates = nn.ModuleList(
            AttentionGate(widths[i], widths[i]) if attention_gates else nn.Identity() for i in range(depth)
        )
        self.decoders = nn.ModuleList(block(2 * widths[i], widths[i]) for i in range(depth))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.register_buffer("class_offset", torch.zeros(num_classes, 1, 1))
        self.register_load_state_dict_pre_hook(_default_class_offset)

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    def set_absent(self, absent) -> None:
        """Leave the classes ``absent`` (ids) out of every prediction from now on; in place,
        so a step replayed as a CUDA graph sees it. Class 0 ("not labelled") is never left out."""
        offset = torch.zeros_like(self.class_offset)
        for c in absent:
            if 0 < int(c) < self.num_classes:
                offset[int(c)] = ABSENT_LOGIT
        self.class_offset.copy_(offset)

    def absent(self) -> list[int]:
        """The ids left out of predictions (not in the training labels)."""
        return [int(c) for c in torch.nonzero(self.class_offset.reshape(-1) < 0).reshape(-1)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's output at each level, finest first, for an input whose size is a
        multiple of 2**depth."""
        # Fixed normalisation inside the model, so a checkpoint is self-contained.
        x = (x - 0.5) * 4.0
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        skips = self.encode(x)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            skip = skips[i]
            # 1x1 conv + bilinear upsampling: no checkerboard artefacts, fewer weights than
            # a transposed convolution. Both are linear and the interpolation weights sum
            # to 1, so they commute: reducing first is the same function (the same
            # checkpoints) with the conv on a quarter of the pixels and half the channels
            # to upsample.
            x = _upsample(self.reduce[i](x), skip.shape[-2:])
            if isinstance(self.gates[i], AttentionGate):
                skip = self.gates[i](skip, x)
            x = self.decoders[i](_cat_channels(skip, x))
        x = self.head(self.dropout(x))
        x = x + self.class_offset.to(x.dtype)
        return x[..., :h, :w]


MODEL_KEYS = ("depth", "base_width", "norm", "residual", "squeeze_excitation", "attention_gates", "dropout")


def build_model(cfg: TrainConfig, num_classes: int = NUM_CLASSES) -> UNet:
    return UNet(**{k: getattr(cfg, k) for k in MODEL_KEYS}, num_classes=num_classes)


def absent_classes(model: nn.Module) -> list[int]:
    """The class ids ``model`` leaves out of its predictions (none for a model that is not
    a :class:`UNet`, such as a loaded TorchScript file)."""
    module = getattr(model, "module", model)  # DistributedDataParallel
    return module.absent() if isinstance(module, UNet) else []


def output_classes(model: nn.Module) -> int | None:
    """How many classes ``model`` scores (None when it cannot say)."""
    module = getattr(model, "module", model)
    return module.num_classes if isinstance(module, UNet) else None


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in which each :class:`ConvBlock`'s batch norms are
    folded into the convolutions before them (``w * g / sqrt(var + eps)``, ``b' = beta -
    mean * g / sqrt(var + eps)``): the same outputs as the model in eval mode up to
    rounding, without the normalisation passes (~15% faster inference on CPU). The model
    passed in keeps its mode: one without batch norms is returned as it is when it is in
    eval mode already (a model made for inference, folded again), else as an eval-mode copy."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    blocks = [m for m in model.modules() if isinstance(m, ConvBlock) and isinstance(m.norm1, nn.BatchNorm2d)]
    if not blocks and not any(m.training for m in model.modules()):
        return model
    folded = copy.deepcopy(model).eval()  # fusing asks for eval-mode batch norms
    for block in (m for m in folded.modules() if isinstance(m, ConvBlock)):
        if isinstance(block.norm1, nn.BatchNorm2d):
            block.conv1, block.norm1 = fuse_conv_bn_eval(block.conv1, block.norm1), nn.Identity()
            block.conv2, block.norm2 = fuse_conv_bn_eval(block.conv2, block.norm2), nn.Identity()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.eval()  # the fused convolutions are new modules, made in training mode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
