"""DeepSpeed's collectives through its shared-memory all-reduce when every rank runs on this one CPU host.

DeepSpeed's CPU accelerator builds a shared-memory all-reduce kernel (the `deepspeed_shm_comm` op of its inference
engine), but ZeRO's training collectives go through gloo over loopback TCP. On 2 ranks of the 2-core EPYC, for
135M bf16 values (a SmolLM2-135M's weights or gradients): gloo's all_gather_into_tensor took 0.41 s and its
all_reduce 0.33 s; the shared-memory all-reduce 0.11 s, zeroing and filling the buffer included.

`install()` routes two of DeepSpeed's collectives there:
- all_reduce with SUM (ZeRO 1-3's gradient reduction, with --reduce_scatter off as the CPU fast paths set it);
- all_gather_into_tensor (ZeRO-3's parameter gathers), as an all-reduce of a zeroed buffer that holds this rank's
  shard at its offset: adding zeros is exact, so every value arrives bit for bit (a -0.0 arrives as +0.0).
Anything else (another op or group, a GPU tensor, ranks on several hosts, a dtype the kernel lacks, a CPU without
its vector instructions, $CHATRLHF_FAST_PATHS=0) takes DeepSpeed's own path, decided per call.
With two ranks the sums are gloo's to the bit (a + b either way); with more, the kernel adds in its own order.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as td

from chatrlhf.training import precision

# The kernel's minimum vector level per dtype (DeepSpeed's TorchBackend.shm_vector_kernel_level): bf16 and fp16
# need avx512bw, fp32 avx2.
_LEVEL = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 1}


class _Done:
    """The handle of an async collective that has already completed (the kernel is synchronous)."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _backend():
    import deepspeed.comm.comm as ds_comm

    return getattr(ds_comm, "cdb", None)


def available() -> bool:
    """Whether the shared-memory kernel can serve this process's world: DeepSpeed's CPU accelerator with its op
    built, more than one rank, all of them on this host (the kernel's own test: LOCAL_SIZE == world size)."""
    cdb = _backend()
    if cdb is None or getattr(cdb, "shm_comm_op", None) is None or not td.is_initialized():
        return False
    ops = getattr(torch.ops, "deepspeed", None)
    world = td.get_world_size()
    return (ops is not None and hasattr(ops, "inference_all_reduce_") and world > 1
            and os.environ.get("LOCAL_SIZE") == str(world) and getattr(cdb, "shm_vector_kernel_level", 0) >= 1)


def install() -> bool:
    """Routes DeepSpeed's all_reduce and all_gather_into_tensor through the kernel where it serves the call (see the
    module doc). Idempotent; returns whether it is installed."""
    if not available():
        return False
    cdb = _backend()
    if getattr(cdb, "_chatrlhf_shm", False):
        return True
    level = cdb.shm_vector_kernel_level
    plain_all_reduce, plain_all_gather = cdb.all_reduce, cdb.all_gather_into_tensor

    def served(group, *tensors) -> bool:
        return (precision.fast_paths_enabled()
                and (group is None or td.get_world_size(group) == td.get_world_size())
                and all(t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0
                        and _LEVEL.get(t.dtype, 9) <= level for t in tensors))

    def all_reduce(tensor, op=td.ReduceOp.SUM, group=None, async_op=False):
        if cdb._reduce_op(op) != td.ReduceOp.SUM or not served(group, tensor):
            return plain_all_reduce(tensor, op, group, async_op)
        torch.ops.deepspeed.inference_all_reduce_(tensor)
        return _Done() if async_op else None

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        n, world = input_tensor.numel(), td.get_world_size()
        if (output_tensor.dtype != input_tensor.dtype or output_tensor.numel() != n * world
                or not served(group, output_tensor, input_tensor)):
            return plain_all_gather(output_tensor, input_tensor, group, async_op)
        flat = output_tensor.view(-1)
        rank = td.get_rank() if group is None else td.get_rank(group)  # the shard's place: its rank in the group
        slot, shard = flat.narrow(0, rank * n, n), input_tensor.reshape(-1)
        in_place = shard.data_ptr() == slot.data_ptr()  # ZeRO 1-2 gather their partitions inside the flat buffer
        if not in_place and shard.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
            shard = shard.clone()  # elsewhere in the output: zeroing would overwrite it
        flat[:rank * n].zero_()
        flat[(rank + 1) * n:].zero_()
        if not in_place:
            slot.copy_(shard)
        torch.ops.deepspeed.inference_all_reduce_(flat)
        return _Done() if async_op else None

    cdb.all_reduce, cdb.all_gather_into_tensor = all_reduce, all_gather_into_tensor
    cdb._chatrlhf_shm = True
    return True
