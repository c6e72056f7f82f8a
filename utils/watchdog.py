"""A stall becomes an error: per-rank heartbeats and a hang timeout.

Each rank keeps a heartbeat in memory (step, phase, the last collective it entered and whether it is still inside)
that the training loop and every torch.distributed collective (DeepSpeed's included: they are wrapped while the
watchdog runs) update with a few attribute writes and no I/O, and a
daemon thread writes it to `<output_dir>/heartbeat/rank_<r>.json` every few seconds. When a rank has made no
progress for --hang_timeout seconds (it waits in a collective for a peer that stopped, or it is stuck itself), its
thread reads every rank's heartbeat file, names the rank that stopped (its heartbeat file stopped changing: the
process is stopped or gone) or is stuck (alive but outside the collective the others wait in) and the operation it
was in, dumps this rank's Python stacks (faulthandler), and ends the process with exit code 124. Every live rank
does the same, so the launcher sees the job fail instead of waiting forever. A peer on this host found stopped
(SIGSTOP: state T) is killed (SIGKILL), since it can neither dump its stack nor exit by itself.

Files only (a shared output_dir or one host); nothing listens on the network.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HANG_EXIT_CODE = 124
HEARTBEAT_DIR = "heartbeat"


class _Heartbeat:
    """This rank's progress, written by the main thread, read by the watchdog thread."""

    def __init__(self):
        self.step = 0
        self.phase = "setup"
        self.collective = None       # name of the last collective entered
        self.collectives = 0         # how many collectives this rank entered
        self.in_collective = False
        self.progress = time.time()  # last time anything above changed


_beat = _Heartbeat()
_active: "Watchdog | None" = None


def progress(step: int | None = None, phase: str | None = None) -> None:
    """Records that this rank moved on (a new step or phase). A new step or phase is also written to the heartbeat
    file at once (one small file per phase, not per collective), so that a rank that stops is reported where it
    stopped, not where its last periodic write saw it."""
    changed = (step is not None and step != _beat.step) or (phase is not None and phase != _beat.phase)
    if step is not None:
        _beat.step = step
    if phase is not None:
        _beat.phase = phase
    _beat.progress = time.time()
    if changed and _active is not None:
        try:
            _active.write()
        except OSError:
            pass


@contextmanager
def collective(name: str):
    """Marks a collective call: its name, and whether this rank is still inside it."""
    _beat.collectives += 1
    _beat.collective, _beat.in_collective, _beat.progress = name, True, time.time()
    try:
        yield
    finally:
        _beat.in_collective, _beat.progress = False, time.time()


# torch.distributed's collectives, wrapped while a watchdog runs so that DeepSpeed's own (ZeRO gathers, gradient
# reductions) count as progress and name the operation a stalled rank waits in. A wrapper is a few attribute
# writes per call.
TORCH_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                     "broadcast", "reduce", "barrier", "all_to_all_single", "all_to_all", "broadcast_object_list",
                     "all_gather_object", "gather", "scatter", "send", "recv")
_patched: list = []  # (object, attribute, original)


def _wrap(name: str, fn):
    import functools

    @functools.wraps(fn)
    def tracked(*args, **kwargs):
        with collective(name):
            return fn(*args, **kwargs)
    return tracked


def _track_torch_collectives(on: bool) -> None:
    """Wraps (on) or restores (off) torch.distributed's collectives, and the gather/scatter functions DeepSpeed's
    communication backend looked up once when it started."""
    import sys as _sys

    import torch.distributed as tdist

    if on and not _patched:
        targets = [(tdist, name, name) for name in TORCH_COLLECTIVES]
        ds_comm = _sys.modules.get("deepspeed.comm.comm")  # only if DeepSpeed is in use already
        cdb = getattr(ds_comm, "cdb", None)
        if cdb is not None:
            targets += [(cdb, "all_gather_function", "all_gather_into_tensor"),
                        (cdb, "reduce_scatter_function", "reduce_scatter_tensor")]
        for obj, attr, name in targets:
            fn = getattr(obj, attr, None)
            if callable(fn):
                _patched.append((obj, attr, fn))
                setattr(obj, attr, _wrap(name, fn))
    elif not on:
        for obj, attr, fn in reversed(_patched):
            setattr(obj, attr, fn)
        _patched.clear()


def snapshot() -> dict:
    b = _beat
    return {"step": b.step, "phase": b.phase, "collective": b.collective, "collectives": b.collectives,
            "in_collective": b.in_collective, "progress": b.progress}


def describe(record: dict) -> str:
    """"step 3, phase train_step, inside all_reduce_mean (collective #12)" from a heartbeat record."""
    where = f"step {record.get('step')}, phase {record.get('phase')}"
    name = record.get("collective")
    if name is None:
        return where + ", no collective yet"
    state = "inside" if record.get("in_collective") else "last finished"
    return f"{where}, {state} {name} (collective #{record.get('collectives')})"


def diagnose(me: int, records: dict[int, dict | None], world_size: int, now: float, timeout: float,
             stale_after: float) -> tuple[list[int], str]:
    """(the ranks to blame, the diagnosis) from every rank's last heartbeat record (None: no file).

    A rank whose record stopped being rewritten for `stale_after` seconds has stopped (or died); failing that, a
    rank outside any collective while others wait inside one is stuck; failing that, the ranks that entered the
    fewest collectives are behind (the others wait for them in a collective they have not reached)."""
    lines, blamed = [], []
    mine = records.get(me) or {}
    lines.append(f"chatrlhf watchdog: rank {me} made no progress for {now - mine.get('progress', now):.0f} s "
                 f"(--hang_timeout {timeout:g}); it is at {describe(mine)}.")
    missing = [r for r in range(world_size) if records.get(r) is None]
    stopped = [r for r in range(world_size) if r not in missing and now - records[r]["beat"] > stale_after]
    for r in stopped:
        rec = records[r]
        lines.append(f"rank {r} stopped: its heartbeat has not changed for {now - rec['beat']:.0f} s (pid "
                     f"{rec.get('pid')} on {rec.get('host')}: stopped by a signal, swapped out, or dead). It was at "
                     f"{describe(rec)}.")
    blamed += stopped
    if not stopped:
        live = [r for r in range(world_size) if r not in missing]
        waiting = [r for r in live if records[r].get("in_collective")]
        outside = [r for r in live if not records[r].get("in_collective")]
        if waiting and outside:
            for r in outside:
                lines.append(f"rank {r} is stuck outside the collective the others wait in: it is alive but made "
                             f"no progress for {now - records[r]['progress']:.0f} s at {describe(records[r])}.")
            blamed += outside
        elif live:
            fewest = min(records[r].get("collectives", 0) for r in live)
            behind = [r for r in live if records[r].get("collectives", 0) == fewest]
            if len(behind) < len(live):
                for r in behind:
                    lines.append(f"rank {r} is behind: {fewest} collectives against up to "
                                 f"{max(records[x].get('collectives', 0) for x in live)} on other ranks, at "
                                 f"{describe(records[r])}.")
                blamed += behind
    for r in missing:
        lines.append(f"rank {r}: no heartbeat file (it has not started the loop, or its output_dir is not shared "
                     "with this host).")
    if not blamed and not missing:
        lines.append("every rank is alive and waiting: the ranks entered different collectives, or one blocked "
                     "outside torch.distributed's Python calls.")
    lines.append("last heartbeat of each rank:")
    for r in range(world_size):
        rec = records.get(r)
        lines.append(f"  rank {r}: " + ("none" if rec is None else
                                        f"{describe(rec)}; written {now - rec['beat']:.0f} s ago, last progress "
                                        f"{now - rec['progress']:.0f} s ago (pid {rec.get('pid')} on "
                                        f"{rec.get('host')})"))
    lines.append(f"Python stacks of rank {me} follow. Exiting with code {HANG_EXIT_CODE}.")
    return blamed + missing, "\n".join(lines)


class Watchdog:
    """One rank's heartbeat writer and hang detector; `start` makes one, `stop` ends it."""

    def __init__(self, output_dir, timeout: float, rank: int, world_size: int, run_id: str,
                 interval: float | None = None):
        self.dir = Path(output_dir) / HEARTBEAT_DIR
        self.timeout, self.rank, self.world_size, self.run_id = float(timeout), rank, world_size, run_id
        self.interval = interval or min(5.0, max(0.5, self.timeout / 4))
        self.stale_after = max(3 * self.interval, 2.0)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"rank_{rank}.json"
        self._thread = threading.Thread(target=self._run, name="chatrlhf-watchdog", daemon=True)

    def record(self) -> dict:
        return {"run": self.run_id, "rank": self.rank, "pid": self.pid, "host": self.host, "beat": time.time(),
                **snapshot()}

    def write(self) -> None:
        tmp = self.file.with_name(f".{self.file.name}.{threading.get_ident()}.tmp")  # main and watchdog thread
        tmp.write_text(json.dumps(self.record()))
        os.replace(tmp, self.file)

    def read_all(self) -> dict[int, dict | None]:
        out = {}
        for r in range(self.world_size):
            try:
                rec = json.loads((self.dir / f"rank_{r}.json").read_text())
            except (OSError, ValueError):
                rec = None
            out[r] = rec if rec and rec.get("run") == self.run_id else None
        out[self.rank] = self.record()
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except OSError:
                pass  # a full or vanished disk must not kill training; detection below still works
            if time.time() - _beat.progress > self.timeout:
                self.fire()

    def fire(self) -> None:
        blamed, text = diagnose(self.rank, self.read_all(), self.world_size, time.time(), self.timeout,
                                self.stale_after)
        report = self.dir / f"hang_rank_{self.rank}.txt"
        try:
            with report.open("w") as f:
                f.write(text + "\n")
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        sys.stderr.write(f"\n{text}\n(also in {report})\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        from chatrlhf.utils import distributed  # lazily: distributed imports this module

        records = self.read_all()
        for r in blamed:
            rec = records.get(r)
            if rec and rec.get("host") == self.host and rec.get("pid") != self.pid and _is_stopped(rec["pid"]):
                try:
                    os.kill(rec["pid"], signal.SIGKILL)
                    sys.stderr.write(f"chatrlhf watchdog: killed the stopped rank {r} (pid {rec['pid']})\n")
                    distributed.release_shared_memory(r)
                except OSError:
                    pass
        distributed.release_shared_memory()  # os._exit skips the atexit handler that unlinks it
        os._exit(HANG_EXIT_CODE)

    def start(self) -> "Watchdog":
        progress()
        self.write()
        _track_torch_collectives(True)
        self._thread.start()
        return self

    def stop(self) -> None:
        _track_torch_collectives(False)
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)
        try:
            self.file.unlink(missing_ok=True)
            self.dir.rmdir()  # the last rank out removes the folder
        except OSError:
            pass


def _is_stopped(pid: int) -> bool:
    """Whether `pid` is in the stopped state (SIGSTOP, or stopped under a tracer)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((line.split()[1] for line in f if line.startswith("State:")), "")
    except OSError:
        return False
    return state in ("T", "t")


def start(output_dir, timeout: float, rank: int, world_size: int, run_id: str,
          interval: float | None = None) -> Watchdog | None:
    """Starts this rank's watchdog (None when `timeout` is 0: off). Stop it with `stop()`."""
    global _active
    stop()
    if not timeout or timeout <= 0:
        return None
    _active = Watchdog(output_dir, timeout, rank, world_size, run_id, interval).start()
    return _active


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None
