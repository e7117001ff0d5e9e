"""Where the training pipeline's time goes: ``fit()`` under ``torch.profiler``.

Profiles ``--active`` windows of ``log_every`` steps each, after two windows of warm-up
(cuDNN's algorithm search, the allocator's first growth), of ``fit()`` as users run it
(the preset, auto precision, augmentation on the device). Prints the operators that take
the most time on the device (on a CPU: on the host), and for a GPU how busy it was: the
kernels' time over the wall time of the window, and the kernels launched a step. A GPU
busy far less than all the time waits on the host (Python, kernel launches); one busy
all the time is bound by its kernels, which the table names. ``parts`` splits a step by
the parts the engine names (batch, augment, forward, loss, backward, finite, optimizer):
each one's time on the host, and on a GPU the time of the kernels it launched.

    python bench/step_profile.py --device cuda [--preset gpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import report
from torch.profiler import ProfilerActivity, profile, schedule
from train_throughput import synthetic

from trainer import events as ev
from trainer.config import preset
from trainer.device import device_name, resolve_device
from trainer.engine import fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", help="default: gpu on cuda, cpu otherwise")
    p.add_argument(
        "--images", type=int, default=12000, help="enough that the windows fall in the first epoch"
    )
    p.add_argument("--log-every", type=int, default=10, help="steps a profiled window")
    p.add_argument("--active", type=int, default=3, help="windows profiled")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-cuda-graph", action="store_true", help="profile the step run eagerly on CUDA")
    p.add_argument("--json")
    args = p.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    name = args.preset or ("gpu" if cuda else "cpu")
    cfg = preset(name).replace(
        device=args.device, epochs=100, log_every=args.log_every, cuda_graph=not args.no_cuda_graph
    )
    dataset = synthetic(args.images, (64, 128))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Profiler step k begins at the k-th step event: steps 0-1 warm up (0 holds the
    # start-up), the next ``active`` are recorded, once.
    events, start, end = 0, None, None
    run = fit(dataset, cfg)
    when = schedule(wait=0, warmup=2, active=args.active, repeat=1)
    with profile(activities=activities, schedule=when) as prof:
        for e in run:
            if isinstance(e, ev.Step):
                events += 1
                now = time.perf_counter()
                prof.step()
                if events == 2:
                    start = now
                elif events == 2 + args.active:
                    end = now
                    break
    run.close()
    steps = args.active * args.log_every
    seconds = end - start
    table = prof.key_averages()
    # Operators (host rows) by the time they take where they run. On a GPU, the kernels'
    # own rows add up to the time it was busy; device rows named as a host row are not
    # kernels but the span of a step or of a record_function, mirrored on the device.
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [r for r in table if r.device_type.name == "CPU"]
    names = {r.key for r in ops}
    kernels = [r for r in table if r.device_type.name != "CPU" and r.key not in names]
    # The engine names a step's parts (record_function "step/..."): their host time, the
    # device time of what they launched, a step.
    parts = {
        r.key: {
            "host_ms": round(r.cpu_time_total / 1e3 / steps, 3),
            "device_ms": round(r.device_time_total / 1e3 / steps, 3) if cuda else None,
        }
        for r in ops
        if r.key.startswith("step/")
    }
    ops = [r for r in ops if not r.key.startswith(("ProfilerStep", "step/"))]
    rows = sorted(ops, key=lambda r: getattr(r, key), reverse=True)[: args.top]
    total_us = (
        sum(r.self_device_time_total for r in kernels) if cuda else sum(r.self_cpu_time_total for r in ops)
    )
    result = {
        "device": device_name(device),
        "preset": name,
        "batch_size": cfg.batch_size,
        "cuda_graph": cuda and cfg.cuda_graph,  # each step replayed as one CUDA graph (the engine's default)
        "steps": steps,
        "wall_s": round(seconds, 3),
        "img_s": round(steps * cfg.batch_size / seconds, 1),
        "busy": round(total_us / 1e6 / seconds, 3) if cuda else None,
        "kernel_ms_per_step": round(total_us / 1e3 / steps, 3),
        "ops_per_step": round(sum(r.count for r in ops) / steps, 1),
        "kernels_per_step": round(sum(r.count for r in kernels) / steps, 1) if cuda else None,
        "wall_ms_per_step": round(seconds * 1e3 / steps, 3),
        "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["host_ms"])),
        "top": [
            {
                "op": r.key[:90],
                "ms_per_step": round(getattr(r, key) / 1e3 / steps, 3),
                "share": round(getattr(r, key) / max(total_us, 1), 3),
                "calls_per_step": round(r.count / steps, 1),
            }
            for r in rows
        ],
        # The kernels themselves, by their time a step: under a CUDA graph the host's
        # operators no longer own them, and these say where the GPU's time goes.
        "top_kernels": [
            {
                "kernel": r.key[:120],
                "ms_per_step": round(r.self_device_time_total / 1e3 / steps, 3),
                "share": round(r.self_device_time_total / max(total_us, 1), 3),
                "calls_per_step": round(r.count / steps, 1),
            }
            for r in sorted(kernels, key=lambda r: r.self_device_time_total, reverse=True)[: args.top]
        ]
        if cuda
        else None,
        "torch": torch.__version__,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
