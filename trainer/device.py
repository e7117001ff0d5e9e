"""Choosing the device and the arithmetic precision once, and the process group under torchrun."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch


class DeviceError(RuntimeError):
    """The requested device is not available; the message says what to do instead."""


def resolve_device(kind: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit choice must exist."""
    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if kind == "auto":
        kind = "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if kind == "cuda":
        if not has_cuda:
            build = (
                f"this torch {torch.__version__} was built {'with' if torch.version.cuda else 'without'} CUDA"
            )
            raise DeviceError(
                f"CUDA was requested but no GPU is visible ({build}); use --device cpu or --device auto"
            )
        return torch.device("cuda", local_rank)
    if kind == "mps":
        if not has_mps:
            raise DeviceError(
                "Apple MPS was requested but is not available; use --device cpu or --device auto"
            )
        return torch.device("mps")
    if kind == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {kind!r}; valid: auto, cpu, cuda, mps")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: plain fp32) and why it was chosen."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"

    def autocast(self, device: torch.device, cache: bool = True):
        """The autocast context for this precision on ``device`` (a no-op for fp32);
        ``cache=False`` for a CUDA graph's capture, which its cast cache would break."""
        return torch.autocast(
            device.type,
            dtype=self.dtype or torch.float32,
            enabled=self.dtype is not None,
            cache_enabled=cache,
        )


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """Does this CPU compute bf16 natively? From the CPU flags where the OS lists them
    (Linux), else from a short probe: a bf16 matmul at least as fast as the fp32 one.
    Where bf16 is emulated (AVX2 only) training in bf16 runs many times slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is not None:
        found = [flag for flag in _BF16_FLAGS if flag in flags]
        if found:
            return True, f"the CPU computes bf16 natively ({', '.join(found)})"
        return False, "the CPU has no native bf16 (no avx512_bf16 or amx_bf16)"
    return _probe_bf16()


def _probe_bf16() -> tuple[bool, str]:
    a32 = torch.rand(384, 384)
    a16 = a32.bfloat16()

    def best_of(a) -> float:
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    fp32, bf16 = best_of(a32), best_of(a16)
    native = bf16 <= fp32
    return native, f"a bf16 matmul ran {fp32 / bf16:.1f}x the speed of fp32 on this CPU"


def resolve_precision(kind: str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast on CUDA GPUs that support it and on CPUs that compute bf16
    natively, fp32 elsewhere (Apple MPS included). ``fp32`` and ``bf16`` are obeyed as
    given (bf16 on a CPU without native support works, slowly)."""
    if kind == "fp32":
        return Precision(None, "fp32 as requested")
    if kind == "bf16":
        if device.type == "mps":
            raise DeviceError("bf16 autocast is not supported on Apple MPS; use --precision fp32 or auto")
        return Precision(torch.bfloat16, "bf16 as requested")
    if kind != "auto":
        raise DeviceError(f"unknown precision {kind!r}; valid: auto, fp32, bf16")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "auto: the GPU supports bf16")
        return Precision(None, "auto: the GPU has no bf16 support")
    if device.type == "cpu":
        native, why = cpu_bf16_support()
        return Precision(torch.bfloat16 if native else None, f"auto: {why}")
    return Precision(None, f"auto: fp32 on {device.type}")


def uses_channels_last(device: torch.device) -> bool:
    """channels_last (NHWC) convolutions: 1.5-1.8x faster on CPUs (oneDNN) and on tensor
    cores; MPS is left as it is."""
    return device.type in ("cpu", "cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands under torchrun (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
        if use_nccl:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return DistContext(rank=rank, world=world, local_rank=local_rank)


class TrainingFailure(RuntimeError):
    """Training cannot go on; the message is meant for people (and is the same on every rank)."""


class Peers:
    """What the processes of a torchrun job must agree on between steps: that one of
    them failed (so that none is left waiting in a collective the failed one will never
    join) and that the user asked to stop (so that all stop at the same step).

    The flags travel through a gloo group of their own, on the CPU: no GPU sync.
    A single process agrees with itself at no cost.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.group = None
        if ctx.active:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    @property
    def active(self) -> bool:
        return self.ctx.active

    def share(self, value):
        """Rank 0's ``value`` on every rank (others pass anything); a picklable object."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, problem: str | None, stop: bool = False) -> bool:
        """Raise :class:`TrainingFailure` on every rank when any rank has a ``problem``;
        otherwise return whether any rank asked to ``stop``."""
        if not self.active:
            if problem is not None:
                raise TrainingFailure(problem)
            return stop
        import torch.distributed as dist

        flags = torch.tensor([problem is not None, stop], dtype=torch.int32)
        dist.all_reduce(flags, group=self.group)
        if flags[0]:
            said: list = [None] * self.ctx.world
            dist.all_gather_object(said, problem, group=self.group)
            raise TrainingFailure("; ".join(f"rank {r}: {m}" for r, m in enumerate(said) if m is not None))
        return bool(flags[1])

    def stop_and_clock(self, stop: bool, clock: float) -> tuple[bool, float]:
        """Whether any rank asked to ``stop``, and the latest of the ranks' ``clock``
        readings, in one collective: a time budget's progress (and so the learning rate
        of the step) is then the same on every rank, whose clocks differ by a little."""
        if not self.active:
            return stop, clock
        import torch.distributed as dist

        both = torch.tensor([float(stop), clock], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        return bool(both[0]), float(both[1])

    def latest(self, seconds: float) -> float:
        """The largest of the ranks' ``seconds`` (a validation's length: the slowest
        rank's is what a budget must leave room for)."""
        return self.stop_and_clock(False, seconds)[1]


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group.

    After a normal finish every rank first waits until all ranks have returned from
    their last collective, and only then closes its connections: gloo aborts a process
    whose peer closes a connection while a collective is still finishing on it, and a
    gloo barrier right before destruction has that very race (a rank returns from the
    barrier while its peer is still completing it). The wait goes through the job's
    key-value store, which involves no gloo connection. After an error nobody waits,
    since the other ranks may be stuck in a collective this rank will never join.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        try:
            _store_barrier(dist.get_rank(), dist.get_world_size())
        except Exception:  # the store's host already left: everyone had arrived
            pass
    dist.destroy_process_group()


def _store_barrier(rank: int, world: int, timeout_s: float = 300.0) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return
    store = dist.TCPStore(host, int(port), world, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set(f"marsviewer/finished/{rank}", "1")
    store.wait([f"marsviewer/finished/{r}" for r in range(world)])


def compute_clock() -> float:
    """Seconds of compute this process has had: its CPU time over its threads.

    Alone on the machine it runs about as fast as the wall clock; sharing the cores
    with another job (a training) it runs slower, so a budget measured on it buys the
    same work whatever else is running.
    """
    return time.process_time() / max(torch.get_num_threads(), 1)
