"""Step 2 (alternative to the reward model): the shared groups with DPO defaults, plus what only DPO has."""
from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.training.config import (DataArgs, DSChatArgs, EngineArgs, ModelArgs, OptimArgs, TrainArgs,
                                      apply_dschat)
from chatrlhf.training.step2_dpo.loss import LOSS_TYPES, REFERENCE_FREE
from chatrlhf.utils.config import group


@dataclass
class DPOConfig:
    """Step 2, DPO: direct preference optimisation (DPO, cDPO, IPO, SimPO) of a causal LM on preference pairs."""

    model: ModelArgs = group(ModelArgs)
    # DPO moves a model far with little signal: TRL's default learning rate; evaluation every 100 steps.
    optim: OptimArgs = group(OptimArgs, learning_rate=1e-6)
    engine: EngineArgs = group(EngineArgs)
    data: DataArgs = group(DataArgs)
    train: TrainArgs = group(TrainArgs, output_dir="output/step2_dpo", eval_interval=100)
    dschat: DSChatArgs = group(DSChatArgs)
    beta: float = 0.1
    """Temperature of the DPO loss, typically 0.1 to 0.5 (the implicit reward is beta * log-ratio to the
    reference); the reference matters less as beta -> 0. SimPO's paper uses 2.0 to 2.5."""
    label_smoothing: float = 0.0
    """Conservativeness (cDPO): preferences are assumed flipped with this probability, in [0, 0.5). With the
    sigmoid loss this is DeepSpeed-Chat's loss exactly."""
    loss_type: str = "sigmoid"
    """The preference loss (chatrlhf.training.step2_dpo.loss.LOSS_TYPES): sigmoid (DPO), cdpo (DPO with
    --label_smoothing > 0), ipo, simpo (reference-free, length-normalised, margin --simpo_gamma)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma: the loss is -logsigmoid(beta * (mean log-prob chosen - rejected) - gamma)."""
    reference_free: bool = False
    """Use no reference model (its log-probabilities are taken as 0): the implicit reward is beta * log-prob."""
    precompute_ref_logprobs: bool = False
    """Score every pair with the reference once before training, then release it: training holds one model.
    (Automatic with LoRA whose base weights train too, i.e. without --only_optimize_lora.)"""
    offload_reference_model: bool = False
    """Keep the reference model's parameters in CPU memory (ZeRO-3 offload; DeepSpeed-Chat's flag)."""

    def __post_init__(self):
        apply_dschat(self)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "cdpo" and self.label_smoothing == 0:
            raise ValueError("--loss_type cdpo needs --label_smoothing > 0 (e.g. 0.1); with 0 it is plain sigmoid")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("--label_smoothing does not apply to --loss_type ipo")
        if self.simpo_gamma < 0:
            raise ValueError(f"--simpo_gamma must be >= 0, got {self.simpo_gamma}")
        if self.precompute_ref_logprobs and (self.reference_free or self.loss_type in REFERENCE_FREE):
            raise ValueError("--precompute_ref_logprobs needs a reference, but "
                             + ("--reference_free" if self.reference_free else f"--loss_type {self.loss_type}")
                             + " uses none")

    def uses_reference(self) -> bool:
        """Whether the loss compares with a reference model (not --reference_free, not SimPO)."""
        return not (self.reference_free or self.loss_type in REFERENCE_FREE)
