"""Choosing the device once, and the process group under torchrun."""

from __future__ import annotations

import os
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


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group. After a normal finish every rank waits for the others
    first: a rank that closes its connections while another still uses them makes gloo
    abort that process ("connection closed by peer"). After an error nobody waits, since
    the other ranks may be stuck in a collective this rank will never join."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except RuntimeError:
                pass  # a peer is already gone; nothing left to wait for
        dist.destroy_process_group()
