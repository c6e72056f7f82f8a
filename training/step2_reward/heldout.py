"""A trained reward model on every preference pair it never trained on: step 2's eval split plus the whole of the
later --data_split shares (step 3 learns from their prompts only), split exactly as step 2 split them.

  python -m chatrlhf.training.step2_reward.heldout --model_name_or_path output/step2_reward

Step 2's own evaluation rests on its eval split (199 pairs in the demo, 46 of them of about equal length: a
standard error of 0.07 there); the demo's data holds about 5x as many unseen pairs. The data settings (data_path,
data_split, seed, max_seq_len, eval_fraction, ...) are read from the model folder's chatrlhf_config.yaml. Prints
the accuracy, "the shorter answer wins" and the accuracy on pairs within 20% in length, each with its standard
error; --output_file writes one JSON line per pair, --baseline_file (another model's output file, the same pairs)
adds the paired difference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from chatrlhf.training.step2_reward.trainer import LENGTH_CONTROLLED, pair_scores
from chatrlhf.utils.stats import mean_se


@dataclass
class HeldoutConfig:
    """Score a step-2 reward model on all the preference pairs it never trained on."""

    model_name_or_path: str = "output/step2_reward"
    """A step-2 output folder (it holds chatrlhf_config.yaml, the data settings it was trained with)."""
    shares: list[int] = field(default_factory=lambda: [2])
    """The --data_split shares (from 0) scored whole, next to step 2's eval split; default: step 3's."""
    batch_size: int = 32
    """Pairs per forward pass."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Precision to load the model in."""
    output_file: Optional[str] = None
    """Write one JSON line per pair: {set, index, chosen, rejected, chosen_length, rejected_length}."""
    baseline_file: Optional[str] = None
    """Another model's --output_file on the same pairs: print the paired differences too."""


def pair_rows(model, dataset, collate, batch_size: int, name: str) -> list[dict]:
    """One {set, index, chosen, rejected, chosen_length, rejected_length} row per pair of `dataset`."""
    from chatrlhf.training.loop import eval_loader

    rows = []
    with torch.no_grad():
        for batch in eval_loader(dataset, batch_size, collate):
            chosen, rejected = pair_scores(model, batch)
            lc, lr = batch["answer_lengths"].chunk(2)
            for c, r, a, b in zip(chosen.double().tolist(), rejected.double().tolist(), lc.tolist(), lr.tolist()):
                rows.append({"set": name, "index": len(rows), "chosen": c, "rejected": r,
                             "chosen_length": a, "rejected_length": b})
    return rows


def _close(row: dict) -> bool:
    """Answers within 20% of each other's length: step 2's length-controlled pairs (trainer.evaluate's rule)."""
    longer = max(row["chosen_length"], row["rejected_length"])
    return abs(row["chosen_length"] - row["rejected_length"]) < LENGTH_CONTROLLED * longer


def summarize(rows: list[dict]) -> dict:
    """accuracy, shorter_wins (ties half) and accuracy_length_controlled, each with its standard error (`_se`)."""
    correct = [float(r["chosen"] > r["rejected"]) for r in rows]
    shorter = [1.0 if r["chosen_length"] < r["rejected_length"] else 0.5 if r["chosen_length"] == r["rejected_length"]
               else 0.0 for r in rows]
    close = [c for c, r in zip(correct, rows) if _close(r)]
    out = {"pairs": len(rows), "length_controlled_pairs": len(close)}
    for key, values in (("accuracy", correct), ("shorter_wins", shorter), ("accuracy_length_controlled", close)):
        out[key], out[key + "_se"] = mean_se(values)
    return out


def paired(rows: list[dict], baseline: list[dict]) -> dict:
    """The accuracy differences (this model - baseline) pair by pair, overall and on the length-controlled pairs."""
    if [(r["set"], r["index"]) for r in rows] != [(r["set"], r["index"]) for r in baseline]:
        raise ValueError("--baseline_file holds other pairs than this evaluation (another data config?)")
    diffs = [float(a["chosen"] > a["rejected"]) - float(b["chosen"] > b["rejected"]) for a, b in zip(rows, baseline)]
    out = {}
    for key, values in (("accuracy_diff", diffs),
                        ("accuracy_length_controlled_diff", [d for d, r in zip(diffs, rows) if _close(r)])):
        out[key], out[key + "_se"] = mean_se(values)
    return out


def main(argv: list[str] | None = None) -> dict:
    from chatrlhf.training.reward_model import load_reward_model
    from chatrlhf.training.step2_reward.config import RewardConfig
    from chatrlhf.training.step2_reward.data import PairCollator, check_unseen_shares, unseen_pairs
    from chatrlhf.utils.config import CONFIG_FILE, parse_config

    cfg = parse_config(HeldoutConfig, argv)
    saved = Path(cfg.model_name_or_path) / CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"--model_name_or_path: {saved} is missing: this needs a step-2 output folder, whose "
                                f"data settings it reuses")
    check_unseen_shares(cfg.shares, "--shares")
    step2 = parse_config(RewardConfig, ["--config", str(saved)])
    model, tokenizer = load_reward_model(cfg.model_name_or_path, cfg.dtype)
    parts = unseen_pairs(step2.data, tokenizer, cfg.shares, seed=step2.train.seed, max_seq_len=step2.train.max_seq_len)
    rows = []
    for name, dataset in parts:
        rows += pair_rows(model, dataset, PairCollator(tokenizer), cfg.batch_size, name)
    out = summarize(rows)
    print(f"{cfg.model_name_or_path}: {out['pairs']} unseen pairs: accuracy {out['accuracy']:.3f} +- "
          f"{out['accuracy_se']:.3f}; the shorter answer wins {out['shorter_wins']:.3f}; on the "
          f"{out['length_controlled_pairs']} pairs within 20% in length {out['accuracy_length_controlled']:.3f} +- "
          f"{out['accuracy_length_controlled_se']:.3f}")
    if cfg.baseline_file:
        baseline = [json.loads(line) for line in Path(cfg.baseline_file).read_text().splitlines() if line.strip()]
        diff = paired(rows, baseline)
        print(f"against {cfg.baseline_file}, pair by pair: accuracy {diff['accuracy_diff']:+.3f} +- "
              f"{diff['accuracy_diff_se']:.3f}; length-controlled {diff['accuracy_length_controlled_diff']:+.3f} +- "
              f"{diff['accuracy_length_controlled_diff_se']:.3f}")
        out.update(diff)
    if cfg.output_file:
        Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


if __name__ == "__main__":
    main()
