"""DeepSpeed's collectives on one CPU host: gloo against the shared-memory kernel (`training/shm_collectives.py`),
on a model's worth of values, interleaved (gloo, shared memory, gloo, ...) in the same processes. Prints each
collective's seconds both ways and the ratio. It launches itself on `--ranks` ranks with the deepspeed launcher.

  python benchmarks/collectives.py                     # 2 ranks, 135M bf16 values (SmolLM2-135M's weights)
  python benchmarks/collectives.py --values 1e9 --dtype fp32 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--values", type=float, default=135e6, help="values in the whole (gathered, reduced) tensor")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local_rank", type=int, default=-1)  # set by the launcher
    return ap.parse_args(argv)


def rank_main(args) -> None:
    import deepspeed.comm as ds_comm
    import torch.distributed as td

    from chatrlhf.training import shm_collectives
    from chatrlhf.training.precision import FAST_PATHS_ENV
    from chatrlhf.utils import distributed as dist

    dist.init_distributed()
    torch.set_num_threads(1)
    if not shm_collectives.install():
        raise SystemExit("the shared-memory kernel is not available here (one host, DeepSpeed's CPU op built)")
    rank, world = td.get_rank(), td.get_world_size()
    n = int(args.values) // world
    dtype = DTYPES[args.dtype]
    shard = torch.randn(n).to(dtype)
    whole = torch.empty(n * world, dtype=dtype)
    grads = torch.randn(n * world).to(dtype)

    def timed(fn) -> float:
        td.barrier()
        t0 = time.perf_counter()
        fn()
        td.barrier()
        return time.perf_counter() - t0

    ops = {"all_gather_into_tensor": lambda: ds_comm.all_gather_into_tensor(whole, shard),
           "all_reduce": lambda: ds_comm.all_reduce(grads)}
    times = {(op, way): [] for op in ops for way in ("gloo", "shm")}
    for name, fn in ops.items():  # warm-up: the kernel's buffers, gloo's connections
        for way in ("0", "1"):
            os.environ[FAST_PATHS_ENV] = way
            fn()
    for _ in range(args.rounds):
        for name, fn in ops.items():
            for way, env in (("gloo", "0"), ("shm", "1")):
                os.environ[FAST_PATHS_ENV] = env
                times[(name, way)].append(timed(fn))
    if rank == 0:
        size = n * world * shard.element_size() / 1e6
        print(f"== {world} ranks, {n * world / 1e6:.0f}M {args.dtype} values ({size:.0f} MB), {args.rounds} rounds ==")
        for name in ops:
            g, s = times[(name, "gloo")], times[(name, "shm")]
            ratios = ", ".join(f"{a / b:.2f}x" for a, b in zip(g, s))
            gm, sm = statistics.median(g), statistics.median(s)
            print(f"{name:>24}: gloo {gm:.3f} s, shared memory {sm:.3f} s (medians); ratio {gm / sm:.2f}x "
                  f"(rounds: {ratios})")
    dist.barrier()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # a rank
        from chatrlhf.utils import distributed as dist

        dist.run_as_process(lambda: rank_main(args))
        return
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise SystemExit("the deepspeed launcher is not on PATH")
    cmd = [sys.executable, launcher, "--num_gpus", str(args.ranks), __file__, "--values", str(args.values),
           "--dtype", args.dtype, "--rounds", str(args.rounds)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
