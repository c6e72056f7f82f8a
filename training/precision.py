"""Training precision: the `--dtype` names and their resolution against this accelerator (no deepspeed engine)."""
from __future__ import annotations

import torch

from chatrlhf.training.ds_config import resolve_dtype
from chatrlhf.utils import distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_dtype(dtype: str) -> str:
    """Resolves --dtype auto against this accelerator (bf16 where supported, else fp32)."""
    return resolve_dtype(dtype, dist.accelerator().is_bf16_supported())
