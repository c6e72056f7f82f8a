"""Rank-aware console output and metrics: a JSONL file always, TensorBoard when asked. Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from chatrlhf.utils.distributed import is_main_process

METRICS_FILE = "metrics.jsonl"


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Library warnings from every rank; our info messages from rank 0 only."""
    logging.basicConfig(level=level if is_main_process() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _scalar(v: Any):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


class MetricsLogger:
    """`log(step, {"train/loss": ...})` appends one JSON line (with wall time) and a TensorBoard scalar each."""

    def __init__(self, output_dir: str | Path, tensorboard_dir: str | Path | None = None):
        self.active = is_main_process()
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        self.start = time.time()
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, "time": round(time.time() - self.start, 3)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0 (disabled elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not is_main_process(), dynamic_ncols=True)
