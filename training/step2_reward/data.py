"""Step 2's data: preference pairs (chatrlhf.training.data.preference) from the second --data_split share."""
from __future__ import annotations

import dataclasses

from chatrlhf.training.data.pipeline import StepData, load_phase_data
from chatrlhf.training.data.preference import PAIR_PROMPT_COLUMNS, PairCollator, tokenize_pairs_with_prompt_length

# The prompt length rides along so that the evaluation can set the reward model against answer length alone.
REWARD_DATA = StepData(name="reward", share=1, tokenize=tokenize_pairs_with_prompt_length,
                       columns=PAIR_PROMPT_COLUMNS, needs_pairs=True)


def check_unseen_shares(shares, flag: str) -> None:
    """Refuses, naming `flag`, a share list that holds step 2's own (training) share or a negative index."""
    if REWARD_DATA.share in shares or any(s < 0 for s in shares):
        raise ValueError(f"{flag}: {list(shares)}: the --data_split shares count from 0, and step 2's own share "
                         f"({REWARD_DATA.share}) holds its training pairs, which are not unseen")


def unseen_pairs(data_args, tokenizer, shares, *, seed: int, max_seq_len: int, own_eval=None) -> list:
    """[(name, Dataset)] of every pair step 2 never trains on: its eval split (`own_eval` when already loaded) and
    the whole of each later --data_split share in `shares` (step 3 learns from their prompts only), split and
    tokenised exactly as step 2 splits and tokenises its own."""
    options = dict(seed=seed, max_seq_len=max_seq_len)
    if own_eval is None:
        own_eval = load_phase_data(data_args, REWARD_DATA, tokenizer, **options).eval
    parts = [("step2_eval", own_eval)]
    for share in shares:
        data = load_phase_data(data_args, dataclasses.replace(REWARD_DATA, share=share), tokenizer, **options)
        parts += [(f"share{share}_train", data.train), (f"share{share}_eval", data.eval)]
    return parts


__all__ = ["REWARD_DATA", "PairCollator", "check_unseen_shares", "unseen_pairs"]
