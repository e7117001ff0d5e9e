"""What batch norm and ReLU cost a training step on a CPU, against what the memory
traffic of the same passes costs.

On a CPU the convolutions of the ``cpu`` preset run near the machine's matmul rate; what
keeps ``gflops_pipeline`` (``train_throughput.py``) below it is everything else, batch
norm and ReLU first (``step_profile.py --device cpu``). This times, for every activation
a batch norm of the preset sees in a step (its shape, dtype and layout as training has
them: channels_last, the auto precision), side by side in one run:

* ``copy``: one read and one write of the tensor, the memory floor of a pass;
* ``bn_forward``: training-mode batch norm (its statistics, then normalising);
* ``bn_normalise``: the same normalisation with the statistics given (eval mode): the
  difference is what computing the statistics costs;
* ``bn_backward``, ``relu_forward`` (in place, as the model runs it), ``relu_backward``;
* with ``--compile``: batch norm + ReLU, forward and backward, compiled by Inductor (fused
  kernels), against the same eagerly (compile time not counted).

Each figure is the median of ``--reps`` calls, summed over a step's calls of each shape.

    python bench/norm_cost.py [--preset cpu] [--compile] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F
from _report import report

from trainer.allocator import keep_freed_memory
from trainer.config import preset
from trainer.device import device_name, resolve_precision
from trainer.model import build_model

PARTS = ("copy", "bn_forward", "bn_normalise", "bn_backward", "relu_forward", "relu_backward")


def norm_inputs(cfg, shape=(64, 128)) -> Counter:
    """(shape, dtype) of each batch norm's input in one training forward pass, counted."""
    model = build_model(cfg).to(memory_format=torch.channels_last)
    seen: Counter = Counter()
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.update([(tuple(args[0].shape), args[0].dtype)]))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    x = torch.rand(cfg.batch_size, 1, *shape).contiguous(memory_format=torch.channels_last)
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    with torch.no_grad(), precision.autocast(torch.device("cpu")):
        model(x)
    for h in hooks:
        h.remove()
    return seen


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def time_parts(shape, dtype, reps: int) -> dict[str, float]:
    c = shape[1]
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    w, b = torch.ones(c), torch.zeros(c)
    mean, var = torch.zeros(c), torch.ones(c)
    normed, save_mean, save_invstd = torch.native_batch_norm(
        x, w, b, mean.clone(), var.clone(), True, 0.1, 1e-5
    )
    out = F.relu(normed)  # what ReLU's backward reads
    bn_bwd = torch.ops.aten.native_batch_norm_backward
    return {
        "copy": median_ms(lambda: y.copy_(x), reps),
        "bn_forward": median_ms(lambda: torch.native_batch_norm(x, w, b, mean, var, True, 0.1, 1e-5), reps),
        "bn_normalise": median_ms(
            lambda: torch.native_batch_norm(x, w, b, mean, var, False, 0.1, 1e-5), reps
        ),
        "bn_backward": median_ms(
            lambda: bn_bwd(g, x, w, mean, var, save_mean, save_invstd, True, 1e-5, [True, True, True]), reps
        ),
        "relu_forward": median_ms(lambda: y.clamp_min_(0), reps),  # in place, a read and a write
        "relu_backward": median_ms(lambda: torch.ops.aten.threshold_backward(g, out, 0), reps),
    }


def bn_relu(x, w, b):
    return F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))


def fused_vs_eager(shape, dtype, reps: int) -> dict[str, float]:
    """Batch norm + ReLU forward and backward, eager and compiled (timed after the warm-up
    calls, which compile it)."""
    compiled = torch.compile(bn_relu, dynamic=False)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.ones(shape[1], requires_grad=True)
    b = torch.zeros(shape[1], requires_grad=True)

    def step(fn):
        return lambda: fn(x, w, b).backward(g)

    return {"eager": median_ms(step(bn_relu), reps), "compiled": median_ms(step(compiled), reps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="also time Inductor's fused batch norm + ReLU")
    p.add_argument("--json")
    args = p.parse_args()
    keep_freed_memory()  # as fit() runs: freed tensors reused, not faulted in again
    cfg = preset(args.preset).replace(device="cpu")
    shapes = norm_inputs(cfg)
    rows, totals = [], dict.fromkeys(PARTS, 0.0)
    fused = {"eager": 0.0, "compiled": 0.0}
    for (shape, dtype), calls in sorted(shapes.items(), key=lambda kv: -kv[0][0][2]):
        parts = time_parts(shape, dtype, args.reps)
        row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "calls": calls}
        row.update({k: round(v, 3) for k, v in parts.items()})
        for k in PARTS:
            totals[k] += calls * parts[k]
        if args.compile:
            f = fused_vs_eager(shape, dtype, args.reps)
            row["bn_relu_eager"], row["bn_relu_compiled"] = round(f["eager"], 3), round(f["compiled"], 3)
            fused["eager"] += calls * f["eager"]
            fused["compiled"] += calls * f["compiled"]
        rows.append(row)
    step_ms = {k: round(v, 2) for k, v in totals.items()}
    passes = totals["bn_forward"] + totals["bn_backward"] + totals["relu_forward"] + totals["relu_backward"]
    result = {
        "device": device_name(torch.device("cpu")),
        "preset": args.preset,
        "batch_size": cfg.batch_size,
        "shapes": rows,
        "step_ms": step_ms,
        "bn_relu_ms": round(passes, 2),
        # what the statistics add to the forward pass, and the passes at the speed of a copy
        "statistics_ms": round(totals["bn_forward"] - totals["bn_normalise"], 2),
        "bn_forward_over_copy": round(totals["bn_forward"] / totals["copy"], 1),
        "bn_backward_over_copy": round(totals["bn_backward"] / totals["copy"], 1),
        "torch": torch.__version__,
    }
    if args.compile:
        result["fused"] = {
            "eager_ms": round(fused["eager"], 2),
            "compiled_ms": round(fused["compiled"], 2),
            "speedup": round(fused["eager"] / fused["compiled"], 3),
        }
    report(result, args.json)


if __name__ == "__main__":
    main()
