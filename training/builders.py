"""Run set-up shared by the steps: process group, seeds, tokenizer + model + engine, metrics logger."""
from __future__ import annotations

from pathlib import Path

from chatrlhf.training import shm_collectives
from chatrlhf.training.config import EngineArgs, ModelArgs, OptimArgs, RunArgs
from chatrlhf.training.ds_config import build_ds_config
from chatrlhf.training.hybrid_engine import HybridEngine, build_engine
from chatrlhf.training.precision import DTYPES, fast_paths_enabled, training_dtype
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import MetricsLogger, setup_logging
from chatrlhf.utils.models import add_lora, load_model


def _zero3_load_config(zero_stage: int, dtype: str) -> dict | None:
    """What transformers needs to partition weights at load time (zero.Init) under ZeRO-3."""
    if zero_stage != 3:
        return None
    dist.init_distributed()
    shm_collectives.install()  # zero.Init's collectives too
    return build_ds_config(zero_stage=3, dtype=dtype, micro_batch_size=1, gradient_accumulation_steps=1,
                           world_size=dist.get_world_size())


def start_run(train: RunArgs, config=None) -> MetricsLogger:
    """Joins the process group, takes the output directory's lock, checks that a checkpoint there may be resumed
    with `config` (the step's resolved config), seeds every RNG, and opens the metrics log of `train.output_dir`."""
    from transformers import set_seed

    dist.init_distributed(train.hang_timeout)
    setup_logging()
    claim_output_dir(train, config)
    set_seed(train.seed)
    tb = (train.tensorboard_path or str(Path(train.output_dir) / "tensorboard")) if train.enable_tensorboard else None
    return MetricsLogger(train.output_dir, tb, report_to=train.report_to)


def claim_output_dir(train: RunArgs, config=None) -> None:
    """Rank 0 locks train.output_dir for this process's lifetime (a second job there is refused) and, when a
    checkpoint would be resumed, compares `config` with the one saved next to it; every rank raises alike."""
    from chatrlhf.training import checkpoint, resume
    from chatrlhf.utils import lock

    error = None
    if dist.is_main_process():
        try:
            lock.acquire(train.output_dir, what="training run",
                         hint=" (a step killed with only its launcher leaves its ranks running: kill them)")
            latest = checkpoint.latest(train.output_dir) if train.resume else None
            if latest is not None and config is not None:
                resume.check(config, latest, allow_changes=train.resume_with_changes)
        except Exception as e:  # noqa: BLE001 - raised on every rank below, or the others would wait for rank 0
            error = (type(e), str(e))
    error = dist.broadcast_object(error)
    if error is not None:
        try:
            exc = error[0](error[1])
        except Exception:  # noqa: BLE001 - a type that takes other arguments
            exc = RuntimeError(error[1])
        raise exc


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
                         head=head, init=model_args.lora_init)
    return build_engine(
        model, zero_stage=model_args.zero_stage, dtype=dtype, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps, offload=engine_args.offload,
        gradient_clipping=optim.gradient_clipping, learning_rate=optim.learning_rate,
        lora_learning_rate=optim.lora_learning_rate, weight_decay=optim.weight_decay,
        betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        lr_scheduler_type=optim.lr_scheduler_type, num_warmup_steps=optim.num_warmup_steps,
        total_steps=total_steps, user_config_path=engine_args.deepspeed_config,
        gather_whole=gather_whole(engine_args.zero3_gather_whole, model_args, dtype, engine_args.offload))


def gather_whole(choice: str, model_args: ModelArgs, dtype: str, offload: bool) -> bool:
    """--zero3_gather_whole for one trained model: "true"/"false" as asked; "auto": under ZeRO-3 when a whole copy
    fits as a frozen replica would (FROZEN_SHARE), without offload and with the fast paths on. The same on every
    rank (decided on rank 0)."""
    if model_args.zero_stage != 3:
        return False
    if choice != "auto":
        return choice == "true"
    if offload or not fast_paths_enabled():
        return False
    fits = frozen_fits(model_args.model_name_or_path, dtype) if dist.is_main_process() else None
    return dist.broadcast_object(fits)


def build_frozen_model(name_or_path: str, tokenizer, *, head: str, zero_stage: int, dtype: str,
                       offload: bool = False) -> HybridEngine:
    """A model that is only evaluated (reference, reward): sharded by ZeRO-3 when asked, never optimised."""
    dtype = training_dtype(dtype)
    model = load_model(name_or_path, tokenizer, head=head, dtype=DTYPES[dtype], dropout=0.0,
                       zero3_config=_zero3_load_config(zero_stage, dtype))
    return build_engine(model, zero_stage=zero_stage, dtype=dtype, micro_batch_size=1, offload=offload,
                        trainable=False)


FROZEN_SHARE = 0.25  # of one accelerator's memory (or of the host RAM per local rank) a frozen replica may take


def frozen_zero_stage(choice: str, name_or_path: str, dtype: str, *, offload: bool = False) -> int:
    """The ZeRO stage of a frozen model (reference, reward): "0" or "3" as asked; "auto": 0, a whole replica per
    rank (DeepSpeed-Chat's choice for frozen models: a ZeRO-3 one is gathered layer by layer in every scoring
    forward), when its weights take at most FROZEN_SHARE of one accelerator's memory (of the host RAM per local
    rank on a CPU), else 3; always 3 with parameter offload. Decided on rank 0, the same on every rank."""
    if choice != "auto":
        return int(choice)
    if offload:
        return 3
    stage = None
    if dist.is_main_process():
        stage = 0 if frozen_fits(name_or_path, dtype) else 3
    return dist.broadcast_object(stage)


def frozen_fits(name_or_path: str, dtype: str) -> bool:
    """Whether a replica of `name_or_path` in `dtype` fits FROZEN_SHARE of the memory it would live in."""
    from chatrlhf.training import memory_plan

    try:
        params = memory_plan.shape_of(name_or_path).params
    except Exception:  # noqa: BLE001 - a config we cannot read: shard it, as before
        params = None
    if not params:
        return False
    weights = params * DTYPES[training_dtype(dtype)].itemsize
    on_cpu = dist.accelerator().device_name() == "cpu"
    device, host = memory_plan.available_memory(on_cpu)
    budget = host / memory_plan.local_ranks() if on_cpu else device  # the deepspeed launcher sets LOCAL_SIZE
    return weights <= FROZEN_SHARE * budget
