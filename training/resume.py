"""Resume only what was asked: a checkpoint continues the run that wrote it, not a different one.

Every checkpoint carries the resolved config of its run (checkpoint.save writes it). Before resuming, the config
of the new run is compared with it flag by flag: a flag that changes what the run computes (model, data, learning
rate, schedule, batch geometry, seed, ZeRO stage, LoRA, ...) refuses the resume with the differences and the ways
out; flags that only change how the run is watched or where its logs go (ALLOWED) are allowed and logged. Unknown
flags count as meaningful: a new flag is refused until it is listed here.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from chatrlhf.utils.config import CONFIG_FILE, read_yaml, to_flat

logger = logging.getLogger(__name__)

# Flags that change nothing the run computes: logging, evaluation cadence, checkpoint cadence, where logs and
# caches go, memory placement (checkpointing, offload) and safety settings. Prefixed copies (actor_, critic_) too.
ALLOWED = frozenset({
    "output_dir", "log_interval", "eval_interval", "eval_iters", "per_device_eval_batch_size", "save_interval",
    "save_total_limit", "resume", "resume_with_changes", "enable_tensorboard", "tensorboard_path", "print_loss",
    "print_answers", "print_answers_interval", "hang_timeout", "memory_check", "data_output_path", "deepspeed",
    "local_rank", "gradient_checkpointing", "offload", "keep_lora_adapter", "enable_hybrid_engine",
    "unpin_actor_parameters", "release_inference_cache", "tp_gather_partition_size", "offload_reference_model",
    "offload_reward_model", "reference_zero_stage", "reward_zero_stage", "zero3_gather_whole", "report_to",
    "preprocessing_num_workers", "vllm_gpu_memory_utilization", "vllm_kv_cache_gb", "eval_greedy", "deepscale",
    "inference_tp_size",
    # DeepSpeed-Chat flags chatrlhf accepts and ignores
    "num_padding_at_beginning", "add_eot_token", "eot_token", "align_overflow",
})
PREFIXES = ("actor_", "critic_")


_checked: dict[tuple, dict] = {}  # (checkpoint, settings) already compared in this process: not logged twice


class ResumeRefused(ValueError):
    """The checkpoint in output_dir was written by a run with other meaningful settings."""


def allowed(flag: str) -> bool:
    base = next((flag[len(p):] for p in PREFIXES if flag.startswith(p) and flag[len(p):] in ALLOWED), flag)
    return base in ALLOWED


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a == b:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):  # one folder written two ways (relative, ~, absolute)
        pa, pb = os.path.expanduser(a), os.path.expanduser(b)
        return os.path.exists(pa) and os.path.exists(pb) and os.path.samefile(pa, pb)
    return False


def differences(saved: dict, now: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """{flag: (saved value, new value)} for every flag that differs. A flag the saved config lacks (added since)
    counts as its default; one the new config lacks (removed since) is ignored."""
    defaults = defaults or {}
    out = {}
    for flag, value in now.items():
        old = saved.get(flag, defaults.get(flag, "(not recorded)"))
        if not _same(old, value):
            out[flag] = (old, value)
    return out


def _defaults(config_class) -> dict:
    from chatrlhf.utils.config import flag_table

    return {name: default for name, (_, _, default, _) in flag_table(config_class).items()}


def check(config, checkpoint_dir: str | Path, allow_changes: bool = False) -> dict[str, tuple]:
    """Compares `config` with the config saved in `checkpoint_dir`; raises ResumeRefused when a meaningful flag
    differs (unless `allow_changes`). Returns the differences (logged)."""
    checkpoint_dir = Path(checkpoint_dir)
    saved_file = checkpoint_dir / CONFIG_FILE
    if not saved_file.is_file():
        logger.warning("%s has no %s: resuming without comparing settings", checkpoint_dir, CONFIG_FILE)
        return {}
    now = to_flat(config)
    key = (str(saved_file.resolve()), repr(sorted(now.items())), allow_changes)
    if key in _checked:
        return _checked[key]
    diff = differences(read_yaml(saved_file), now, _defaults(type(config)))
    harmless = {k: v for k, v in diff.items() if allowed(k)}
    meaningful = {k: v for k, v in diff.items() if not allowed(k)}
    for flag, (old, new) in harmless.items():
        logger.info("resuming with --%s changed: %r -> %r (allowed: it does not change what is trained)", flag, old,
                    new)
    if meaningful and allow_changes:
        for flag, (old, new) in meaningful.items():
            logger.warning("--resume_with_changes: resuming %s with --%s %r (the checkpoint's run had %r)",
                           checkpoint_dir, flag, new, old)
    elif meaningful:
        lines = "\n".join(f"  --{flag}: {old!r} (checkpoint) -> {new!r} (now)" for flag, (old, new) in meaningful.items())
        raise ResumeRefused(
            f"{checkpoint_dir} was written by a run with other settings; resuming it would continue that run's "
            f"weights, optimizer and data position under the new ones:\n{lines}\nEither start a new run: "
            "--resume false (train from scratch in this output directory) or another --output_dir; or continue the "
            "old run with the new settings on purpose: --resume_with_changes.")
    _checked[key] = diff
    return diff
