"""Process-group helpers that work the same under the `deepspeed` launcher, `torchrun`, and a plain
`python` process (tests, CPU boxes).

A single process gets a one-rank group of its own, so every code path (ZeRO, barriers, all-reduce)
is the same whether one rank or many run it. Devices are reached through DeepSpeed's accelerator,
never `torch.cuda`, so the same code runs on CUDA and on DeepSpeed's CPU accelerator (gloo).
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, NoReturn

import torch
import torch.distributed as dist

from chatrlhf.utils import watchdog

# Added to --hang_timeout for the process group's own timeout: the watchdog (which names the rank that stopped)
# fires first; a collective that blocks even so fails after this much longer instead of waiting forever.
PG_TIMEOUT_MARGIN_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(hang_timeout: float | None = None) -> None:
    """Joins (or, for a lone process, creates) the default process group. Idempotent.

    `hang_timeout` (seconds, RunArgs.hang_timeout): collectives of the group time out after it plus
    PG_TIMEOUT_MARGIN_S (None or 0: DeepSpeed's default, 30 minutes)."""
    if dist.is_available() and dist.is_initialized():
        return
    # A plain `python` run has no launcher env: make it a world of one on loopback.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    kwargs = {"timeout": timedelta(seconds=hang_timeout + PG_TIMEOUT_MARGIN_S)} if hang_timeout else {}
    with _without_shm_op_for_one_rank():
        deepspeed.init_distributed(dist_backend=accelerator().communication_backend_name(), verbose=False, **kwargs)
    accelerator().set_device(get_local_rank())
    _install_exit_handler()


@contextmanager
def _without_shm_op_for_one_rank():
    """A world of one on the CPU accelerator skips DeepSpeed's shared-memory all-reduce op: it has no peer to share
    with, and building it (a C++ compile on first use, ~40 s here) was the demo's first minute on a new machine."""
    import importlib

    # Not `import deepspeed.comm.torch`: deepspeed.comm's star import rebinds that attribute to torch itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = getattr(ds_torch, "build_shm_op", None)
    if build is None or os.environ.get("WORLD_SIZE") != "1" or accelerator().device_name() != "cpu":
        yield
        return
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def _shm_segment(rank: int) -> str:
    """The /dev/shm segment DeepSpeed's CPU all-reduce made for `rank` of this run (its shm.cpp names it so)."""
    env = os.environ
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory(rank: int | None = None) -> None:
    """Unlinks this rank's (or local `rank`'s) CPU all-reduce segment, which DeepSpeed never does: 64 MiB stayed
    behind per rank and run. The other ranks keep their mappings (only the name goes), so it is safe once every
    rank has joined; a later run on the same port then starts clean. Nothing off the CPU accelerator."""
    if accelerator().device_name() != "cpu":
        return
    try:
        os.unlink(_shm_segment(get_rank() if rank is None else rank))
    except FileNotFoundError:
        pass


_exit = {"installed": False, "failed": False}  # failed: an unhandled exception is ending this process


def _install_exit_handler() -> None:
    """Once per process (a group may be destroyed and initialised again): `_shutdown` at exit, and a note of an
    unhandled exception on the way there."""
    if _exit["installed"]:
        return
    _exit["installed"] = True
    hook = sys.excepthook

    def excepthook(*exc):
        _exit["failed"] = True
        hook(*exc)

    sys.excepthook = excepthook
    atexit.register(_shutdown)


def _shutdown() -> None:
    """At exit, while the interpreter is whole: a process group left to interpreter teardown can abort the
    process (gloo's worker threads: "terminate called without an active exception", pytorch#190489). Not after
    an unhandled exception: peers may be blocked in a collective with this rank, and tearing the group down then
    could wait on them; the process fails either way."""
    rank = get_rank()  # before the group goes: afterwards get_rank falls back to the environment
    if is_initialized() and not _exit["failed"]:
        dist.destroy_process_group()
    release_shared_memory(rank)


def run_as_process(main: Callable[[], object]) -> NoReturn:
    """Runs `main()` as this process's whole life (a step's entry: `python -m`, the deepspeed launcher, the console
    scripts) and ends the process without interpreter teardown.

    DeepSpeed keeps references to the process groups, so destroying them at exit (`_shutdown`) leaves gloo's worker
    threads running. At teardown such a thread can take the GIL of a finalizing interpreter, which ends the thread
    inside C++ and aborts the rank ("terminate called without an active exception", one CI run in several, after
    the run had saved everything). So the exit work runs here while the interpreter is whole: non-daemon threads
    are joined, the exit handlers run (the group destroyed, shared memory unlinked, logs flushed), the streams are
    flushed, and os._exit ends the process with the code Python would have given it."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = 130  # what a shell reports for SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback; the hook also marks the process as failed for _shutdown
        code = 1
    shutdown_threads = getattr(threading, "_shutdown", None)  # what interpreter teardown runs first
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams: nothing left to lose
            pass
    os._exit(code)


def _exit_code(code: object) -> int:
    """SystemExit's argument as Python's own exit turns it into a status (a message goes to stderr, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device() -> torch.device:
    """This rank's device (`cuda:N` on GPU boxes, `cpu` on DeepSpeed's CPU accelerator)."""
    name = accelerator().device_name()
    return torch.device(name if name == "cpu" else f"{name}:{get_local_rank()}")


@contextmanager
def fork_rng():
    """Every random generator of this process saved on entry and restored on exit: the CPU's and, on an
    accelerator, each of its devices' (torch.manual_seed inside reseeds them all). What runs inside, a seeded
    evaluation, leaves the training's randomness exactly where it was."""
    acc = accelerator()
    cpu = torch.get_rng_state()
    devices = [] if acc.device_name() == "cpu" else [(i, acc.get_rng_state(i)) for i in range(acc.device_count())]
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        for i, state in devices:
            acc.set_rng_state(state, i)


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
        with watchdog.collective("barrier"):
            dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a new tensor; the input is left alone)."""
    t = t.detach().clone()
    if is_initialized() and get_world_size() > 1:
        with watchdog.collective("all_reduce_mean"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if is_initialized() and get_world_size() > 1:
        with watchdog.collective("all_reduce_sum"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if is_initialized() and get_world_size() > 1:
        with watchdog.collective("all_reduce_max"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (pickled; for small things such as paths and flags)."""
    if not (is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    with watchdog.collective("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]
