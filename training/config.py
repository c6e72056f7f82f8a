"""Config groups shared by the steps. Each flag is declared once, here, with DeepSpeed-Chat's name.

Steps compose these with `chatrlhf.utils.config.group`: step 1 uses `ModelArgs` and `OptimArgs` unprefixed
(`--zero_stage`, `--learning_rate`), step 3 each twice with `actor_` / `critic_` prefixes
(`--actor_zero_stage`, `--critic_learning_rate`), the optimiser settings DeepSpeed-Chat shares between the two
models keeping one plain flag (`OPTIM_SHARED`: `--num_warmup_steps`). Fields that exist only so DeepSpeed-Chat's
command lines parse are gathered in `DSChatArgs`.
"""
from __future__ import annotations

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
    """LoRA rank; above 0 adds peft LoRA adapters."""
    lora_alpha: Optional[float] = None
    """LoRA scaling numerator (default: 2 x lora_dim)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_module_name: Optional[str] = None
    """Substring selecting the Linear layers that get LoRA (DeepSpeed-Chat style, e.g. `layers.`); default: every
    Linear layer inside the transformer blocks, whatever the family."""
    keep_lora_adapter: bool = False
    """Save the LoRA adapter (peft format) instead of merging it into the weights."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lora_dim < 0:
            raise ValueError(f"--lora_dim must be >= 0, got {self.lora_dim}")
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
    """With LoRA, freeze every non-LoRA parameter (without it the base weights train too, as in DeepSpeed-Chat)."""
    compute_fp32_loss: bool = False
    """Compute losses from fp32 logits under bf16/fp16 training (always on for the reward loss)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config of your own; it is merged over the generated one (your keys win)."""


@dataclass
class DSChatArgs:
    """Flags that exist so DeepSpeed-Chat's command lines run unchanged; none changes what chatrlhf does."""

    deepspeed: bool = False
    """Accepted for the deepspeed launcher; has no effect."""
    local_rank: int = -1
    """Set by the launcher; the LOCAL_RANK environment variable is what is used."""
    num_padding_at_beginning: int = 1
    """Ignored: chatrlhf reads a sequence's score at the last position where attention_mask is 1, which needs no
    OPT-specific count of leading pad tokens."""
    add_eot_token: bool = False
    """Ignored: chatrlhf always ends answers with the tokenizer's EOS token."""
    eot_token: str = "<|endoftext|>"
    """Ignored; see --add_eot_token."""
    align_overflow: bool = False
    """Ignored: fp16 overflow handling is DeepSpeed's own (prefer bf16)."""
    enable_mixed_precision_lora: bool = False
    """DeepSpeed-Chat's MixZ++ quantised frozen weights: not supported (refused)."""

    def __post_init__(self):
        if self.enable_mixed_precision_lora:
            raise ValueError("--enable_mixed_precision_lora (MixZ++) is not supported")
        if self.num_padding_at_beginning < 0:
            raise ValueError(f"--num_padding_at_beginning must be >= 0, got {self.num_padding_at_beginning}")


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
    print_loss: bool = False
    """Print the loss of every rank at every step (DeepSpeed-Chat's debugging aid)."""


@dataclass
class TrainArgs(RunArgs):
    """A run over a fixed dataset (steps 1 and 2): the run settings plus its batch size and sequence length."""

    per_device_train_batch_size: int = 8
    """Micro-batch size per rank."""
    max_seq_len: int = 512
    """Longest prompt + answer in tokens (per answer for pairs); longer examples follow --overlength."""

    def __post_init__(self):
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
