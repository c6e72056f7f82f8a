"""Writes docs/FLAGS.md: every flag of every step, with its default and its docstring, from the config dataclasses.

  python applications/flag_reference.py            # rewrite docs/FLAGS.md
  python applications/flag_reference.py --check    # exit 1 if docs/FLAGS.md is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from chatrlhf.utils.config import _flags

DOC = Path(__file__).resolve().parents[1] / "docs" / "FLAGS.md"


def steps():
    from chatrlhf.training.step1_sft.config import SFTConfig
    from chatrlhf.training.step2_reward.config import RewardConfig
    from chatrlhf.training.step3_ppo.config import PPOConfig

    return [("Step 1: SFT (`chatrlhf.training.step1_sft`)", SFTConfig),
            ("Step 2: reward model (`chatrlhf.training.step2_reward`)", RewardConfig),
            ("Step 3: PPO (`chatrlhf.training.step3_ppo`)", PPOConfig)]


def render() -> str:
    lines = ["# Flag reference", "",
             "Generated from the config dataclasses by `python applications/flag_reference.py`; do not edit by hand.",
             "Every flag can also be given in a YAML file (`--config file.yaml`, keys without dashes). Boolean flags",
             "take no value to turn on (`--offload`) or `true`/`false`.", ""]
    for title, cls in steps():
        lines += [f"## {title}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for name, _, _, default, doc in _flags(cls):
            shown = "(required)" if default is dataclasses.MISSING else f"`{default}`"
            lines.append(f"| `--{name}` | {shown} | {doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            raise SystemExit(f"{DOC} is out of date: run python applications/flag_reference.py")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
