"""Process-group helpers that work the same under the `deepspeed` launcher, `torchrun`, and a plain
`python` process (tests, CPU boxes).

A single process gets a one-rank group of its own, so every code path (ZeRO, barriers, all-reduce)
is the same whether one rank or many run it. Devices are reached through DeepSpeed's accelerator,
never `torch.cuda`, so the same code runs on CUDA and on DeepSpeed's CPU accelerator (gloo).
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Joins (or, for a lone process, creates) the default process group. Idempotent."""
    if dist.is_available() and dist.is_initialized():
        return
    # A plain `python` run has no launcher env: make it a world of one on loopback.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend=accelerator().communication_backend_name(), verbose=False)
    accelerator().set_device(get_local_rank())


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device() -> torch.device:
    """This rank's device (`cuda:N` on GPU boxes, `cpu` on DeepSpeed's CPU accelerator)."""
    name = accelerator().device_name()
    return torch.device(name if name == "cpu" else f"{name}:{get_local_rank()}")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def is_local_main_process() -> bool:
    return get_local_rank() == 0


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a new tensor; the input is left alone)."""
    t = t.detach().clone()
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (pickled; for small things such as paths and flags)."""
    if not (is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
