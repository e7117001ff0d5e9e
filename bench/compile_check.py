"""Does ``torch.compile`` pay for its compile time on the runs people make?

Times, in one run on the same threads: compiling the preset's training step
(forward, cross-entropy, backward, AdamW; channels_last, the auto precision), then the
compiled and the eager step side by side, and says after how many steps of training
the compile time would be won back (never, when the compiled step is not faster).

    python bench/compile_check.py [--steps 20] [--json OUT]
    python bench/compile_check.py --device cuda [--mode reduce-overhead]   # the gpu preset
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

# A cold compile, as a user's first run has: no kernels cached by an earlier run.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import torch  # noqa: E402 - after the cache folder is chosen
import torch.nn.functional as F  # noqa: E402
from _report import report  # noqa: E402

from trainer.config import preset  # noqa: E402
from trainer.device import device_name, resolve_device, resolve_precision  # noqa: E402
from trainer.inference import prepare_model  # noqa: E402
from trainer.model import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile's mode; reduce-overhead replays the step as CUDA graphs",
    )
    p.add_argument("--json")
    args = p.parse_args()
    device = resolve_device(args.device)
    cfg = preset("gpu" if device.type == "cuda" else "cpu")
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    model = prepare_model(build_model(cfg), device)
    x = torch.rand(cfg.batch_size, 1, 64, 128, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (cfg.batch_size, 64, 128), device=device)
    opt = torch.optim.AdamW(model.parameters())
    compiled = torch.compile(model, mode=None if args.mode == "default" else args.mode)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(m) -> None:
        with precision.autocast(device):
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step(compiled)
    step(compiled)
    sync()
    compile_s = time.perf_counter() - t0
    rates = {}
    for name, m in (("eager", model), ("compiled", compiled), ("eager_again", model)):
        step(m)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(m)
        sync()
        rates[name] = args.steps * cfg.batch_size / (time.perf_counter() - t0)
    eager = (rates["eager"] + rates["eager_again"]) / 2
    per_step_saving = cfg.batch_size / eager - cfg.batch_size / rates["compiled"]
    result = {
        "device": device_name(device),
        "preset": "gpu" if device.type == "cuda" else "cpu",
        "batch_size": cfg.batch_size,
        "precision": precision.name,
        "mode": args.mode,
        "compile_s": round(compile_s, 1),
        "eager_img_s": round(eager, 1),
        "compiled_img_s": round(rates["compiled"], 1),
        "speedup": round(rates["compiled"] / eager, 3),
        "break_even_steps": round(compile_s / per_step_saving) if per_step_saving > 0 else None,
        "torch": torch.__version__,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
