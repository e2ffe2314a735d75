"""Devices, mixed precision and torchrun: the GPU when there is one, the CPU otherwise.

Under ``torchrun --nproc_per_node N`` every rank runs the same command; ``init_distributed``
joins them (NCCL on GPUs, gloo on CPU) and the runner lets rank 0 alone do the bookkeeping.
Without torchrun all of this is a no-op for a single process. torch is imported only when needed:
the runner, the CLI and stages such as filter never pay for it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch


def _joined():
    """torch.distributed when this process is in a process group, else None."""
    if world_size() == 1:
        return None
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> None:
    """Join the torchrun process group (idempotent; nothing to do in a single process)."""
    if world_size() > 1 and _joined() is None:
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # ranks wait for each other while rank 0 alone runs a stage such as crawl: a long timeout
        dist.init_process_group(backend, timeout=timedelta(hours=12))
        atexit.register(dist.destroy_process_group)


def barrier() -> None:
    if dist := _joined():
        dist.barrier()


def sum_over_ranks(value: int) -> int:
    """The sum of ``value`` over all ranks (a collective: every rank must call it)."""
    dist = _joined()
    if dist is None:
        return value
    import torch

    total = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return int(total.item())


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use device: auto or cpu")
    return device


def autocast(device: torch.device, precision: str = "auto"):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on the CPU."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
