"""Our settings -> a DeepSpeed config dict. Pure functions (no deepspeed import) so they are unit-tested on CPU."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


REDUCE_BUCKET_SIZE = int(5e8)  # DeepSpeed's default


def build_ds_config(*, zero_stage: int, dtype: str, micro_batch_size: int, gradient_accumulation_steps: int,
                    world_size: int, offload: bool = False, gradient_clipping: float = 1.0,
                    inference_only: bool = False, user_config: dict | None = None,
                    reduce_scatter: bool = True) -> dict[str, Any]:
    """The config for one model's engine.

    dtype: fp32, bf16 or fp16 (already resolved from "auto"). offload: optimizer state to CPU, plus parameters
    under ZeRO-3. inference_only: a frozen model (reference, reward): no optimizer offload, just sharding.
    user_config: a user's own DeepSpeed JSON, merged over ours (their keys win, nested dicts merged).
    reduce_scatter: ZeRO's gradient reduction by partition (DeepSpeed's default); False all-reduces each bucket
    whole, which is faster on a CPU (over gloo, and through the shared-memory kernel of shm_collectives.py).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, bf16 or fp16 here, got {dtype!r}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update({
            # Small parameters stay whole on every rank: gathering them costs more than it saves.
            "stage3_param_persistence_threshold": 1e4,
            # DeepSpeed's defaults, not DeepSpeed-Chat's 3e7: with at most 3e7 parameters live a model released
            # and re-gathered its layers between the forward and the backward of every step, fits or not.
            "stage3_max_live_parameters": 1e9,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_gather_16bit_weights_on_model_save": True,
            # DeepSpeed's memory_efficient_linear swaps torch's F.linear for its own autograd function, process-wide,
            # to save autocast's weight copies (we train without autocast). Its bf16 matmuls bypassed the CPU
            # fp32-kernel path (hybrid_engine.Fp32Kernels): ZeRO-3's PPO step ran at 0.48x ZeRO-2's. torch's own
            # linear under ZeRO-3's hooks gathers each weight for forward and backward all the same.
            "memory_efficient_linear": False,
        })
        if not reduce_scatter:
            # As for ZeRO 1-2 below: ZeRO-3 then all-reduces each contiguous gradient bucket whole and keeps its
            # partition, one collective where the partitioned path made one reduce-scatter per bucket of slices.
            zero["reduce_scatter"] = False
    if offload and not inference_only:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if zero_stage in (1, 2):
        # DeepSpeed's own defaults (reduce_bucket_size 5e8, overlap_comm off below ZeRO-3): a 5e7 bucket cut a 135M
        # model's gradient reduction into three collectives instead of one.
        zero.update({"contiguous_gradients": True, "reduce_bucket_size": REDUCE_BUCKET_SIZE})
        if not reduce_scatter:
            # The partitioned path slices and copies every parameter's gradient per owning rank before reducing;
            # over gloo one all-reduce of the whole bucket took 1.2 s less per dschat PPO step (3 interleaved rounds).
            zero["reduce_scatter"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
        "gradient_clipping": gradient_clipping,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "steps_per_print": 1e9,  # we log ourselves; DeepSpeed's own prints would interleave with tqdm
    }
    if offload and not inference_only:
        config["zero_force_ds_cpu_optimizer"] = False
    if user_config:
        _check_batch_keys(config, user_config)
        config = merge_user_config(config, user_config)
    return config


BATCH_FLAGS = {"train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
               "gradient_accumulation_steps": "--gradient_accumulation_steps", "train_batch_size": None}


def _check_batch_keys(ours: dict, theirs: dict) -> None:
    """Batch sizes drive our data loading and step counting, so they come from flags; a JSON that says
    otherwise is refused rather than silently disagreeing with the data loader."""
    for key, flag in BATCH_FLAGS.items():
        if key in theirs and theirs[key] != ours[key]:
            how = f"set {flag} instead" if flag else "it follows from the micro-batch, accumulation and world size"
            raise ValueError(f"--deepspeed_config sets {key}={theirs[key]} but the run uses {ours[key]}: {how}")


def merge_user_config(ours: dict, theirs: dict) -> dict:
    """Deep-merges `theirs` over `ours`; batch-size keys they set are kept as they wrote them."""
    merged = copy.deepcopy(ours)
    for key, value in theirs.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_user_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_user_config(path: str | None) -> dict | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--deepspeed_config: no such file {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {p}: not valid JSON ({e})") from None


def resolve_dtype(dtype: str, bf16_supported: bool) -> str:
    """"auto" -> bf16 where the accelerator supports it, else fp32."""
    if dtype == "auto":
        return "bf16" if bf16_supported else "fp32"
    return dtype
