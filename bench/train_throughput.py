"""Training and inference throughput: the whole ``fit()`` pipeline against bare steps and
the machine's matmul speed, all measured in one run on the same threads.

* ``gflops_matmul_fp32`` / ``_bf16``: a 2048x2048 matmul, the machine's practical peak;
* ``bare``: forward + cross-entropy + backward + the engine's AdamW on one resident batch, in each of
  the four layouts/precisions (contiguous or channels_last, fp32 or bf16 autocast);
* ``pipeline_img_s``: ``fit()`` on synthetic data as users run it (auto precision,
  augmentation, oversampling, the preset's loss, events, a validation every epoch):
  images processed from the first step after warm-up to the last event (the mean of two
  runs, each between rounds of the bare steps and matmuls);
* ``gflops_pipeline``: model FLOPs of a training image (``torch.utils.flop_counter``)
  times ``pipeline_img_s``, and its share of the faster matmul;
* ``predict_img_s``: ``predict_arrays`` at the default batch and auto precision;
* ``submit_s``: ``mars-trainer submit`` on a file with 10,022 test images (the
  competition's count), reading the file and writing the CSV included;
* ``allocator_bare_img_s``: the fastest layout/precision's bare step in child processes,
  with glibc's allocator as it starts (``MARS_TRAINER_ALLOCATOR=system``) and tuned as
  ``fit()`` tunes it (``trainer/allocator.py``), in pairs (the order alternating from
  pair to pair): the median of each side, in how many pairs the tuned one was faster,
  and each side's median page faults a step (what the tuning is for; unlike the speed,
  the load on a shared machine hardly moves it).
  Everything else in this bench runs tuned, as ``fit()`` and the CLI do.

    python bench/train_throughput.py --device cpu --json out.json
    python bench/train_throughput.py --device cuda --json out.json   # gpu preset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import report

from trainer import events as ev
from trainer.allocator import OPT_OUT, keep_freed_memory
from trainer.config import PREDICT_BATCH, preset
from trainer.device import cpu_bf16_support, device_name, resolve_device, resolve_precision
from trainer.engine import build_optimizer, fit
from trainer.inference import predict_arrays, predict_batch
from trainer.model import build_model
from trainer.synth import generate

try:
    import resource  # page faults; not on Windows
except ImportError:
    resource = None

SUBMIT_IMAGES = 10_022
PIPELINE_RUNS = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 6) -> float:
    a = torch.rand(n, n, device=device).to(dtype)
    b = torch.rand(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def train_flops_per_image(cfg, shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg)
    x = torch.rand(1, 1, *shape)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        torch.nn.functional.cross_entropy(out, torch.zeros(1, *shape, dtype=torch.long)).backward()
    return counter.get_total_flops()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def bare_img_s(
    cfg,
    device,
    shape,
    steps: int,
    warmup: int,
    channels_last: bool,
    bf16: bool,
    faults: list | None = None,
    cudnn_benchmark: bool = False,
) -> float:
    """Images a second of the bare step; appends the minor page faults a timed step to
    ``faults`` when given. On CUDA, cuDNN picks its algorithms by timing them when
    ``cudnn_benchmark``, by its heuristics otherwise (as the engine leaves it)."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    model = build_model(cfg).to(device)
    x = torch.rand(cfg.batch_size, 1, *shape, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg, device)  # the pipeline's optimiser
    y = torch.randint(0, 5, (cfg.batch_size, *shape), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0, f0 = time.perf_counter(), minor_faults()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    seconds = time.perf_counter() - t0
    if faults is not None:
        faults.append((minor_faults() - f0) / steps)
    return steps * cfg.batch_size / seconds


def pipeline_img_s(cfg, dataset, warmup_steps: int) -> tuple[float, dict]:
    """Images processed (steps x batch x processes) from the step event at
    ``warmup_steps`` to the terminal event, over the wall time between them."""
    t0 = first = end = None
    started = last_val = None
    last_step = 0
    for e in fit(dataset, cfg):
        now = time.perf_counter()
        if isinstance(e, ev.Started):
            started = e
        elif isinstance(e, ev.Step):
            if t0 is None and e.step >= warmup_steps:
                t0, first = now, e.step
            last_step = e.step
        elif isinstance(e, ev.Validation):
            last_val = e
        elif isinstance(e, ev.TERMINAL):
            end = now
    images = (last_step - first) * cfg.batch_size * started.world_size
    extra = {
        "precision": started.precision,
        "precision_reason": started.precision_reason,
        "last_miou": last_val.miou if last_val else None,
    }
    return images / (end - t0), extra


def predict_img_s(cfg, device, images: np.ndarray, batch_size: int | None = None) -> float:
    model = build_model(cfg)
    predict_arrays(model, images[: batch_size or PREDICT_BATCH], batch_size, device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    predict_arrays(model, images, batch_size, device)
    sync(device)
    return len(images) / (time.perf_counter() - t0)


def synthetic(n: int, shape: tuple[int, int], block: int = 2000):
    """``n`` synthetic training images; more than ``block`` are drawn in parallel, a block
    a process (each block its own seed; 20,000 take 40 s in one process)."""
    if n <= block:
        return generate(n, 0, seed=0, shape=shape).dataset
    from concurrent.futures import ProcessPoolExecutor

    from trainer.dataset import Dataset

    sizes = [min(block, n - start) for start in range(0, n, block)]
    with ProcessPoolExecutor(min(len(sizes), os.cpu_count() or 1)) as pool:
        parts = list(pool.map(_block, sizes, range(len(sizes)), [shape] * len(sizes)))
    images, masks = (np.concatenate(a) for a in zip(*parts, strict=True))
    return Dataset(images=images, masks=masks, source=f"synthetic:{n}:blocks")


def _block(n: int, seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    d = generate(n, 0, seed=seed, shape=shape).dataset
    return d.images, d.masks


def cuda_extras(cfg, device, shape, steps: int, warmup: int, dataset) -> dict:
    """What holds a GPU back, measured on the fastest layout (channels_last bf16): cuDNN's
    algorithm choice by timing or by heuristics; the bare step and the pipeline at larger
    batches (a step that is faster per image at a larger batch was waiting on kernel
    launches, not on arithmetic); prediction at several batches."""
    images = dataset.images
    one = lambda **kw: round(bare_img_s(cfg, device, shape, steps, warmup, True, True, **kw), 1)  # noqa: E731
    return {
        "cuda_bare_cudnn_benchmark_img_s": {
            "off": one(cudnn_benchmark=False),
            "on": one(cudnn_benchmark=True),
        },
        "cuda_bare_batch_img_s": {
            str(b): round(bare_img_s(cfg.replace(batch_size=b), device, shape, steps, warmup, True, True), 1)
            for b in (cfg.batch_size, 2 * cfg.batch_size, 4 * cfg.batch_size)
        },
        "cuda_pipeline_batch_img_s": {
            str(b): round(pipeline_img_s(cfg.replace(batch_size=b), dataset, warmup)[0], 1)
            for b in (2 * cfg.batch_size,)
        },
        # The engine replays each step as one CUDA graph; the same pipeline without:
        "cuda_pipeline_eager_img_s": round(
            pipeline_img_s(cfg.replace(cuda_graph=False), dataset, warmup)[0], 1
        ),
        "cuda_predict_batch_img_s": {
            str(b): round(predict_img_s(cfg, device, images, b), 1) for b in (32, 128, 256, 512, 1024)
        },
    }


def submit_seconds(cfg, shape) -> float:
    """``mars-trainer submit`` end to end, in a fresh process as a user runs it."""
    from trainer.checkpoint import save_checkpoint
    from trainer.formats import write_npz

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
        masks = rng.integers(0, 5, (4, *shape), dtype=np.uint8)
        test = rng.integers(0, 256, (SUBMIT_IMAGES, *shape), dtype=np.uint8)
        write_npz(tmp / "data.npz", images, masks, test, dtype="uint8")
        save_checkpoint(tmp / "model.pt", model=build_model(cfg), config=cfg)
        cmd = [sys.executable, "-m", "trainer", "submit", str(tmp / "data.npz")]
        cmd += ["--checkpoint", str(tmp / "model.pt"), "--out", str(tmp / "s.csv"), "--device", cfg.device]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return time.perf_counter() - t0


def allocator_comparison(args, variant: str, pairs: int = 4) -> dict:
    """The bare step of ``variant`` in fresh processes, glibc's allocator as it starts
    against tuned, in ``pairs`` pairs whose order alternates (a drifting load hits both
    sides alike): the median img/s and page faults a step of each side, and in how many
    pairs the tuned side was faster."""
    runs = {"system": [], "tuned": []}
    cmd = [sys.executable, __file__, "--device", args.device, "--bare-only", variant]
    if args.preset:
        cmd += ["--preset", args.preset]
    for i in range(pairs):
        for name in ("system", "tuned") if i % 2 == 0 else ("tuned", "system"):
            env = {**os.environ, OPT_OUT: name, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    med = lambda name, key: round(float(np.median([r[key] for r in runs[name]])), 1)  # noqa: E731
    return {
        "system": med("system", "img_s"),
        "tuned": med("tuned", "img_s"),
        "pairs": pairs,
        "tuned_faster": sum(
            t["img_s"] > s["img_s"] for s, t in zip(runs["system"], runs["tuned"], strict=True)
        ),
        "faults_per_step": {"system": med("system", "faults"), "tuned": med("tuned", "faults")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--preset", help="default: gpu on cuda, cpu otherwise")
    p.add_argument(
        "--images", type=int, help="synthetic training images (default 1000 on CPU, 20000 on CUDA)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-submit", action="store_true", help="skip the 10,022-image submit timing")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--bare-only", metavar="VARIANT", help=argparse.SUPPRESS)  # for allocator_comparison
    args = p.parse_args()
    allocator = keep_freed_memory()
    device = resolve_device(args.device)
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = preset(name).replace(
        device=args.device, epochs=args.epochs, log_every=1 if device.type == "cpu" else 10
    )
    if args.batch_size:
        cfg = cfg.replace(batch_size=args.batch_size)
    n = args.images or (20000 if device.type == "cuda" else 1000)
    shape = (64, 128)  # the competition's
    steps_per_epoch = -(-int(n * (1 - cfg.val_fraction)) // cfg.batch_size)
    warmup = max(cfg.log_every * 2, 5)
    bare_steps = max(steps_per_epoch // 2, 20)

    variants = [(layout, prec) for layout in ("contiguous", "channels_last") for prec in ("fp32", "bf16")]
    if args.bare_only:
        layout, prec = args.bare_only.rsplit("_", 1)
        faults: list[float] = []
        img_s = bare_img_s(
            cfg, device, shape, bare_steps, warmup, layout == "channels_last", prec == "bf16", faults
        )
        print(json.dumps({"img_s": img_s, "faults": faults[0]}))
        return

    dataset = synthetic(n, shape)

    def bare_round() -> dict[str, float]:
        return {
            f"{layout}_{prec}": bare_img_s(
                cfg, device, shape, bare_steps, warmup, layout == "channels_last", prec == "bf16"
            )
            for layout, prec in variants
        }

    # A shared machine's load drifts, and it must hit both sides of each ratio: the
    # pipeline runs twice, between three rounds of bare steps and matmuls; each figure is
    # the mean of its rounds.
    mm, rounds, pipes = [], [], []
    for i in range(PIPELINE_RUNS + 1):
        mm.append((matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)))
        rounds.append(bare_round())
        if i < PIPELINE_RUNS:
            pipes.append(pipeline_img_s(cfg, dataset, warmup_steps=warmup))
    mm32, mm16 = (float(np.mean([m[0] for m in mm])), float(np.mean([m[1] for m in mm])))
    bare = {k: round(float(np.mean([r[k] for r in rounds])), 1) for k in rounds[0]}
    pipe, extra = float(np.mean([p[0] for p in pipes])), pipes[-1][1]
    extra["bare_rounds"] = {k: [round(r[k], 1) for r in rounds] for k in rounds[0]}
    extra["pipeline_runs_img_s"] = [round(p[0], 1) for p in pipes]
    fastest_bare = max(bare.values())
    flops = train_flops_per_image(cfg, shape)
    gflops_pipeline = flops * pipe / 1e9
    pred = predict_img_s(cfg, device, dataset.images)
    result = {
        "device": device_name(device),
        "cpu_bf16": cpu_bf16_support()[1] if device.type == "cpu" else None,
        "auto_precision": resolve_precision("auto", device).name,
        "preset": name,
        "batch_size": cfg.batch_size,
        "image_shape": list(shape),
        "images": n,
        "epochs": cfg.epochs,
        "threads": torch.get_num_threads(),
        "gflops_matmul_fp32": round(mm32, 1),
        "gflops_matmul_bf16": round(mm16, 1),
        "train_gflop_per_image": round(flops / 1e9, 3),
        "bare_img_s": bare,
        "pipeline_img_s": round(pipe, 1),
        "ratio": round(pipe / fastest_bare, 3),
        "gflops_pipeline": round(gflops_pipeline, 1),
        "gflops_pipeline_share": round(gflops_pipeline / max(mm32, mm16), 3),
        "predict_img_s": round(pred, 1),
        "predict_batch": predict_batch(shape, device),
        "predict_over_pipeline": round(pred / pipe, 2),
        "allocator": allocator,
        # glibc's allocator serves the host: a GPU's step hardly touches it.
        "allocator_bare_img_s": None
        if device.type == "cuda"
        else {"variant": max(bare, key=bare.get), **allocator_comparison(args, max(bare, key=bare.get))},
        "torch": torch.__version__,
        **extra,
    }
    if device.type == "cuda":
        result.update(cuda_extras(cfg, device, shape, bare_steps, warmup, dataset))
    if not args.no_submit:
        result["submit_images"] = SUBMIT_IMAGES
        result["submit_s"] = round(submit_seconds(cfg, shape), 1)
    report(result, args.json)


if __name__ == "__main__":
    main()
