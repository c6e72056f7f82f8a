"""Step 3 settings: per-model groups with DeepSpeed-Chat's actor_/critic_ prefixes, and every PPO constant."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from chatrlhf.training.config import (OPTIM_SHARED, DataArgs, DSChatArgs, EngineArgs, GenerationArgs, ModelArgs,
                                      OptimArgs, RunArgs, apply_dschat)
from chatrlhf.training.step3_ppo import core
from chatrlhf.training.vllm_backend import INSTALL_HINT, GenerationBackend, vllm_installed
from chatrlhf.utils.config import group


@dataclass
class PPOArgs:
    """The PPO algorithm. Defaults are stable with several epochs and minibatches per rollout."""

    ppo_epochs: int = 1
    """Passes over each rollout's experience."""
    generation_batches: int = 1
    """Generation batches collected before each PPO update."""
    n_samples_per_prompt: int = 1
    """Answers sampled for each prompt in a rollout: a group, kept side by side on one rank, whose other answers are
    the baseline of the critic-free estimators (--per_device_generation_batch_size counts prompts)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty against the reference model (0: no reference model is
    loaded at all)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator, in the reward or the loss (k1: log-ratio; k2: half squared log-ratio; k3: low-variance,
    non-negative, GRPO's choice in the loss; Schulman's note)."""
    kl_in_loss: bool = False
    """Put the KL penalty in the actor's loss (kl_coef x the --kl_estimator estimate per token, as GRPO does)
    instead of in the per-token rewards."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards --target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """KL (nats per answer) the adaptive controller aims at."""
    kl_horizon: int = 10000
    """Adaptive controller horizon in samples."""
    gamma: float = 1.0
    """Discount of the rewards-to-go (GAE and every critic-free estimator)."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO policy-ratio clip: the ratio is kept in [1 - cliprange, 1 + cliprange]."""
    cliprange_low: Optional[float] = None
    """Lower ratio clip, 1 - this (default: --cliprange)."""
    cliprange_high: Optional[float] = None
    """Upper ratio clip, 1 + this (default: --cliprange); DAPO's clip-higher raises it (e.g. 0.28)."""
    cliprange_value: float = 0.2
    """Value clip around the old values (0 disables)."""
    score_clip: Optional[float] = 5.0
    """Clip scores to +-this after normalisation (None: no clip)."""
    normalize_scores: bool = False
    """Normalise scores with their running mean and std over every rollout so far, on all ranks together."""
    whiten_advantages: Optional[bool] = None
    """Whiten advantages over the valid tokens of the whole rollout (every rank's, one global mean and std; not
    per minibatch). Default: the estimator's own choice, on for gae and reinforce_pp(_baseline), off for grpo,
    dr_grpo and rloo, whose group baselines already centre them."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the actor loss."""
    length_bonus: float = 0.0
    """Added to each answer's learned score per answer token (after normalisation and --score_clip, before
    --missing_eos_penalty; negative: a length penalty). A reward model whose score falls with length pays the
    policy for brevity; a bonus of about that slope (the score regressed on length over the SFT model's answers,
    or the report's "one token more is worth") cancels it on average. Evaluations report the reward's own score."""
    length_bonus_ended_only: bool = False
    """Pay --length_bonus only to answers that ended with EOS: an answer cut at --max_answer_seq_len keeps the
    reward's score alone (the bonus would otherwise pay most for running into the cap)."""
    missing_eos_penalty: Optional[float] = None
    """If set, answers that hit --max_answer_seq_len without EOS get this score instead of theirs (after
    normalisation and --score_clip: the score learned from is exactly this)."""
    advantage_estimator: str = "gae"
    """A registered advantage estimator (chatrlhf.training.step3_ppo.core.ADVANTAGE_ESTIMATORS): gae (PPO with a
    critic); grpo (group-normalised score: mean and std), dr_grpo (group mean only, constant length normaliser),
    rloo (leave-one-out group baseline), reinforce_pp (REINFORCE++: returns of the KL-shaped reward, whitened over
    the rollout), reinforce_pp_baseline (group mean subtracted first). All but gae build no critic; grpo, dr_grpo,
    rloo and reinforce_pp_baseline need --n_samples_per_prompt >= 2."""
    policy_loss: str = "clip"
    """A registered policy loss (chatrlhf.training.step3_ppo.core.POLICY_LOSSES): clip."""
    loss_agg: Optional[Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm",
                               "seq_mean"]] = None
    """How per-token losses are averaged over an optimizer step, globally (every rank and micro-batch of the step):
    token_mean (every token weighs the same), seq_mean_token_sum, seq_mean_token_mean (every answer the same;
    seq_mean is its old name), seq_mean_token_sum_norm (token sums over --max_answer_seq_len, Dr. GRPO's).
    Default: the estimator's (seq_mean_token_sum_norm for dr_grpo, else token_mean)."""
    enable_ema: bool = False
    """Keep an exponential moving average of the actor (saved to actor_ema/)."""
    ema_beta: float = 0.992
    """EMA decay per actor optimizer step."""
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
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"--n_samples_per_prompt must be >= 1, got {self.n_samples_per_prompt}")
        estimator = self.estimator
        if estimator.needs_groups and self.n_samples_per_prompt < 2:
            raise ValueError(f"--advantage_estimator {self.advantage_estimator} compares the answers to one prompt: "
                             f"it needs --n_samples_per_prompt >= 2, got {self.n_samples_per_prompt}")
        for name in ("cliprange", "cliprange_low", "cliprange_high"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name} must be > 0, got {value}")
        if self.kl_coef < 0:
            raise ValueError(f"--kl_coef must be >= 0, got {self.kl_coef}")
        # The estimator's defaults, resolved here so that the saved config holds what ran.
        if self.whiten_advantages is None:
            self.whiten_advantages = estimator.whiten
        if self.loss_agg is None:
            self.loss_agg = estimator.loss_agg
        if self.loss_agg == "seq_mean":
            self.loss_agg = "seq_mean_token_mean"
        self.cliprange_low = self.cliprange if self.cliprange_low is None else self.cliprange_low
        self.cliprange_high = self.cliprange if self.cliprange_high is None else self.cliprange_high

    @property
    def estimator(self) -> core.Estimator:
        return core.ADVANTAGE_ESTIMATORS[self.advantage_estimator]

    @property
    def uses_reference(self) -> bool:
        """False with --kl_coef 0 (an adaptive controller cannot move it from 0): no reference model at all."""
        return self.kl_coef > 0


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
    generation_backend: GenerationBackend = "hf"
    """What samples the rollouts: hf, Hugging Face generate on the actor itself; vllm, a colocated vLLM engine per
    rank that is given the actor's weights after every update (the `[vllm]` extra; README, "Generating with vLLM").
    Log-probs always come from the actor; a model vLLM cannot run stops the run with an error."""
    vllm_kv_cache_gb: float = 1.0
    """With --generation_backend vllm: each rank's vLLM KV cache in GiB (on CPU the engine's fixed reservation, as
    vLLM's VLLM_CPU_KVCACHE_SPACE, which takes precedence when set)."""
    vllm_gpu_memory_utilization: float = 0.3
    """With --generation_backend vllm on GPU: the share of device memory vLLM may take (the training engines share
    the device); it sleeps, memory freed, between rollouts."""

    def __post_init__(self):
        if self.generation_backend == "vllm" and not vllm_installed():
            raise ValueError(f"--generation_backend vllm: the vllm package is not installed; {INSTALL_HINT}")
        if self.vllm_kv_cache_gb <= 0 or not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("--vllm_kv_cache_gb must be > 0 and --vllm_gpu_memory_utilization in (0, 1]")
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
    """Step 3: RL of the step-1 actor against the step-2 reward model or verifiable reward functions: PPO with a
    critic, or a critic-free estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++) over groups of answers."""

    # Dropout off by default (as TRL and OpenRLHF): old log-probs come from eval mode, so a training forward with
    # dropout would start every update at a ratio that is not 1. --actor_dropout / --critic_dropout override it.
    actor: ModelArgs = group(ModelArgs, prefix="actor_", dropout=0.0)
    critic: ModelArgs = group(ModelArgs, prefix="critic_", dropout=0.0)
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
    """The frozen reward model (default: the critic's starting point, as in DeepSpeed-Chat). Used when no
    --reward_function is given, or together with them when given explicitly."""
    reward_function: list[str] = field(default_factory=list)
    """Reward functions `package.module:callable`, each taking (prompts, responses) texts or (prompts, responses,
    metadata), metadata being each example's extra fields from the prompt data (e.g. its reference `answer`);
    they replace the reward model unless --reward_model_name_or_path is given too. Built in:
    chatrlhf.training.step3_ppo.verifiable:final_number_match and :number_format."""
    reward_weights: list[float] = field(default_factory=list)
    """Weights of the summed rewards: one per --reward_function, in order, then one for the reward model when it
    is used with them (default: 1 each)."""
    eval_greedy: bool = False
    """Evaluate held-out prompts with greedy decoding (one deterministic answer each: an accuracy) instead of the
    rollouts' sampling."""
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
    eval_max_answer_seq_len: Optional[int] = None
    """Most tokens per answer in the held-out evaluation; default twice --max_answer_seq_len, so that a policy
    that only learned to stop before the training cap is seen at the length users will ask for."""
    offload_reference_model: bool = False
    """Keep the reference model's parameters in CPU memory (ZeRO-3 offload)."""
    offload_reward_model: bool = False
    """Keep the reward model's parameters in CPU memory (ZeRO-3 offload)."""
    reference_zero_stage: Literal["auto", "0", "3"] = "auto"
    """ZeRO stage of the frozen reference model: 0 (a whole copy on every rank, nothing gathered per forward), 3
    (sharded, gathered layer by layer in every scoring forward), or auto: 0 when its weights take at most a quarter
    of one accelerator's memory (of the host RAM per rank on a CPU), else 3; 3 with --offload_reference_model."""
    reward_zero_stage: Literal["auto", "0", "3"] = "auto"
    """ZeRO stage of the frozen reward model: 0, 3 or auto, as --reference_zero_stage (3 with
    --offload_reward_model)."""
    print_answers: bool = False
    """Print a prompt and its answer with its score every --print_answers_interval steps."""
    print_answers_interval: int = 1
    """Steps between printed answers."""

    def __post_init__(self):
        apply_dschat(self)
        if self.max_answer_seq_len < 1 or self.max_prompt_seq_len < 1:
            raise ValueError("--max_prompt_seq_len and --max_answer_seq_len must be at least 1")
        if self.eval_max_answer_seq_len is not None and self.eval_max_answer_seq_len < 1:
            raise ValueError(f"--eval_max_answer_seq_len must be at least 1, got {self.eval_max_answer_seq_len}")
        for name in ("per_device_generation_batch_size", "per_device_training_batch_size", "print_answers_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        rows = self.per_device_generation_batch_size * self.ppo.generation_batches * self.ppo.n_samples_per_prompt
        if rows % self.per_device_training_batch_size:
            raise ValueError("--per_device_generation_batch_size x --generation_batches x --n_samples_per_prompt "
                             f"({rows} answers per rank and rollout) must be a multiple of "
                             f"--per_device_training_batch_size ({self.per_device_training_batch_size})")
        accumulation = self.actor_optim.gradient_accumulation_steps
        if rows // self.per_device_training_batch_size % accumulation:
            # An optimizer step then lies within one rollout, so its loss can be aggregated over all its rows.
            raise ValueError(f"a rollout's {rows // self.per_device_training_batch_size} minibatches per rank must "
                             f"be a multiple of --gradient_accumulation_steps ({accumulation})")
        if self.reward_weights and len(self.reward_weights) != self.n_rewards:
            raise ValueError(f"--reward_weights: {len(self.reward_weights)} weights for {self.n_rewards} rewards "
                             f"(--reward_function {self.reward_function}"
                             f"{' and the reward model' if self.uses_reward_model else ''})")

    @property
    def eval_answer_len(self) -> int:
        return self.eval_max_answer_seq_len or 2 * self.max_answer_seq_len

    @property
    def uses_reward_model(self) -> bool:
        return not self.reward_function or self.reward_model_name_or_path is not None

    @property
    def n_rewards(self) -> int:
        return len(self.reward_function) + int(self.uses_reward_model)
