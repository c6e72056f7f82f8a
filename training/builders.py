"""Run set-up shared by the steps: process group, seeds, tokenizer + model + engine, metrics logger."""
from __future__ import annotations

from pathlib import Path

from chatrlhf.training.config import EngineArgs, ModelArgs, OptimArgs, RunArgs
from chatrlhf.training.ds_config import build_ds_config
from chatrlhf.training.hybrid_engine import HybridEngine, build_engine
from chatrlhf.training.precision import DTYPES, training_dtype
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import MetricsLogger, setup_logging
from chatrlhf.utils.models import add_lora, load_model


def _zero3_load_config(zero_stage: int, dtype: str) -> dict | None:
    """What transformers needs to partition weights at load time (zero.Init) under ZeRO-3."""
    if zero_stage != 3:
        return None
    dist.init_distributed()
    return build_ds_config(zero_stage=3, dtype=dtype, micro_batch_size=1, gradient_accumulation_steps=1,
                           world_size=dist.get_world_size())


def start_run(train: RunArgs) -> MetricsLogger:
    """Joins the process group, seeds every RNG, and opens the metrics log of `train.output_dir`."""
    from transformers import set_seed

    dist.init_distributed()
    setup_logging()
    set_seed(train.seed)
    tb = (train.tensorboard_path or str(Path(train.output_dir) / "tensorboard")) if train.enable_tensorboard else None
    return MetricsLogger(train.output_dir, tb)


def build_trained_model(model_args: ModelArgs, optim: OptimArgs, engine_args: EngineArgs, tokenizer, *, head: str,
                        micro_batch_size: int, total_steps: int) -> HybridEngine:
    """Loads `model_args.model_name_or_path` (with LoRA when asked) into a trainable engine."""
    dtype = training_dtype(engine_args.dtype)
    model = load_model(model_args.model_name_or_path, tokenizer, head=head, dtype=DTYPES[dtype],
                       dropout=model_args.dropout, gradient_checkpointing=model_args.gradient_checkpointing,
                       zero3_config=_zero3_load_config(model_args.zero_stage, dtype))
    if model_args.lora_dim > 0:
        model = add_lora(model, dim=model_args.lora_dim, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                         module_name=model_args.lora_module_name, only_optimize_lora=engine_args.only_optimize_lora,
                         head=head)
    return build_engine(
        model, zero_stage=model_args.zero_stage, dtype=dtype, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps, offload=engine_args.offload,
        gradient_clipping=optim.gradient_clipping, learning_rate=optim.learning_rate,
        lora_learning_rate=optim.lora_learning_rate, weight_decay=optim.weight_decay,
        betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        lr_scheduler_type=optim.lr_scheduler_type, num_warmup_steps=optim.num_warmup_steps,
        total_steps=total_steps, user_config_path=engine_args.deepspeed_config)


def build_frozen_model(name_or_path: str, tokenizer, *, head: str, zero_stage: int, dtype: str,
                       offload: bool = False) -> HybridEngine:
    """A model that is only evaluated (reference, reward): sharded by ZeRO-3 when asked, never optimised."""
    dtype = training_dtype(dtype)
    model = load_model(name_or_path, tokenizer, head=head, dtype=DTYPES[dtype], dropout=0.0,
                       zero3_config=_zero3_load_config(zero_stage, dtype))
    return build_engine(model, zero_stage=zero_stage, dtype=dtype, micro_batch_size=1, offload=offload,
                        trainable=False)
