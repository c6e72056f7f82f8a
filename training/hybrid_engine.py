"""The hybrid engine: one model's DeepSpeed engine with an explicit training mode and generation mode.

Steps 1 and 2 use it in training mode only (forward, backward, step, save); step 3's actor also enters
generation mode through the `generation()` context manager, the only place generation happens.
Invariants (checked at run time): `backward`/`step` are refused inside generation mode and on frozen
models; leaving generation mode restores the training state, also after an exception.

Runs on CUDA and on DeepSpeed's CPU accelerator alike; `deepspeed` is imported lazily.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from chatrlhf.training.ds_config import build_ds_config, read_user_config, resolve_dtype
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.models import decoder_layers, merge_lora_state_dict

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_dtype(dtype: str) -> str:
    """Resolves --dtype auto against this accelerator."""
    return resolve_dtype(dtype, dist.accelerator().is_bf16_supported())


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
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if dist.is_main_process() else None
        if not dist.is_main_process():
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_pretrained(self, output_dir: str | Path, tokenizer=None, keep_lora_adapter: bool = False) -> None:
        """Hugging Face format (safetensors + config + tokenizer); LoRA merged unless `keep_lora_adapter`."""
        state = self.full_state_dict()  # collective under ZeRO-3: every rank must call it
        if dist.is_main_process():
            _write_hf(self.module, state, Path(output_dir), tokenizer, self.lora_scaling, keep_lora_adapter)
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
                    stack.enter_context(_gathered_without_hooks(self.engine))
                elif grouped:
                    stack.enter_context(_gathered_by_layer_groups(self.engine, layers_per_gather))
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


def generate(module, input_ids, attention_mask, *, max_new_tokens: int, pad_token_id: int, eos_token_id: int | None,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             synced_gpus: bool = False, streamer=None):
    """HF generate with our sampling settings only (a checkpoint's generation_config cannot override them).

    The one generation call of the project (training's generation mode, the chatbot, prompt_eval). Stops at
    EOS, no minimum length (DeepSpeed-Chat's forced min_length made answers repeat to the limit)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                              eos_token_id=eos_token_id, use_cache=True,
                              **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}))
    return module.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                           synced_gpus=synced_gpus, streamer=streamer)


def _zero3_offload(engine):
    opt = engine.optimizer
    return opt.parameter_offload if hasattr(opt, "parameter_offload") else opt


@contextmanager
def _gathered_without_hooks(engine):
    """ZeRO-3: all parameters gathered once, fetch hooks off for the duration (as TRL's
    unwrap_model_for_generation and DeepSpeed's own, but restored even when generation raises)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())), _fetch_hooks_off(engine):
        yield


@contextmanager
def _gathered_by_layer_groups(engine, per_group: int):
    """ZeRO-3 with bounded memory: the weights outside the decoder layers (embeddings, final norm, head) gathered
    for the duration, the layers `per_group` at a time from the pre-hook of a group's first layer to the hook
    after its last (DeepSpeed-Chat's --tp_gather_partition_size granularity); fetch hooks off, as above."""
    import deepspeed

    _, layers = decoder_layers(engine.module)
    in_layers = {id(p) for p in layers.parameters()}
    rest = [p for p in engine.module.parameters() if id(p) not in in_layers]
    handles, current = [], []

    def gather(params):
        def hook(module, args):
            ctx = deepspeed.zero.GatheredParameters(params)
            ctx.__enter__()
            current.append(ctx)
        return hook

    def release(module, args, output):
        current.pop().__exit__(None, None, None)

    with deepspeed.zero.GatheredParameters(rest), _fetch_hooks_off(engine):
        try:
            for start in range(0, len(layers), per_group):
                group = layers[start:start + per_group]
                handles.append(group[0].register_forward_pre_hook(gather(list(group.parameters()))))
                handles.append(group[-1].register_forward_hook(release))
            yield
        finally:
            while current:  # an exception inside a group's forward
                current.pop().__exit__(None, None, None)
            for handle in handles:
                handle.remove()


@contextmanager
def _fetch_hooks_off(engine):
    """ZeRO-3's per-module fetch hooks removed for the duration (each forward would re-gather every layer),
    registered again afterwards, also after an exception."""
    offload = _zero3_offload(engine)
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)


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


def _write_hf(module, state, out: Path, tokenizer, lora_scaling, keep_lora_adapter: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    is_peft = lora_scaling is not None
    if is_peft and keep_lora_adapter:
        from peft import get_peft_model_state_dict

        module.save_pretrained(str(out), state_dict=get_peft_model_state_dict(module, state_dict=state))
    else:
        base = module.get_base_model() if is_peft else module
        if is_peft:
            conv1d = base.config.model_type == "gpt2"
            state = merge_lora_state_dict(state, lora_scaling, conv1d=conv1d)
        base.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


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
