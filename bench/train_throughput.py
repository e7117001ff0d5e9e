"""Training throughput: the full pipeline of ``fit()`` against a bare training step.

Both are measured in one run, on the same device, with the same model and batch:

* pipeline: ``fit()`` on a synthetic dataset: on-device augmentation, oversampling,
  the loss of the config, event generation, and a validation (confusion matrix) after
  every epoch; images/s counted from the first step after warm-up to the last event;
* bare: forward + cross-entropy + backward + AdamW step on one resident random batch.

    python bench/train_throughput.py --device cpu --json out.json
    python bench/train_throughput.py --device cuda --json out.json   # gpu preset
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from _report import report

from trainer import events as ev
from trainer.config import preset
from trainer.device import device_name, resolve_device
from trainer.engine import fit
from trainer.model import build_model
from trainer.synth import generate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_img_s(cfg, device, shape, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.rand(cfg.batch_size, 1, *shape, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (cfg.batch_size, *shape), device=device)
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def pipeline_img_s(cfg, dataset, warmup_steps: int) -> tuple[float, dict]:
    seen, t0, last_val = 0, None, None
    for e in fit(dataset, cfg):
        now = time.perf_counter()
        if isinstance(e, ev.Step):
            if e.step == warmup_steps:
                t0, seen = now, 0
            elif t0 is not None:
                seen += cfg.log_every * cfg.batch_size
        if isinstance(e, ev.Validation):
            last_val = e
        if isinstance(e, ev.TERMINAL):
            end = now
    return seen / (end - t0), {"last_miou": last_val.miou if last_val else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--preset", help="default: gpu on cuda, cpu otherwise")
    p.add_argument(
        "--images", type=int, help="synthetic training images (default 1000 on CPU, 20000 on CUDA)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = preset(name).replace(
        device=args.device, epochs=args.epochs, log_every=1 if device.type == "cpu" else 10
    )
    if args.batch_size:
        cfg = cfg.replace(batch_size=args.batch_size)
    n = args.images or (20000 if device.type == "cuda" else 1000)
    dataset = generate(n, 0, seed=0).dataset
    shape = dataset.image_shape
    steps_per_epoch = -(-int(n * (1 - cfg.val_fraction)) // cfg.batch_size)
    warmup = max(cfg.log_every * 2, 5)
    # Bare before and after the pipeline, averaged: drift in machine load hits both sides.
    bare_steps = max(steps_per_epoch, 30)
    bare_before = bare_img_s(cfg, device, shape, steps=bare_steps, warmup=warmup)
    pipe, extra = pipeline_img_s(cfg, dataset, warmup_steps=warmup - warmup % cfg.log_every or cfg.log_every)
    bare_after = bare_img_s(cfg, device, shape, steps=bare_steps, warmup=warmup)
    bare = (bare_before + bare_after) / 2
    extra["bare_before_after"] = [round(bare_before, 1), round(bare_after, 1)]
    result = {
        "device": device_name(device),
        "preset": name,
        "batch_size": cfg.batch_size,
        "image_shape": list(shape),
        "images": n,
        "epochs": cfg.epochs,
        "pipeline_img_s": round(pipe, 1),
        "bare_img_s": round(bare, 1),
        "ratio": round(pipe / bare, 3),
        "torch": torch.__version__,
        "machine": platform.machine(),
        **extra,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
