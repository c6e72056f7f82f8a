"""Step 1 settings: the shared groups plus what only SFT has."""
from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.training.config import (DataArgs, DSChatArgs, EngineArgs, ModelArgs, OptimArgs, TrainArgs,
                                      apply_dschat)
from chatrlhf.utils.config import group


@dataclass
class SFTConfig:
    """Step 1: supervised fine-tuning of a causal LM on prompt/answer pairs."""

    model: ModelArgs = group(ModelArgs)
    optim: OptimArgs = group(OptimArgs)
    engine: EngineArgs = group(EngineArgs)
    data: DataArgs = group(DataArgs)
    train: TrainArgs = group(TrainArgs, output_dir="output/step1_sft")
    dschat: DSChatArgs = group(DSChatArgs)
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: answer tokens and the closing EOS only)."""

    def __post_init__(self):
        apply_dschat(self)
