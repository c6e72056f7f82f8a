"""Running one step: a fresh process per step (the `deepspeed` launcher, or `python -m` on CPU), or in-process.

Output is teed to the console and to `<output>/logs/stepN.log` (appended: a resumed step keeps the earlier
attempt's lines). A step that finishes writes `<step output>/pipeline_done.json`; without it the step counts as
not done, and its rerun resumes from the step's own checkpoints (`--save_interval`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from chatrlhf.training.pipeline.plan import StepPlan

LAUNCHERS = ("auto", "deepspeed", "python", "inprocess")
TAIL_LINES = 40
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class StepFailed(RuntimeError):
    """A step ended with an error; the message names it and carries its log tail and hints."""

    def __init__(self, plan: StepPlan, reason: str, elapsed: float):
        self.plan, self.reason = plan, reason
        tail = "\n".join("    " + line for line in log_tail(plan.log))
        super().__init__(
            f"step {plan.step.number} ({plan.step.title}) failed after {elapsed:.0f} s: {reason}\n"
            f"last {TAIL_LINES} lines of {plan.log}:\n{tail}\n\n{hints(plan, tail)}")


def launcher_for(deployment: str, launcher: str, num_gpus: int | None) -> str:
    """auto: `deepspeed` for GPU deployments and for several CPU ranks, else a `python -m` process."""
    if launcher != "auto":
        return launcher
    return "python" if deployment == "cpu" and (num_gpus or 1) == 1 else "deepspeed"


def command(plan: StepPlan, deployment: str, launcher: str, *, num_gpus: int | None = None,
            hostfile: str | None = None, launcher_args: list[str] = ()) -> list[str]:
    """The command line that runs `plan` (flags from its args file); `launcher_args` go to the deepspeed launcher
    of multi_node (e.g. --no_ssh --node_rank 1 --master_addr 10.0.0.1)."""
    target = ["--module", plan.step.module, "--config", str(plan.args_file)]
    if launcher == "python":
        return [sys.executable, "-m", plan.step.module, "--config", str(plan.args_file)]
    exe = shutil.which("deepspeed")
    ds = [sys.executable, exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if deployment == "multi_node":
        return (ds + ["--hostfile", str(hostfile)] + (["--num_gpus", str(num_gpus)] if num_gpus else [])
                + list(launcher_args) + target)
    count = 1 if deployment == "single_gpu" else num_gpus  # single_node/cpu: all local devices unless given
    return ds + (["--num_gpus", str(count)] if count else []) + ["--master_port", str(_free_port())] + target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads(interval: float = 0.5) -> int:
    """Threads for a one-process CPU step: the cores other processes leave idle. An OpenMP team waits for its
    slowest thread at every operator, so on a busy machine two threads can be many times slower than one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - busy_cores(interval))))


def busy_cores(interval: float) -> float:
    """Cores in use right now, measured over `interval` seconds from /proc/stat; elsewhere the 1-minute load
    average (which would still count a `pip install` that has just finished)."""
    try:
        busy0, total0 = _cpu_jiffies()
        time.sleep(interval)
        busy1, total1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = total1 - total0
    return (os.cpu_count() or 1) * (busy1 - busy0) / total if total > 0 else 0.0


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(values) - values[3] - values[4], sum(values)


def run_step(plan: StepPlan, cmd: list[str] | None, env: dict | None = None) -> float:
    """Runs the step (in-process when `cmd` is None; `env`: extra environment variables of the subprocess);
    returns its wall time. Raises StepFailed."""
    plan.write_args()
    plan.log.parent.mkdir(parents=True, exist_ok=True)
    with plan.log.open("a") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} step {plan.step.number} ({plan.step.title}): "
                f"{' '.join(cmd) if cmd else 'in-process run(config)'}\n")
    start = time.time()
    if cmd is None:
        _run_inprocess(plan, start)
    else:
        _run_subprocess(plan, cmd, start, env or {})
    return time.time() - start


def _run_subprocess(plan: StepPlan, cmd: list[str], start: float, extra_env: dict) -> None:
    # A process group of this process (an earlier in-process run) must not leak into the step's own.
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra_env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    console = getattr(sys.stdout, "buffer", None)
    with _sigterm_raises():
        code = _tee_process(proc, plan.log, console)
    if code != 0:
        reason = (f"killed by signal {-code} (out of host memory?)" if code < 0 else f"exit code {code}")
        raise StepFailed(plan, reason, time.time() - start)


def _tee_process(proc, log_path: Path, console) -> int:
    try:
        with log_path.open("ab") as log:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                log.write(chunk)
                log.flush()
                if console is not None:
                    console.write(chunk)
                    console.flush()
                else:
                    sys.stdout.write(chunk.decode(errors="replace"))
        return proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: stop the step too; its checkpoints let a rerun resume
        proc.terminate()
        proc.wait()
        raise


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM becomes SystemExit while a step runs, so that the step is stopped with the pipeline."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_inprocess(plan: StepPlan, start: float) -> None:
    import importlib

    from chatrlhf.utils.config import from_flat

    main = importlib.import_module(plan.step.module + ".main")
    cfg = from_flat(plan.step.config_class(), plan.flags, where=str(plan.args_file))
    with _tee(plan.log) as log:
        try:
            main.run(cfg)
        except Exception as e:  # noqa: BLE001 - reported with the log tail, as for a subprocess
            log.write(traceback.format_exc())
            log.flush()
            raise StepFailed(plan, f"{type(e).__name__}: {e}", time.time() - start) from e


class _Tee:
    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        if not self.log.closed:  # a logging handler may outlive the step it was made in
            self.log.write(text)
        return self.stream.write(text)

    def flush(self):
        if not self.log.closed:
            self.log.flush()
        self.stream.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _tee(path: Path):
    """stdout, stderr and the root logger's console handlers also go to `path` while the step runs."""
    with path.open("a") as log:
        out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
        previous = [h.setStream(err) for h in handlers]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield log
        finally:
            for h, stream in zip(handlers, previous):
                h.setStream(stream)


def log_tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last `n` lines of a log, progress-bar redraws (carriage returns) collapsed to their final state."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [f"(no log at {path})"]
    lines = [line.split("\r")[-1] if line.strip("\r") else line for line in text.split("\n")]
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines[-n:]


def hints(plan: StepPlan, tail: str) -> str:
    """What usually fixes a failing step, with this step's own flag names."""
    n = plan.step.number
    opt = f"--step{n}-args"
    where = f"  - the full output is in {plan.log}; the flags the step ran with are in {plan.args_file}"
    if "NonFiniteError" in tail:
        lr = "--actor_learning_rate 5e-6 --critic_learning_rate 2e-6" if n == 3 else "--learning_rate 1e-5"
        return ("Hints (the training diverged; nothing was saved from the broken state):\n"
                f"  - a lower learning rate and some warmup: {opt} \"{lr} --num_warmup_steps 10\"\n"
                f"  - rerun with --force to start the step over, or add --resume_with_changes to {opt} to continue "
                f"from its last good checkpoint with the new settings\n{where}")
    if "ResumeRefused" in tail or "was written by a run with other settings" in tail:
        return ("Hints (the step's checkpoint belongs to a run with other settings):\n"
                f"  - --force reruns the step from scratch; another --output-dir keeps both; {opt} "
                f"\"--resume_with_changes\" continues the old run with the new settings\n{where}")
    if "chatrlhf watchdog" in tail:
        return ("Hints (a rank stopped making progress; see the watchdog's diagnosis above):\n"
                "  - a rank killed by the kernel (out of host memory: dmesg), a stopped or swapped-out process, or "
                f"a collective that one rank skipped\n  - raise the timeout if a step is that slow: {opt} "
                f"\"--hang_timeout 3600\"\n{where}")
    if n == 3:
        batch = "--per_device_generation_batch_size 4 --per_device_training_batch_size 4"
        stage, lora = "--actor-zero-stage 3 --reward-zero-stage 3", "--actor_lora_dim 64 --only_optimize_lora"
        ckpt = "--actor_gradient_checkpointing --critic_gradient_checkpointing"
        extra = f"\n  - shorter sequences: {opt} \"--max_prompt_seq_len 128 --max_answer_seq_len 128\""
    else:
        batch = "--per_device_train_batch_size 2 --per_device_eval_batch_size 2 --gradient_accumulation_steps 4"
        stage = "--actor-zero-stage 3" if n == 1 else "--reward-zero-stage 3"
        lora, ckpt = "--lora_dim 64 --only_optimize_lora", "--gradient_checkpointing"
        extra = f"\n  - shorter sequences: {opt} \"--max_seq_len 256\""
    memory = any(s in tail.lower() for s in ("out of memory", "outofmemory", "cannot allocate", "killed"))
    return ("Hints" + (" (this looks like a memory error)" if memory else "") + ":\n"
            f"  - smaller batches: {opt} \"{batch}\"\n"
            f"  - a higher ZeRO stage shards the model over the GPUs: {stage}\n"
            f"  - ZeRO-Offload keeps optimizer state in CPU memory: {opt} \"--offload\"\n"
            f"  - LoRA trains far fewer weights: {opt} \"{lora}\"\n"
            f"  - gradient checkpointing trades compute for activation memory: {opt} \"{ckpt}\"{extra}\n"
            f"  - the full output is in {plan.log}; the flags the step ran with are in {plan.args_file}\n"
            "Rerun the same command when fixed: finished steps are skipped and this one resumes from its last "
            "checkpoint.")


def mark_done(plan: StepPlan, wall_time: float, metrics: dict) -> None:
    record = {"step": plan.step.number, "name": plan.step.name, "wall_time_s": round(wall_time, 1),
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": metrics, "flags": plan.flags}
    plan.done_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.done_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, plan.done_file)
