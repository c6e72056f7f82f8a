"""Step 2's data: preference pairs (chatrlhf.training.data.preference) from the second --data_split share."""
from __future__ import annotations

from chatrlhf.training.data.pipeline import StepData
from chatrlhf.training.data.preference import PAIR_PROMPT_COLUMNS, PairCollator, tokenize_pairs_with_prompt_length

# The prompt length rides along so that the evaluation can set the reward model against answer length alone.
REWARD_DATA = StepData(name="reward", share=1, tokenize=tokenize_pairs_with_prompt_length,
                       columns=PAIR_PROMPT_COLUMNS, needs_pairs=True)

__all__ = ["REWARD_DATA", "PairCollator"]
