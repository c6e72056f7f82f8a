"""Rank-aware console output and metrics: a JSONL file always, TensorBoard and Weights & Biases when asked.
Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from chatrlhf.utils.distributed import is_main_process

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "chatrlhf_config.yaml"  # chatrlhf.utils.config.CONFIG_FILE: the run's resolved config
REPORT_TO = ("none", "wandb")


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
    """`log(step, {"train/loss": ...})` appends one JSON line (with wall time) and a TensorBoard scalar each;
    `samples(step, rows)` appends generated answers to samples.jsonl.

    With report_to="wandb" the same metric names go to a Weights & Biases run (project $WANDB_PROJECT, default
    chatrlhf; named after output_dir; files under output_dir/wandb; WANDB_MODE=offline writes without a network),
    with the resolved config (the chatrlhf_config.yaml the step saves before training) as its config and the sample
    answers as a table. The run starts at the first log, after the config is saved, and ends with `close()`."""

    def __init__(self, output_dir: str | Path, tensorboard_dir: str | Path | None = None, report_to: str = "none"):
        if report_to not in REPORT_TO:
            raise ValueError(f"--report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
        self.active = is_main_process()
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.writer = None
        self.report_to = report_to
        self.wandb_run = None
        self.sample_rows: list[dict] = []
        self.start = time.time()
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        if report_to == "wandb":
            try:
                import wandb  # noqa: F401  fail now, not after the first training step
            except ImportError:
                raise ImportError("--report_to wandb needs the wandb package: pip install 'chatrlhf[wandb]'") from None

    def _wandb(self):
        if self.report_to != "wandb" or not self.active:
            return None
        if self.wandb_run is None:
            import wandb
            import yaml

            config_file = self.output_dir / CONFIG_FILE
            config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "chatrlhf"),
                                        name=os.environ.get("WANDB_NAME", self.output_dir.resolve().name),
                                        dir=str(self.output_dir), config=config, reinit="finish_previous")
        return self.wandb_run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, "time": round(time.time() - self.start, 3)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if self.writer:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        run = self._wandb()
        if run is not None:
            run.log({**numbers, "time": record["time"]}, step=step)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Generated answers, e.g. [{"prompt", "answer", "score"}]: one JSON line each in samples.jsonl and, with
        wandb, the table "samples" of every row so far."""
        if not self.active or not rows:
            return
        rows = [{"step": step, **{k: _scalar(v) for k, v in r.items()}} for r in rows]
        with (self.output_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.sample_rows += rows
        run = self._wandb()
        if run is not None:
            import wandb

            columns = list(dict.fromkeys(k for r in self.sample_rows for k in r))
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in self.sample_rows])
            run.log({"samples": table}, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0 (disabled elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not is_main_process(), dynamic_ncols=True)
