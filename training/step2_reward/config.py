"""Step 2 settings: the shared groups with reward-model defaults, plus what only step 2 has."""
from __future__ import annotations

from dataclasses import dataclass, field

from chatrlhf.training.config import (DataArgs, DSChatArgs, EngineArgs, ModelArgs, OptimArgs, TrainArgs,
                                      apply_dschat)
from chatrlhf.utils.config import group


@dataclass
class RewardConfig:
    """Step 2: a pairwise (Bradley-Terry) reward model trained from any causal LM."""

    model: ModelArgs = group(ModelArgs)
    # DeepSpeed-Chat's step-2 learning rate; evaluation every 100 steps so a run shows its accuracy curve.
    optim: OptimArgs = group(OptimArgs, learning_rate=5e-5)
    engine: EngineArgs = group(EngineArgs)
    data: DataArgs = group(DataArgs)
    train: TrainArgs = group(TrainArgs, output_dir="output/step2_reward", eval_interval=100)
    dschat: DSChatArgs = group(DSChatArgs)
    margin: float = 0.0
    """Margin m in the loss -logsigmoid(chosen - rejected - m): the chosen score must beat the rejected by m."""
    center_coef: float = 0.0
    """Weight of the centring penalty coef * mean((chosen + rejected)^2), which keeps scores near 0
    (TRL's center_rewards_coefficient; 0.01 is a usual value)."""
    length_debias: bool = False
    """Train against the data's length bias: fit P(chosen wins) = sigmoid(s * (rejected - chosen answer length))
    on the training pairs (length alone, one parameter) and add s * (chosen - rejected length) to each pair's
    margin, so the model learns what length does not explain (product-of-experts debiasing with a length-only
    expert). Scores and evaluations are the model's alone."""
    heldout_shares: list[int] = field(default_factory=list)
    """After training, also score every pair of these --data_split shares (from 0; step 3's is 2, whose prompts
    alone it learns from) together with the eval split, as one set: heldout/* metrics on several times the eval
    split's pairs. Default: none."""

    def __post_init__(self):
        apply_dschat(self)
        if self.center_coef < 0:
            raise ValueError(f"--center_coef must be >= 0, got {self.center_coef}")
