"""Resumable checkpoints: every engine's DeepSpeed state, the trainer state and each rank's RNG.

Layout: `<output_dir>/checkpoints/step_<N>/{<engine name>/, trainer_state.json, rng_<rank>.pt}` plus a
`latest` file naming the newest complete one. `latest` is replaced atomically only after every rank has
finished writing, so a crash during a save leaves the previous checkpoint in charge.

Nothing loaded from a checkpoint can run code: every file is read with `torch.load(weights_only=True)`, which
accepts tensors, plain containers and the few plain DeepSpeed types in `_deepspeed_safe_globals`. The RNG files
hold only tensors, lists and numbers; `install_safe_loading` routes a DeepSpeed engine's own loads here too.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds something other than tensors and plain containers; it was not loaded."""


@functools.cache
def _deepspeed_safe_globals() -> tuple:
    """The plain non-tensor types DeepSpeed stores in its checkpoints (found by saving ZeRO 0-3, bf16/fp32, with
    and without LoRA): loss-scaler state objects, the ZeRO stage enum, and bf16/ZeRO-1/2 fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def safe_load(path: str | Path, map_location=None, deepspeed_types: bool = False):
    """`torch.load(path, weights_only=True)`: tensors and plain containers only (plus, with `deepspeed_types`,
    `_deepspeed_safe_globals`). Anything else raises UnsafeCheckpointError naming the file, never runs."""
    allowed = list(_deepspeed_safe_globals()) if deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, the very thing we refuse: keep only what it found.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\. Please|\n\n|$)", str(e),
                          re.DOTALL)
        what = found.group(1).strip() if found else str(e).splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain containers ({what}); unpickling it "
            "could run code, so checkpoints are read with torch.load(weights_only=True) only") from None


def install_safe_loading(ds_engine) -> None:
    """Makes a DeepSpeedEngine read its checkpoint files (model, optimizer and ZeRO states) through `safe_load`
    instead of DeepSpeed's `torch.load(weights_only=False)`. Idempotent; call it right after `deepspeed.initialize`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current, cls = ds_engine.checkpoint_engine, _safe_engine_class()
    if current is None:  # a frozen ZeRO-3 engine (DeepSpeedZeRoOffload) has none: it never saves or loads
        return
    if isinstance(current, cls) or vars(current).get("load") is _safe_engine_load:
        return
    if type(current) is TorchCheckpointEngine:  # the default: the same object state, our load
        safe = cls.__new__(cls)
        safe.__dict__.update(current.__dict__)
        ds_engine.checkpoint_engine = safe
    else:  # a configured writer (fast, decoupled): it saves its own way but reads with a plain torch.load
        current.load = _safe_engine_load


def _safe_engine_load(path: str, map_location=None):
    return safe_load(path, map_location, deepspeed_types=True)


@functools.cache
def _safe_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with weights_only=True (see `install_safe_loading`)."""

        def load(self, path: str, map_location=None):
            return _safe_engine_load(path, map_location)

    return SafeTorchCheckpointEngine


def rng_state() -> dict:
    """This rank's RNG states as tensors, lists and numbers only, so that the file loads with weights_only=True."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "accelerator": dist.accelerator().get_rng_state() if dist.accelerator().device_name() != "cpu" else None}


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
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
    """Restores engines and this rank's RNG from `path`; returns the trainer state. Every file is read weights-only
    (UnsafeCheckpointError names a file that holds anything else)."""
    for name, engine in engines.items():
        ds_engine = getattr(engine, "engine", None)  # a HybridEngine's DeepSpeedEngine
        if ds_engine is not None and hasattr(ds_engine, "checkpoint_engine"):
            install_safe_loading(ds_engine)  # also when whoever built the engine did not
        engine.load_checkpoint(path, tag=name)
    rng_file = path / f"rng_{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on a different number of ranks
        try:
            state = safe_load(rng_file)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{e}. (Before chatrlhf stored RNG states as tensors, rng files held numpy "
                                        "objects: if you wrote this one, delete it to resume without restoring "
                                        "the random state.)") from None
        set_rng_state(state)
    return json.loads((path / "trainer_state.json").read_text())


def _prune(root: Path, keep: int) -> None:
    current = (root / LATEST).read_text().strip()
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))
    current_step = int(current.split("_")[1])
    complete = [p for s, p in steps if s <= current_step]
    for p in complete[:-max(keep, 1)]:
        shutil.rmtree(p, ignore_errors=True)
