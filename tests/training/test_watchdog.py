"""A stall becomes an error: the diagnosis from heartbeats, a lone stuck process, and two ranks of which one is
SIGSTOP'd: the job ends within --hang_timeout plus a margin, naming the rank that stopped and what it was doing."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chatrlhf.utils import watchdog

NOW = 1000.0


def record(rank, *, beat=NOW, progress=NOW - 30, step=3, phase="train_step", collective="all_reduce_mean",
           collectives=12, inside=True):
    return {"run": "r", "rank": rank, "pid": 100 + rank, "host": "h", "beat": beat, "progress": progress,
            "step": step, "phase": phase, "collective": collective, "collectives": collectives,
            "in_collective": inside}


def test_a_rank_whose_heartbeat_stopped_is_named_with_what_it_was_doing():
    records = {0: record(0), 1: record(1, beat=NOW - 25, inside=False, collectives=11, phase="train_step")}
    blamed, text = watchdog.diagnose(0, records, 2, NOW, timeout=20, stale_after=15)
    assert blamed == [1]
    assert "rank 0 made no progress for 30 s (--hang_timeout 20)" in text
    assert "inside all_reduce_mean (collective #12)" in text  # where rank 0 waits
    assert "rank 1 stopped: its heartbeat has not changed for 25 s (pid 101 on h" in text
    assert "step 3, phase train_step, last finished all_reduce_mean (collective #11)" in text
    assert "last heartbeat of each rank:\n  rank 0: step 3" in text and "written 25 s ago" in text


def test_a_live_rank_stuck_outside_the_collective_and_a_rank_behind():
    records = {0: record(0), 1: record(1, inside=False, phase="checkpoint")}
    blamed, text = watchdog.diagnose(0, records, 2, NOW, timeout=20, stale_after=15)
    assert blamed == [1] and "rank 1 is stuck outside the collective" in text and "phase checkpoint" in text
    records = {0: record(0, collectives=12), 1: record(1, collectives=9, collective="barrier")}
    blamed, text = watchdog.diagnose(1, records, 2, NOW, timeout=20, stale_after=15)
    assert blamed == [1] and "rank 1 is behind: 9 collectives against up to 12" in text
    blamed, text = watchdog.diagnose(0, {0: record(0), 1: None}, 2, NOW, timeout=20, stale_after=15)
    assert blamed == [1] and "rank 1: no heartbeat file" in text


def test_a_lone_stuck_process_dumps_its_stack_and_exits_124(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from chatrlhf.utils import watchdog
        watchdog.start({str(tmp_path)!r}, 2, 0, 1, "run", interval=0.25)
        watchdog.progress(5, "train_step")
        def stuck_in_a_loop():
            while True:
                time.sleep(0.05)
        stuck_in_a_loop()
    """)
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == watchdog.HANG_EXIT_CODE, proc.stderr[-2000:]
    assert time.time() - start < 30
    assert "rank 0 made no progress" in proc.stderr and "step 5, phase train_step" in proc.stderr
    assert "stuck_in_a_loop" in proc.stderr  # faulthandler's Python stack of the main thread
    assert "stuck_in_a_loop" in (tmp_path / "heartbeat" / "hang_rank_0.txt").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_one_sigstopped_end_with_the_diagnosis(tiny_model_dir, hh_rlhf_sample, tmp_path):
    data = hh_rlhf_sample(48, tmp_path)
    out = tmp_path / "run"
    timeout = 20
    flags = dict(model_name_or_path=tiny_model_dir("llama"), data_path=data, data_split="10,0,0", dtype="fp32",
                 output_dir=out, data_output_path=tmp_path / "cache", max_seq_len=48, per_device_train_batch_size=2,
                 num_train_epochs=1000, eval_iters=1, skip_malformed="true", hang_timeout=timeout)
    port = _free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "chatrlhf.training.step1_sft"] + [w for k, v in flags.items() for w in (f"--{k}", str(v))]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    beat = out / "heartbeat" / "rank_1.json"
    stopped_pid = None
    try:
        deadline = time.time() + 400
        while stopped_pid is None:
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.time() < deadline, "rank 1 never reached step 3"
            try:
                rec = json.loads(beat.read_text())
            except (OSError, ValueError):
                rec = {}
            if rec.get("step", 0) >= 3:
                stopped_pid = rec["pid"]
                os.kill(stopped_pid, signal.SIGSTOP)
            time.sleep(0.2)
        stopped_at = time.time()
        code = job.wait(timeout=timeout + 90)
        elapsed = time.time() - stopped_at
        text = (tmp_path / "job.log").read_text()
        assert code != 0, text[-3000:]
        assert elapsed < timeout + 60, elapsed  # the timeout, a heartbeat interval and the launcher's teardown
        assert "rank 0 made no progress for" in text and "rank 1 stopped: its heartbeat has not changed" in text
        assert f"pid {stopped_pid}" in text and "phase train_step" in text, text[-3000:]
        assert "Current thread" in text or "Thread 0x" in text  # rank 0's Python stacks
        assert "hang_rank_0.txt" in text
        # Both ranks' CPU all-reduce segments unlinked: the one that exited and the one it killed.
        assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []
    finally:
        if stopped_pid is not None:  # never leave a stopped process behind
            try:
                os.kill(stopped_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()
    assert _gone(stopped_pid)


def _gone(pid: int, wait: float = 10.0) -> bool:
    """Whether `pid` has exited (a zombie awaiting its reaper counts as gone)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False
