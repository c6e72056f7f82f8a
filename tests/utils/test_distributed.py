"""utils.distributed: what a rank leaves behind when it exits."""
import glob
import json

import pytest

EXIT_SCRIPT = '''
import json, os, sys
import torch
from chatrlhf.utils import distributed as dist

dist.init_distributed()
total = dist.all_reduce_sum(torch.ones(4))
out_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the launcher adds --local_rank
json.dump({"port": os.environ["MASTER_PORT"], "total": total.tolist()}, open(f"{out_dir}/rank{dist.get_rank()}.json", "w"))
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
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{got[0]['port']}_*") == []
