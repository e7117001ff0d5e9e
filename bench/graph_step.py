"""The whole training step as one CUDA graph, apart from ``fit()``: how fast, in which form. (CUDA only)

On a GPU the ``gpu`` preset's step run eagerly is bound by the host's work for each of its
thousand kernels (``bench/step_profile.py``), not by the GPU; the engine therefore replays
its step as one CUDA graph (``trainer/cuda_graph.py``). This captures the same step (a batch
drawn from the images held on the GPU, the batched augmentation, forward in bf16 autocast,
the preset's loss with the engine's class weights, backward, the finite check, fused AdamW
with ``capturable=True``) and times its replay against the same step run eagerly, in one
run, with nothing else of a run around it. ``--variants`` also times the replay in other
layouts and precisions, with cuDNN's timed algorithm choice, at twice the batch, and with
cuDNN's batch norm in place of PyTorch's channels_last kernels: once the host is out of the
step, which form the kernels run fastest in. ``batch_norm_backend`` says which batch norm
PyTorch picks for the model's activations.

Replays must learn: the loss at the first and last replay is reported, and the weights must
change between replays.

    python bench/graph_step.py [--preset gpu] [--batch-size 128] [--steps 100] [--variants] [--json OUT]
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import report
from train_throughput import synthetic

from trainer.augment import augment_batch
from trainer.config import parse_loss_spec, preset
from trainer.device import device_name, resolve_device
from trainer.losses import LossParams, SegmentationLoss, frequency_class_weights
from trainer.model import build_model
from trainer.stats import class_pixel_counts

VARIANTS = {  # name: (channels_last, bf16, cudnn.benchmark, batch size factor, cuDNN batch norm)
    "channels_last_bf16": (True, True, False, 1, False),
    "channels_last_fp32": (True, False, False, 1, False),
    "contiguous_bf16": (False, True, False, 1, False),
    "channels_last_bf16_cudnn_benchmark": (True, True, True, 1, False),
    "channels_last_bf16_batch_x2": (True, True, False, 2, False),
    # batch norm is a quarter of the graphed step's kernel time in PyTorch's own
    # channels_last kernels (step_profile.py): the same step with cuDNN's batch norm
    "channels_last_bf16_cudnn_batch_norm": (True, True, False, 1, True),
}


def _cudnn_batch_norm(bn: torch.nn.BatchNorm2d):
    """``bn``'s training forward through ``torch.cudnn_batch_norm`` (differentiable),
    whatever PyTorch would pick for the input."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.cudnn_batch_norm(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps
        )
        return out[0]

    return forward


def batch_norm_backend(cfg) -> str:
    """Which kernels PyTorch picks for the model's first batch norm in training (channels_last,
    bf16): ``Native`` (its own) or ``Cudnn``."""
    select = getattr(torch._C, "_select_batch_norm_backend", None)
    if select is None:
        return "unknown (this torch does not say)"
    c = cfg.base_width
    x = torch.zeros(cfg.batch_size, c, 64, 128, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    return str(select(x, w, b, torch.zeros_like(w), torch.ones_like(w), True, 1e-5)).split(".")[-1]


def measure(
    cfg, data, steps: int, channels_last=True, bf16=True, cudnn_benchmark=False, eager=True, cudnn_norm=False
) -> dict:
    """The step captured and replayed ``steps`` times (and run as many times eagerly first
    when ``eager``), in one layout and precision (and with cuDNN's batch norm when
    ``cudnn_norm``)."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = cudnn_benchmark
    images = torch.from_numpy(data.images).to(device)
    masks = torch.from_numpy(data.masks).to(device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    if cudnn_norm:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.forward = _cudnn_batch_norm(m)
    weights = frequency_class_weights(
        class_pixel_counts(data.masks), cfg.background_weight, cfg.class_weighting
    )
    criterion = SegmentationLoss(parse_loss_spec(cfg.loss), weights, LossParams.from_config(cfg)).to(device)
    lr = torch.tensor(cfg.lr, device=device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=True
    )
    generator = torch.cuda.default_generators[device.index or 0]  # graph-safe: its offsets are captured
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(images), (cfg.batch_size,), device=device, generator=generator)
        x = images[idx].unsqueeze(1).float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, y = augment_batch(x, masks[idx], cfg, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            logits = model(x)
        loss = criterion(logits, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        nonfinite.logical_or_(~torch.isfinite(norm) | ~torch.isfinite(loss.detach()))
        opt.step()
        return loss.detach()

    def eager_img_s(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            step()
        torch.cuda.synchronize()
        return n * cfg.batch_size / (time.perf_counter() - t0)

    side = torch.cuda.Stream()  # warm-up off the default stream, as capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager_img_s(5)
    torch.cuda.current_stream().wait_stream(side)
    eager = eager_img_s(steps) if eager else None

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.cuda.graph(graph):
        static_loss = step()
    capture_s = time.perf_counter() - t0
    graph.replay()
    torch.cuda.synchronize()
    first_loss = float(static_loss)
    probe = next(model.parameters())
    before = probe.detach().clone()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    graphed = steps * cfg.batch_size / (time.perf_counter() - t0)
    torch.backends.cudnn.benchmark = False
    return {
        "eager_img_s": round(eager, 1) if eager else None,
        "graph_img_s": round(graphed, 1),
        "speedup": round(graphed / eager, 3) if eager else None,
        "capture_s": round(capture_s, 2),
        "first_replay_loss": round(first_loss, 4),
        "last_replay_loss": round(float(static_loss), 4),
        "weights_changed": bool((probe.detach() != before).any()),
        "nonfinite": bool(nonfinite),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--variants",
        action="store_true",
        help="also the replay's img/s in other layouts, "
        "precisions, with cuDNN's timed algorithm choice, and at twice the batch",
    )
    p.add_argument("--json")
    args = p.parse_args()
    device = resolve_device("cuda")
    cfg = preset(args.preset).replace(device="cuda")
    if args.batch_size:
        cfg = cfg.replace(batch_size=args.batch_size)
    data = synthetic(args.images, (64, 128))
    result = {
        "device": device_name(device),
        "preset": args.preset,
        "batch_size": cfg.batch_size,
        "steps": args.steps,
        **measure(cfg, data, args.steps),
    }
    result["batch_norm_backend"] = batch_norm_backend(cfg)
    if args.variants:
        result["variants_graph_img_s"], failed = {}, {}
        for name, (cl, bf, cb, k, cn) in VARIANTS.items():
            try:
                run = measure(
                    cfg.replace(batch_size=cfg.batch_size * k), data, args.steps, cl, bf, cb, False, cn
                )
            except RuntimeError as exc:  # a form this GPU or torch cannot run: said, the others go on
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            if not run["weights_changed"] or run["nonfinite"]:
                failed[name] = "its replays did not learn"  # a speed that does not count
            else:
                result["variants_graph_img_s"][name] = run["graph_img_s"]
        if failed:
            result["variants_failed"] = failed
    result["torch"] = torch.__version__
    report(result, args.json)


if __name__ == "__main__":
    main()
