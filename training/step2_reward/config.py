"""Step 2 settings: the shared groups with reward-model defaults, plus what only step 2 has."""
from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.training.config import DataArgs, EngineArgs, ModelArgs, TrainArgs
from chatrlhf.utils.config import group


@dataclass
class RewardConfig:
    """Step 2: a pairwise (Bradley-Terry) reward model trained from any causal LM."""

    # DeepSpeed-Chat's step-2 learning rate; evaluation every 100 steps so a run shows its accuracy curve.
    model: ModelArgs = group(ModelArgs, learning_rate=5e-5)
    engine: EngineArgs = group(EngineArgs)
    data: DataArgs = group(DataArgs)
    train: TrainArgs = group(TrainArgs, output_dir="output/step2_reward", eval_interval=100)
    max_seq_len: int = 512
    """Longest prompt + answer in tokens (per answer); longer pairs follow --overlength."""
    num_padding_at_beginning: int = 0
    """Accepted for DeepSpeed-Chat compatibility and ignored: chatrlhf reads the score at the last position where
    attention_mask is 1, which needs no OPT-specific count of leading pad tokens."""
    margin: float = 0.0
    """Margin m in the loss -logsigmoid(chosen - rejected - m): the chosen score must beat the rejected by m."""
    center_coef: float = 0.0
    """Weight of the centring penalty coef * mean((chosen + rejected)^2), which keeps scores near 0
    (TRL's center_rewards_coefficient; 0.01 is a usual value)."""

    def __post_init__(self):
        if self.max_seq_len < 2:
            raise ValueError(f"--max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.center_coef < 0:
            raise ValueError(f"--center_coef must be >= 0, got {self.center_coef}")
        if self.num_padding_at_beginning < 0:
            raise ValueError(f"--num_padding_at_beginning must be >= 0, got {self.num_padding_at_beginning}")
