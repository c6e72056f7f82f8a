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


def test_a_world_of_one_skips_the_shared_memory_op(lone_process):
    """A lone CPU process needs no shared-memory all-reduce: DeepSpeed's op (a C++ build on first use) is not
    loaded, and collectives still work."""
    script = ("import torch, deepspeed.comm.comm as c\n"
              "from chatrlhf.utils import distributed as dist\n"
              "dist.init_distributed()\n"
              "assert dist.get_world_size() == 1 and c.cdb.shm_comm_op is None, c.cdb.shm_comm_op\n"
              "assert dist.all_reduce_sum(torch.ones(3)).tolist() == [1.0] * 3\n")
    proc = lone_process(["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_rank_that_raises_still_prints_its_traceback_and_fails(lone_process):
    """The exit handler leaves a failing process alone: its traceback is printed, it exits 1, it does not hang."""
    script = ("from chatrlhf.utils import distributed as dist\n"
              "dist.init_distributed()\n"
              "raise RuntimeError('boom from the test')\n")
    proc = lone_process(["-c", script])
    assert proc.returncode == 1 and "RuntimeError: boom from the test" in proc.stderr, proc.stderr[-3000:]


# A thread inside C++ with the GIL released (a TCPStore wait here; gloo's workers in a real run) that returns while the
# interpreter is torn down: the thread ends inside C++ and the process aborts, after main() had finished its work.
TEARDOWN_SCRIPT = '''
import sys, threading, time
from datetime import timedelta
import torch.distributed as tdist
from chatrlhf.utils import distributed as dist

class SlowTeardown:
    def __del__(self, sleep=time.sleep):
        sleep(2)  # a module global freed at teardown, the GIL released while it sleeps

def main():
    store = tdist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    def wait():
        try:
            store.wait(["never set"], timedelta(seconds=1))
        except Exception:
            pass
    threading.Thread(target=wait, daemon=True).start()
    global keep
    keep = SlowTeardown()
    print("main done")

main() if sys.argv[1] == "plain" else dist.run_as_process(main)
'''


def test_a_step_process_is_not_aborted_by_a_native_thread_at_interpreter_teardown(tmp_path, lone_process):
    """What aborted a CI rank after its run had saved everything ("terminate called without an active exception"):
    left to interpreter teardown, the process dies of SIGABRT; run_as_process (every step's entry) exits 0."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    runs = {how: lone_process([script, how], timeout=120) for how in ("plain", "run_as_process")}
    assert runs["plain"].returncode == -6 and "terminate called" in runs["plain"].stderr  # the hazard is real
    wrapped = runs["run_as_process"]
    assert wrapped.returncode == 0 and wrapped.stdout == "main done\n", wrapped.stderr[-3000:]


EXIT_CODE_SCRIPT = '''
import atexit, sys
from chatrlhf.utils import distributed as dist

def main():
    dist.init_distributed()  # a process group, so that its exit handler runs too
    atexit.register(lambda: print("exit handler ran", file=sys.stderr))
    sys.stdout.write("unflushed tail")  # no newline: lost if the streams were not flushed before os._exit
    {ending}

dist.run_as_process(main)
'''


@pytest.mark.parametrize("ending, code, stderr", [
    ("return {'eval/loss': 1.0}", 0, None),  # a step's main returns its metrics: still status 0
    ("raise SystemExit(3)", 3, None),
    ("raise SystemExit('--data_path: no such file')", 1, "--data_path: no such file"),
    ("raise ValueError('bad record 7')", 1, "ValueError: bad record 7"),
])
def test_run_as_process_exits_as_python_would_after_running_the_exit_handlers(ending, code, stderr, lone_process):
    """The status Python itself would give, the exit handlers run (the process group's and the user's), nothing
    written is lost, and an error's traceback or message is printed."""
    proc = lone_process(["-c", EXIT_CODE_SCRIPT.format(ending=ending)])
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stdout.endswith("unflushed tail") and "exit handler ran" in proc.stderr, (proc.stdout, proc.stderr)
    if stderr:
        assert stderr in proc.stderr, proc.stderr[-3000:]
