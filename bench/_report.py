"""Shared by the benchmark scripts: print the figures and keep them as JSON, stamped with
the machine and the moment they were measured (``run``), so that the figures page can say
where each figure comes from."""

from __future__ import annotations

import json
import os
import platform
import time

# `make bench` sets this once for all its benchmarks: figures that carry the same value
# come from one run of it.
RUN_ENV = "MARS_BENCH_RUN"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_stamp() -> dict:
    """Where and when: the date and time (UTC), the CPU, its logical CPUs, whether it
    computes bf16 natively, the GPU when torch sees one, torch's version, and the
    ``make bench`` run this belongs to (None when the benchmark ran on its own)."""
    now = time.gmtime()
    stamp = {
        "date": time.strftime("%Y-%m-%d", now),
        "time_utc": time.strftime("%H:%M", now),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "make_bench": os.environ.get(RUN_ENV) or None,
    }
    import torch  # imported already where the benchmark itself trains

    from trainer.device import cpu_bf16_support

    stamp["cpu_bf16"] = cpu_bf16_support()[0]
    stamp["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    stamp["torch"] = torch.__version__
    return stamp


def report(result: dict, path: str | None = None, shown: dict | None = None, echo: bool = True) -> None:
    """Print ``shown`` (default: ``result``) as JSON unless not ``echo``; write ``result``
    with its :func:`run_stamp` to ``path`` if given."""
    if echo:
        print(json.dumps(result if shown is None else shown, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump({**result, "run": run_stamp()}, f, indent=1)
