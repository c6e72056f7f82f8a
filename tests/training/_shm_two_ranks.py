"""Two ranks: DeepSpeed's collectives through the shared-memory kernel (training/shm_collectives.py) against gloo's,
on the same tensors; launched by tests/training/test_shm_collectives.py (not collected by pytest).

  deepspeed --num_gpus 2 tests/training/_shm_two_ranks.py --out FILE
"""
from __future__ import annotations

import argparse
import json

import torch

from chatrlhf.training import shm_collectives
from chatrlhf.training.precision import FAST_PATHS_ENV
from chatrlhf.utils import distributed as dist


def main() -> None:
    import os

    import deepspeed.comm as ds_comm
    import torch.distributed as td

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    dist.init_distributed()
    installed = shm_collectives.install()
    rank, world = td.get_rank(), td.get_world_size()
    g = torch.Generator().manual_seed(rank)
    result = {"installed": installed, "available": shm_collectives.available(), "same": {}}
    cases = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name, dtype in cases.items():
        # Odd sizes (not a multiple of the kernel's chunks), large enough to cross its 69 MB buffer for bf16.
        for n in (1, 1027, 40_000_003):
            x = (torch.randn(n, generator=g) * 10).to(dtype)
            x[0] = -0.0 if n > 1 else x[0]
            outs = {}
            for fast in ("1", "0"):  # the kernel, then DeepSpeed's own gloo path
                os.environ[FAST_PATHS_ENV] = fast
                reduced = x.clone()
                ds_comm.all_reduce(reduced)
                gathered = torch.full((n * world,), float("nan"), dtype=dtype)
                handle = ds_comm.all_gather_into_tensor(gathered, x, async_op=True)
                handle.wait()
                # In place, as ZeRO 1-2 gather their updated partitions: the shard is a view of the output.
                in_place = torch.full((n * world,), float("nan"), dtype=dtype)
                in_place[rank * n:(rank + 1) * n] = x
                ds_comm.all_gather_into_tensor(in_place, in_place.narrow(0, rank * n, n))
                outs[fast] = (reduced, gathered, in_place)
            (r1, g1, i1), (r0, g0, i0) = outs["1"], outs["0"]
            result["same"][f"{name}-{n}"] = {"all_reduce": bool(torch.equal(r1, r0)),
                                             "all_gather": bool(torch.equal(g1, g0)),
                                             "all_gather_in_place": bool(torch.equal(i1, i0) and torch.equal(i1, g0)),
                                             "gathered_own_shard": bool(torch.equal(g1[rank * n:(rank + 1) * n], x))}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    dist.run_as_process(main)
