"""Training precision: the `--dtype` names and their resolution against this accelerator, and the switch for the
speed-only paths (no deepspeed engine)."""
from __future__ import annotations

import os

import torch

from chatrlhf.training.ds_config import resolve_dtype
from chatrlhf.utils import distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_dtype(dtype: str) -> str:
    """Resolves --dtype auto against this accelerator (bf16 where supported, else fp32)."""
    return resolve_dtype(dtype, dist.accelerator().is_bf16_supported())


FAST_PATHS_ENV = "CHATRLHF_FAST_PATHS"


def fast_paths_enabled() -> bool:
    """False when $CHATRLHF_FAST_PATHS is 0/false/off: every speed-only path (fused CPU AdamW, fp32 kernels for bf16
    on CPUs without bf16 instructions, ZeRO gradients all-reduced whole on CPU, DeepSpeed's collectives over shared
    memory on one CPU host, ZeRO-3 models gathered whole per training forward (--zero3_gather_whole auto), step 3's
    contiguous head input and reused scoring forward, generation's prepacked bf16 weights, padding-free forwards on
    CPU) falls back to the plain
    computation, to check that they agree (tests/training/step3_ppo/test_fast_paths.py)."""
    return os.environ.get(FAST_PATHS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it oneDNN emulates bf16 GEMMs."""
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)
