"""Resumable checkpoints: every engine's DeepSpeed state, the trainer state and each rank's RNG.

Layout: `<output_dir>/checkpoints/step_<N>/{<engine name>/, trainer_state.json, rng_<rank>.pt}` plus a
`latest` file naming the newest complete one. `latest` is replaced atomically only after every rank has
finished writing, so a crash during a save leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import save_config

LATEST = "latest"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": dist.accelerator().get_rng_state() if dist.accelerator().device_name() != "cpu" else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None:
        dist.accelerator().set_rng_state(state["accelerator"])


def save(output_dir: str | Path, step: int, engines: dict, trainer_state: dict, keep: int = 2, config=None) -> Path:
    """Writes checkpoint `step_<step>` collectively (every rank calls this) and prunes to the newest `keep`.
    `config`, the run's resolved config, is written next to it."""
    root = checkpoint_root(output_dir)
    path = root / f"step_{step}"
    for name, engine in engines.items():
        engine.save_checkpoint(path, tag=name)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng_{dist.get_rank()}.pt")
    if dist.is_main_process():
        (path / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if config is not None:
            save_config(config, path)
    dist.barrier()  # every rank's files are on disk before `latest` moves
    if dist.is_main_process():
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, root / LATEST)
        _prune(root, keep)
    dist.barrier()
    return path


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_root(output_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def load(path: Path, engines: dict) -> dict:
    """Restores engines and this rank's RNG from `path`; returns the trainer state."""
    for name, engine in engines.items():
        engine.load_checkpoint(path, tag=name)
    rng_file = path / f"rng_{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on a different number of ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _prune(root: Path, keep: int) -> None:
    current = (root / LATEST).read_text().strip()
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))
    current_step = int(current.split("_")[1])
    complete = [p for s, p in steps if s <= current_step]
    for p in complete[:-max(keep, 1)]:
        shutil.rmtree(p, ignore_errors=True)
