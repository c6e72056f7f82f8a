"""The hybrid engine: one model's DeepSpeed engine with an explicit training mode and generation mode.

Steps 1 and 2 use it in training mode only (forward, backward, step, save); step 3's actor also enters
generation mode through the `generation()` context manager, the only place generation happens.
Invariants (checked at run time): `backward`/`step` are refused inside generation mode and on frozen
models; leaving generation mode restores the training state, also after an exception.

Runs on CUDA and on DeepSpeed's CPU accelerator alike; `deepspeed` is imported lazily. ZeRO-3 internals live in
`zero3.py`, Hugging Face saving in `saving.py`, the generation call in `generation.py`.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from chatrlhf.training import zero3
from chatrlhf.training.ds_config import build_ds_config, read_user_config
from chatrlhf.training.generation import generate
from chatrlhf.training.precision import training_dtype
from chatrlhf.training.saving import write_hf
from chatrlhf.utils import distributed as dist

logger = logging.getLogger(__name__)

def param_groups(model: torch.nn.Module, lr: float, lora_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: LoRA weights at their own lr; no decay for biases and norms (1-d tensors)."""
    groups = {"decay": [], "no_decay": [], "lora": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups["lora" if "lora_" in name else "decay" if p.ndim >= 2 else "no_decay"].append(p)
    spec = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), "lora": (lora_lr, 0.0)}
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


def _optimizer(groups, *, offload: bool, betas, eps):
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    if dist.accelerator().device_name() == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, betas=betas, eps=eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


class HybridEngine:
    """Wraps a `deepspeed.DeepSpeedEngine`; build it with `build_engine`."""

    def __init__(self, engine, *, zero_stage: int, trainable: bool, lora_scaling: float | None = None):
        self.engine = engine
        self.zero_stage = zero_stage
        self.trainable = trainable
        self.lora_scaling = lora_scaling  # set when the module is a peft LoRA model
        self.mode = "train" if trainable else "eval"

    # ---- training mode -------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (an HF model, or a peft model around one)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._check_trainable("backward")
        self.engine.backward(loss)

    def step(self) -> None:
        """Optimizer + scheduler step at an accumulation boundary (DeepSpeed counts micro-steps)."""
        self._check_trainable("step")
        self.engine.step()

    def is_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self) -> None:
        if self.mode == "generate":
            raise RuntimeError("train() inside generation mode; leave the generation() context first")
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def _check_trainable(self, what: str) -> None:
        if self.mode == "generate":
            raise RuntimeError(f"{what}() inside generation mode is not allowed: leave the generation() context first")
        if not self.trainable:
            raise RuntimeError(f"{what}() on a frozen model")

    # ---- saving --------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (ZeRO-3 shards gathered), None elsewhere."""
        if self.zero_stage == 3:
            sd = zero3.consolidated_state_dict(self.engine)
            return sd if dist.is_main_process() else None
        if not dist.is_main_process():
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_pretrained(self, output_dir: str | Path, tokenizer=None, keep_lora_adapter: bool = False) -> None:
        """Hugging Face format (safetensors + config + tokenizer); LoRA merged unless `keep_lora_adapter`."""
        state = self.full_state_dict()  # collective under ZeRO-3: every rank must call it
        if dist.is_main_process():
            write_hf(self.module, state, Path(output_dir), tokenizer, self.lora_scaling, keep_lora_adapter)
        dist.barrier()

    # ---- resumable checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str | Path, tag: str) -> None:
        self.engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)

    def load_checkpoint(self, load_dir: str | Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=self.trainable,
                                              load_lr_scheduler_states=self.trainable)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {load_dir}")

    # ---- generation mode -----------------------------------------------------------------------------
    @contextmanager
    def generation(self, gather: bool = True, merge_lora: bool = True, release_cache: bool = False,
                   layers_per_gather: int = 0):
        """Enters generation mode and yields a `generate(input_ids, attention_mask, **sampling)` callable.

        Entering: eval mode (no dropout), no grad, gradient checkpointing off, KV cache on; under ZeRO-3 with
        `gather`, every parameter gathered once and DeepSpeed's per-module fetch hooks taken off (otherwise
        each decoding step re-gathers every layer); LoRA folded into the weights (`merge_lora`). Leaving
        restores all of it, also after an exception. `layers_per_gather=k` bounds memory: only the non-layer
        weights stay gathered, the decoder layers are gathered k at a time around their forward (one
        all-gather per group and decoding step, LoRA unmerged). `gather=False` keeps ZeRO-3's per-module
        fetching (plain ZeRO-3 generate). Both sync ranks so none hangs when they finish at different lengths.
        """
        if self.mode == "generate":
            raise RuntimeError("already in generation mode")
        if layers_per_gather < 0:
            raise ValueError(f"layers_per_gather must be >= 0 (0: the whole model at once), not {layers_per_gather}")
        module = self.module
        was_training, saved_mode = module.training, self.mode
        checkpointing = getattr(module, "is_gradient_checkpointing", False)
        gathered = gather and self.zero_stage == 3 and not layers_per_gather
        grouped = gather and self.zero_stage == 3 and layers_per_gather > 0
        self.mode = "generate"
        with ExitStack() as stack:
            try:
                self.engine.eval()
                if checkpointing:
                    module.gradient_checkpointing_disable()
                if gathered:
                    stack.enter_context(zero3.gathered_without_hooks(self.engine))
                elif grouped:
                    stack.enter_context(zero3.gathered_by_layer_groups(self.engine, layers_per_gather))
                # Ungathered (or group-by-group gathered) ZeRO-3 weights are empty placeholders between forwards:
                # nothing to merge into, so the adapters run unmerged there.
                if merge_lora and self.lora_scaling is not None and (self.zero_stage != 3 or gathered):
                    stack.enter_context(_lora_merged(module))
                stack.enter_context(torch.no_grad())
                synced = self.zero_stage == 3 and not gathered and dist.get_world_size() > 1
                yield lambda input_ids, attention_mask, **kw: generate(module, input_ids, attention_mask,
                                                                       synced_gpus=synced, **kw)
            finally:
                stack.close()
                if checkpointing:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.engine.train(was_training)
                self.mode = saved_mode
                if release_cache:
                    dist.accelerator().empty_cache()


@contextmanager
def _lora_merged(peft_model):
    """LoRA deltas folded into the base weights, adapters bypassed; the original tensors are put back
    (not un-merged by subtraction, which drifts bf16 weights a little every rollout)."""
    from peft.tuners.lora import LoraLayer

    originals = []
    try:
        for layer in peft_model.modules():
            if isinstance(layer, LoraLayer):
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)
                originals.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
        with peft_model.disable_adapter():
            yield
    finally:
        for weight, data in originals:
            weight.data = data


def build_engine(model: torch.nn.Module, *, zero_stage: int, dtype: str, micro_batch_size: int,
                 gradient_accumulation_steps: int = 1, offload: bool = False, gradient_clipping: float = 1.0,
                 learning_rate: float = 0.0, lora_learning_rate: float = 0.0, weight_decay: float = 0.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, lr_scheduler_type: str = "constant",
                 num_warmup_steps: int = 0, total_steps: int = 1, trainable: bool = True,
                 user_config_path: str | None = None) -> HybridEngine:
    """The only place a DeepSpeed engine is made. `trainable=False` gives a frozen engine (reference, reward)."""
    import deepspeed
    from transformers import get_scheduler

    dist.init_distributed()
    dtype = training_dtype(dtype)
    ds_config = build_ds_config(zero_stage=zero_stage, dtype=dtype, micro_batch_size=micro_batch_size,
                                gradient_accumulation_steps=gradient_accumulation_steps,
                                world_size=dist.get_world_size(), offload=offload and trainable,
                                gradient_clipping=gradient_clipping, inference_only=not trainable,
                                user_config=read_user_config(user_config_path))
    lora_scaling = None
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        cfg = next(iter(peft_config.values()))
        lora_scaling = cfg.lora_alpha / cfg.r
    if trainable:
        optimizer = _optimizer(param_groups(model, learning_rate, lora_learning_rate, weight_decay),
                               offload=offload, betas=betas, eps=eps)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: get_scheduler(lr_scheduler_type, opt, num_warmup_steps=num_warmup_steps,
                                                   num_training_steps=max(total_steps, 1)))
    else:
        model.requires_grad_(False)
        model.eval()
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return HybridEngine(engine, zero_stage=zero_stage, trainable=trainable, lora_scaling=lora_scaling)
