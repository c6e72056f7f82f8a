"""Step 3 settings: per-model groups with DeepSpeed-Chat's actor_/critic_ prefixes, and every PPO constant."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from chatrlhf.training.config import (OPTIM_SHARED, DataArgs, DSChatArgs, EngineArgs, GenerationArgs, ModelArgs,
                                      OptimArgs, RunArgs)
from chatrlhf.training.step3_ppo import core
from chatrlhf.utils.config import group


@dataclass
class PPOArgs:
    """The PPO algorithm. Defaults are stable with several epochs and minibatches per rollout."""

    ppo_epochs: int = 1
    """Passes over each rollout's experience."""
    generation_batches: int = 1
    """Generation batches collected before each PPO update."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty against the reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator in the reward (k1: log-ratio; k3: low-variance, non-negative; Schulman's note)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards --target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """KL (nats per answer) the adaptive controller aims at."""
    kl_horizon: int = 10000
    """Adaptive controller horizon in samples."""
    gamma: float = 1.0
    """Discount in GAE."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO policy-ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the old values (0 disables)."""
    score_clip: Optional[float] = 5.0
    """Clip reward-model scores to +-this before use (None: no clip)."""
    normalize_scores: bool = False
    """Normalise scores with running mean and std across rollouts."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of each minibatch."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the actor loss."""
    missing_eos_penalty: Optional[float] = None
    """If set, answers that hit --max_answer_seq_len without EOS get this score instead of the reward model's."""
    advantage_estimator: str = "gae"
    """A registered advantage estimator (chatrlhf.training.step3_ppo.core.ADVANTAGE_ESTIMATORS): gae."""
    policy_loss: str = "clip"
    """A registered policy loss (chatrlhf.training.step3_ppo.core.POLICY_LOSSES): clip."""
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    """How per-token losses are averaged."""
    enable_ema: bool = False
    """Keep an exponential moving average of the actor (saved to actor_ema/)."""
    ema_beta: float = 0.992
    """EMA decay per PPO minibatch step."""
    unsupervised_dataset_name: Optional[str] = None
    """Pretraining-mix (PPO-ptx) data: a local text/JSONL file or a hub dataset with a `text` column."""
    unsupervised_dataset_config_name: Optional[str] = None
    """Hub config name of --unsupervised_dataset_name (e.g. wikitext-2-raw-v1)."""
    unsup_coef: float = 27.8
    """Weight of the language-model loss on the mix data (InstructGPT's gamma), added to the actor objective."""

    def __post_init__(self):
        for name in ("ppo_epochs", "generation_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError("--gamma and --lam must be in [0, 1]")
        # Checked here, at parse time, not as a KeyError after every model is loaded.
        for flag, registry in (("advantage_estimator", core.ADVANTAGE_ESTIMATORS), ("policy_loss", core.POLICY_LOSSES)):
            if getattr(self, flag) not in registry:
                raise ValueError(f"--{flag} {getattr(self, flag)!r} is not registered; accepted: {sorted(registry)}")


@dataclass
class HybridEngineArgs:
    """DeepSpeed-Chat's hybrid-engine knobs, with what each means here."""

    enable_hybrid_engine: bool = True
    """Generate with ZeRO-3 parameters gathered once and LoRA merged (false: plain per-module ZeRO-3 generate)."""
    unpin_actor_parameters: bool = False
    """Do not keep the whole actor gathered while generating under ZeRO-3: gather --tp_gather_partition_size
    decoder layers at a time around their forward (memory: one group instead of the model; slower)."""
    release_inference_cache: bool = False
    """Empty the accelerator cache after each generation (room for bigger training batches)."""
    inference_tp_size: int = 1
    """Tensor-parallel generation: not supported (only 1)."""
    tp_gather_partition_size: int = 8
    """Decoder layers gathered at a time with --unpin_actor_parameters (DeepSpeed-Chat's gather granularity)."""

    def __post_init__(self):
        if self.inference_tp_size != 1:
            raise ValueError("--inference_tp_size > 1 is not supported: chatrlhf generates with the whole actor "
                             "gathered on each rank (use ZeRO-3 with --offload to fit bigger actors, or "
                             "--unpin_actor_parameters to gather a few layers at a time)")
        if self.tp_gather_partition_size < 1:
            raise ValueError(f"--tp_gather_partition_size must be at least 1, not {self.tp_gather_partition_size}")

    def generation_mode(self) -> dict:
        """Keyword arguments of HybridEngine.generation for rollouts."""
        return dict(gather=self.enable_hybrid_engine, release_cache=self.release_inference_cache,
                    layers_per_gather=self.tp_gather_partition_size if self.unpin_actor_parameters else 0)


@dataclass
class PPOConfig:
    """Step 3: PPO of the step-1 actor against the step-2 reward model, with a critic."""

    actor: ModelArgs = group(ModelArgs, prefix="actor_")
    critic: ModelArgs = group(ModelArgs, prefix="critic_")
    actor_optim: OptimArgs = group(OptimArgs, prefix="actor_", shared=OPTIM_SHARED, learning_rate=9.65e-6)
    critic_optim: OptimArgs = group(OptimArgs, prefix="critic_", shared=OPTIM_SHARED, learning_rate=5e-6)
    engine: EngineArgs = group(EngineArgs)
    data: DataArgs = group(DataArgs)
    run: RunArgs = group(RunArgs, output_dir="output/step3_ppo")
    generation: GenerationArgs = group(GenerationArgs)
    ppo: PPOArgs = group(PPOArgs)
    hybrid: HybridEngineArgs = group(HybridEngineArgs)
    dschat: DSChatArgs = group(DSChatArgs)
    reward_model_name_or_path: Optional[str] = None
    """The frozen reward model (default: the critic's starting point, as in DeepSpeed-Chat)."""
    reward_function: Optional[str] = None
    """A reward function `package.module:callable` taking (prompts, responses) texts, used instead of the reward
    model (see chatrlhf.training.step3_ppo.rewards)."""
    reference_model_name_or_path: Optional[str] = None
    """The frozen reference model (default: the actor's starting point; with LoRA and --only_optimize_lora the
    actor with adapters disabled, no second copy)."""
    per_device_generation_batch_size: int = 8
    """Prompts per rank per generation call."""
    per_device_training_batch_size: int = 8
    """PPO minibatch per rank (sequences)."""
    max_prompt_seq_len: int = 256
    """Prompt tokens kept (longer prompts lose their start; see --overlength)."""
    max_answer_seq_len: int = 256
    """Most tokens generated per answer."""
    offload_reference_model: bool = False
    """Keep the reference model's parameters in CPU memory (ZeRO-3 offload)."""
    offload_reward_model: bool = False
    """Keep the reward model's parameters in CPU memory (ZeRO-3 offload)."""
    print_answers: bool = False
    """Print a prompt and its answer with its score every --print_answers_interval steps."""
    print_answers_interval: int = 1
    """Steps between printed answers."""

    def __post_init__(self):
        if self.max_answer_seq_len < 1 or self.max_prompt_seq_len < 1:
            raise ValueError("--max_prompt_seq_len and --max_answer_seq_len must be at least 1")
        if self.per_device_generation_batch_size * self.ppo.generation_batches % self.per_device_training_batch_size:
            raise ValueError("--per_device_generation_batch_size x --generation_batches must be a multiple of "
                             "--per_device_training_batch_size")
