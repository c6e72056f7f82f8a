"""Step 1 settings: the shared groups plus what only SFT has."""
from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.training.config import DataArgs, EngineArgs, ModelArgs, TrainArgs
from chatrlhf.utils.config import group


@dataclass
class SFTConfig:
    """Step 1: supervised fine-tuning of a causal LM on prompt/answer pairs."""

    model: ModelArgs = group(ModelArgs)
    engine: EngineArgs = group(EngineArgs)
    data: DataArgs = group(DataArgs)
    train: TrainArgs = group(TrainArgs, output_dir="output/step1_sft")
    max_seq_len: int = 512
    """Longest prompt + answer in tokens; longer examples follow --overlength."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: answer tokens and the closing EOS only)."""
