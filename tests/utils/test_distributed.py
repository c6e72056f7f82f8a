"""utils.distributed: what a rank leaves behind when it exits."""
import glob
import json
import os
import subprocess
import sys

import pytest

EXIT_SCRIPT = '''
import json, os, sys
import torch
from chatrlhf.utils import distributed as dist

dist.init_distributed()
total = dist.all_reduce_sum(torch.ones(4))
out_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the launcher adds --local_rank
import deepspeed.comm.comm as c
record = {"port": os.environ["MASTER_PORT"], "total": total.tolist(), "shm_op": c.cdb.shm_comm_op is not None}
json.dump(record, open(f"{out_dir}/rank{dist.get_rank()}.json", "w"))
'''


@pytest.mark.distributed
def test_ranks_exit_clean_and_leave_no_shared_memory(tmp_path, deepspeed_launch):
    """Two ranks that end without tearing anything down: the process group is destroyed at exit (left to interpreter
    teardown, gloo can abort a rank) and DeepSpeed's CPU all-reduce segments in /dev/shm (64 MiB a rank) are gone."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    deepspeed_launch(str(script), [str(tmp_path)], timeout=300)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["total"] == [2.0] * 4 and got[0]["port"] == got[1]["port"]
    assert got[0]["shm_op"] and got[1]["shm_op"]  # two ranks on one machine do use it
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{got[0]['port']}_*") == []


def _run_alone(script: str) -> subprocess.CompletedProcess:
    """`script` in a plain python process of its own (without this process's process-group variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_a_world_of_one_skips_the_shared_memory_op(tmp_path):
    """A lone CPU process needs no shared-memory all-reduce: DeepSpeed's op (a C++ build on first use) is not
    loaded, and collectives still work."""
    script = ("import torch, deepspeed.comm.comm as c\n"
              "from chatrlhf.utils import distributed as dist\n"
              "dist.init_distributed()\n"
              "assert dist.get_world_size() == 1 and c.cdb.shm_comm_op is None, c.cdb.shm_comm_op\n"
              "assert dist.all_reduce_sum(torch.ones(3)).tolist() == [1.0] * 3\n")
    proc = _run_alone(script)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_rank_that_raises_still_prints_its_traceback_and_fails(tmp_path):
    """The exit handler leaves a failing process alone: its traceback is printed, it exits 1, it does not hang."""
    script = ("from chatrlhf.utils import distributed as dist\n"
              "dist.init_distributed()\n"
              "raise RuntimeError('boom from the test')\n")
    proc = _run_alone(script)
    assert proc.returncode == 1 and "RuntimeError: boom from the test" in proc.stderr, proc.stderr[-3000:]
