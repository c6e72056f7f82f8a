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
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from chatrlhf.training import shm_collectives, zero3
from chatrlhf.training.checkpoint import install_safe_loading
from chatrlhf.training.ds_config import build_ds_config, read_user_config
from chatrlhf.training.generation import generate
from chatrlhf.training.precision import (  # noqa: F401 - FAST_PATHS_ENV is part of this module's API
    FAST_PATHS_ENV, fast_paths_enabled, native_bf16_matmul, training_dtype)
from chatrlhf.training.saving import write_hf
from chatrlhf.training.value_model import checkpointing as checkpointing_on, unwrap
from chatrlhf.utils import distributed as dist

logger = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, lr: float, lora_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: LoRA weights at their own lr (with the same weight decay, as in DeepSpeed-Chat); no decay for
    biases and norms (1-d tensors)."""
    groups = {"decay": [], "no_decay": [], "lora": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups["lora" if "lora_" in name else "decay" if p.ndim >= 2 else "no_decay"].append(p)
    spec = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), "lora": (lora_lr, weight_decay)}
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


def _optimizer(groups, *, offload: bool, betas, eps, fast: bool = True):
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    if dist.accelerator().device_name() == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, betas=betas, eps=eps, adam_w_mode=True)
    # CPU: torch's fused kernel makes one pass per tensor; the default per-parameter loop of small ops was ~5x
    # slower on a ZeRO-2 shard of a 135M model (0.43 s vs 0.08 s a step). fast=False keeps that loop.
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True if fast else None)


class Fp32Kernels(TorchFunctionMode):
    """bf16 linear layers and attention run by fp32 kernels on bf16 inputs, the result rounded back to bf16.

    The same arithmetic as a bf16 kernel (bf16 x bf16 products are exact in fp32, sums are accumulated in fp32,
    the output is rounded to bf16), only the summation order differs; weights, activations and gradients stay
    bf16 tensors. On a CPU without bf16 instructions oneDNN emulates bf16 GEMMs: this ran a SmolLM2-135M
    forward+backward ~3x faster. Only worth it for many rows (training, scoring, the prefill): decoding steps of a
    few rows are memory-bound and stay on the bf16 kernels (see `fp32_kernels_for_large_inputs`).
    `linear=False` upcasts attention only, for CPUs that multiply bf16 natively: there torch's bf16 flash-attention
    backward took ~23 ms against ~13 ms in fp32 (4 x 9 heads x 190 tokens, one thread) and the forward as long;
    decoding steps keep bf16 attention there."""

    def __init__(self, linear: bool = True):
        super().__init__()
        self.linear = linear

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.linear and func is F.linear and args[0].dtype == torch.bfloat16 and args[1].dtype == torch.bfloat16:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _Fp32Linear.apply(args[0], args[1], bias)
        # A decoding step's one query reads the whole KV cache: upcasting that costs what the attention does.
        if (func is F.scaled_dot_product_attention and args[0].dtype == torch.bfloat16
                and (self.linear or args[0].size(-2) > 1)):
            q, k, v = (a.float() for a in args[:3])
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None and mask.is_floating_point():
                if len(args) > 3:
                    args = args[:3] + (mask.float(),) + tuple(args[4:])
                else:
                    kwargs = dict(kwargs, attn_mask=mask.float())
            return F.scaled_dot_product_attention(q, k, v, *args[3:], **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


class _Fp32Linear(torch.autograd.Function):
    """bf16 `F.linear` through fp32 GEMMs, saving the bf16 input and weight (not fp32 copies: half the memory, and
    no second copy of every weight held by the graph) and upcasting them again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.size(-1)).t() @ x.reshape(-1, x.size(-1)).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.size(-1)).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


_FP32_ACTIVE: list = []  # the `linear` setting of each forward running under Fp32Kernels right now


def _checkpoint_contexts():
    """Gradient checkpointing's (forward, recompute) contexts: a block recomputed in backward runs with the kernels
    its forward ran with (else it saves other tensors, and torch.utils.checkpoint refuses the mismatch)."""
    return nullcontext(), (Fp32Kernels(linear=_FP32_ACTIVE[-1]) if _FP32_ACTIVE else nullcontext())


CHECKPOINTING_KWARGS = {"use_reentrant": False, "context_fn": _checkpoint_contexts}

FP32_KERNELS_MIN_TOKENS = 32  # below this many tokens per forward (decoding steps) bf16 kernels were as fast


def fp32_kernels_for_large_inputs(hf_model: torch.nn.Module, min_tokens: int = FP32_KERNELS_MIN_TOKENS,
                                  linear: bool = True) -> list:
    """Runs `Fp32Kernels(linear)` around every forward of `hf_model` (the plain Hugging Face model, so that training,
    scoring, peft and `generate` all pass through it) that sees at least `min_tokens` tokens. Hooks, not a
    patched forward: `always_call` leaves the mode also when the forward raises. Returns the hook handles."""
    active: list = []

    def enter(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"][..., 0]
        mode = Fp32Kernels(linear) if isinstance(ids, torch.Tensor) and ids.numel() >= min_tokens else None
        if mode is not None:
            mode.__enter__()
            _FP32_ACTIVE.append(linear)
        active.append(mode)

    def leave(module, args, kwargs, output):
        mode = active.pop() if active else None
        if mode is not None:
            _FP32_ACTIVE.pop()
            mode.__exit__(None, None, None)

    return [hf_model.register_forward_pre_hook(enter, with_kwargs=True),
            hf_model.register_forward_hook(leave, with_kwargs=True, always_call=True)]


class HybridEngine:
    """Wraps a `deepspeed.DeepSpeedEngine`; build it with `build_engine`."""

    def __init__(self, engine, *, zero_stage: int, trainable: bool, lora_scaling: float | None = None,
                 gather_whole: bool = False):
        self.engine = engine
        self.zero_stage = zero_stage
        self.trainable = trainable
        self.lora_scaling = lora_scaling  # set when the module is a peft LoRA model
        self.mode = "train" if trainable else "eval"
        # Forwards kept with their graph for the next training forward on the same rows (step 3's scoring forward
        # reused by the update, see step3_ppo/rollout.py); stale after an optimizer step or a new rollout.
        self.stash: dict = {}
        # ZeRO-3 (--zero3_gather_whole): a training forward gathers every parameter at once and they stay whole,
        # DeepSpeed's per-module fetch hooks off, through its backward until the next step(): one all-gather per
        # micro-step instead of one per layer in the forward and again in the backward.
        self.gather_whole = gather_whole and zero_stage == 3 and trainable
        self._whole = None  # the ExitStack holding the gathered parameters

    # ---- training mode -------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (an HF model, or a peft model around one)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, *args, **kwargs):
        if self.gather_whole and self._whole is None and torch.is_grad_enabled() and self.mode != "generate":
            self._whole = ExitStack()
            self._whole.enter_context(zero3.gathered_without_hooks(self.engine))
        return self.engine(*args, **kwargs)

    @property
    def gathered_whole(self) -> bool:
        """Whether a training forward's whole-model gather is held now (until release() or step())."""
        return self._whole is not None

    def release(self) -> None:
        """Partitions parameters a training forward gathered whole (--zero3_gather_whole) and puts DeepSpeed's fetch
        hooks back; a no-op when none are. Before anything that reads or writes the partitions."""
        whole, self._whole = self._whole, None
        if whole is not None:
            whole.close()

    def backward(self, loss: torch.Tensor) -> None:
        self._check_trainable("backward")
        self.engine.backward(loss)

    def step(self) -> None:
        """Optimizer + scheduler step at an accumulation boundary (DeepSpeed counts micro-steps)."""
        self._check_trainable("step")
        self.stash.clear()
        # The gradients are partitioned by now (ZeRO-3 reduces them as backward produces them); the optimizer
        # updates the partitions, which the next forward gathers again.
        self.release()
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
        self.release()
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
        self.release()
        self.engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)

    def load_checkpoint(self, load_dir: str | Path, tag: str) -> None:
        self.release()
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=self.trainable,
                                              load_lr_scheduler_states=self.trainable)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {load_dir}")

    # ---- generation mode -----------------------------------------------------------------------------
    @contextmanager
    def generation(self, gather: bool = True, merge_lora: bool = True, release_cache: bool = False,
                   layers_per_gather: int = 0, backend=None):
        """Enters generation mode and yields a `generate(input_ids, attention_mask, **sampling)` callable.

        Entering: eval mode (no dropout), no grad, gradient checkpointing off, KV cache on; under ZeRO-3 with
        `gather`, every parameter gathered once and DeepSpeed's per-module fetch hooks taken off (otherwise
        each decoding step re-gathers every layer); LoRA folded into the weights (`merge_lora`). Leaving
        restores all of it, also after an exception. `layers_per_gather=k` bounds memory: only the non-layer
        weights stay gathered, the decoder layers are gathered k at a time around their forward (one
        all-gather per group and decoding step, LoRA unmerged). `gather=False` keeps ZeRO-3's per-module
        fetching (plain ZeRO-3 generate). Both sync ranks so none hangs when they finish at different lengths.
        `backend` (a `vllm_backend.VLLMGenerator`): another engine generates, with the same callable; it is handed
        this model's weights (gathered once, LoRA folded in) when they changed, and gather/layers_per_gather/
        merge_lora, which concern generating with this model, do not apply.
        """
        if self.mode == "generate":
            raise RuntimeError("already in generation mode")
        if layers_per_gather < 0:
            raise ValueError(f"layers_per_gather must be >= 0 (0: the whole model at once), not {layers_per_gather}")
        self.stash.clear()
        self.release()
        module = self.module
        was_training, saved_mode = module.training, self.mode
        checkpointing = checkpointing_on(module)
        gathered = gather and self.zero_stage == 3 and not layers_per_gather
        grouped = gather and self.zero_stage == 3 and layers_per_gather > 0
        self.mode = "generate"
        with ExitStack() as stack:
            try:
                self.engine.eval()
                if checkpointing:
                    module.gradient_checkpointing_disable()
                if backend is not None:
                    yield stack.enter_context(backend.generation(self))
                    return
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
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
                self.engine.train(was_training)
                self.mode = saved_mode
                if release_cache:
                    dist.accelerator().empty_cache()


@contextmanager
def _lora_merged(peft_model):
    """LoRA deltas folded into the base weights, adapters bypassed; the original tensors are put back
    (not un-merged by subtraction, which drifts bf16 weights a little every rollout)."""
    from peft.tuners.lora import LoraLayer

    originals, swapped = [], []
    try:
        for parent in list(peft_model.modules()):
            for attr, layer in list(parent.named_children()):
                if not isinstance(layer, LoraLayer):
                    continue
                base = layer.get_base_layer()
                weight = base.weight
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)
                originals.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
                if type(base) is torch.nn.Linear and fast_paths_enabled():
                    # The merged base layer in the wrapper's place: one module call per layer instead of two,
                    # and generation's prepacked weights see a plain linear layer, no bypassed adapters.
                    setattr(parent, attr, base)
                    swapped.append((parent, attr, layer))
        # peft refuses to disable adapters it cannot find: with every LoRA layer swapped out there are none left.
        left = any(isinstance(m, LoraLayer) for m in peft_model.modules())
        with peft_model.disable_adapter() if left else nullcontext():
            yield
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)
        for weight, data in originals:
            weight.data = data


def build_engine(model: torch.nn.Module, *, zero_stage: int, dtype: str, micro_batch_size: int,
                 gradient_accumulation_steps: int = 1, offload: bool = False, gradient_clipping: float = 1.0,
                 learning_rate: float = 0.0, lora_learning_rate: float = 0.0, weight_decay: float = 0.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, lr_scheduler_type: str = "constant",
                 num_warmup_steps: int = 0, total_steps: int = 1, trainable: bool = True,
                 user_config_path: str | None = None, fast: bool | None = None,
                 gather_whole: bool = False) -> HybridEngine:
    """The only place a DeepSpeed engine is made. `trainable=False` gives a frozen engine (reference, reward).

    `fast=False` turns off the CPU fast paths (fused AdamW, fp32 kernels for bf16: linear layers and attention on
    CPUs without bf16 instructions, attention alone on the others; ZeRO 1-3 gradients all-reduced whole) to compare
    against them; results agree within bf16 rounding. Default: `fast_paths_enabled()`. `gather_whole`: see HybridEngine.gather_whole (ZeRO-3, trainable)."""
    import deepspeed
    from transformers import get_scheduler

    dist.init_distributed()
    shm_collectives.install()  # one CPU host: DeepSpeed's collectives over shared memory, not gloo
    dtype = training_dtype(dtype)
    fast = fast_paths_enabled() if fast is None else fast
    if fast and dtype == "bf16" and dist.accelerator().device_name() == "cpu":
        hf = unwrap(model)
        # Without bf16 instructions every GEMM pays on fp32 kernels; with them attention's backward still does.
        fp32_kernels_for_large_inputs(hf, linear=not native_bf16_matmul())
        if checkpointing_on(hf):
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    ds_config = build_ds_config(zero_stage=zero_stage, dtype=dtype, micro_batch_size=micro_batch_size,
                                gradient_accumulation_steps=gradient_accumulation_steps,
                                world_size=dist.get_world_size(), offload=offload and trainable,
                                gradient_clipping=gradient_clipping, inference_only=not trainable,
                                user_config=read_user_config(user_config_path),
                                reduce_scatter=not (fast and dist.accelerator().device_name() == "cpu"))
    lora_scaling = None
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        cfg = next(iter(peft_config.values()))
        lora_scaling = cfg.lora_alpha / cfg.r
    if trainable:
        optimizer = _optimizer(param_groups(model, learning_rate, lora_learning_rate, weight_decay),
                               offload=offload, betas=betas, eps=eps, fast=fast)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: get_scheduler(lr_scheduler_type, opt, num_warmup_steps=num_warmup_steps,
                                                   num_training_steps=max(total_steps, 1)))
    else:
        model.requires_grad_(False)
        model.eval()
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    install_safe_loading(engine)  # checkpoint files load weights-only: nothing in them can run code
    return HybridEngine(engine, zero_stage=zero_stage, trainable=trainable, lora_scaling=lora_scaling,
                        gather_whole=gather_whole)
