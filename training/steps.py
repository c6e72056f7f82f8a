"""The step registry: every runnable step, by the names the pipeline, the flag reference and the docs use.

Adding a step is its own package plus one line here. Modules are named, not imported, so reading the registry
costs nothing and no shared module imports a step.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    number: int      # the pipeline's --step number
    name: str        # output sub-folder and log name
    title: str
    module: str      # runs as `python -m` / `deepspeed --module`; its main.py has run(config) and main(argv)
    config: str      # "module:Class"

    def config_class(self):
        module, cls = self.config.split(":")
        return getattr(importlib.import_module(module), cls)


STEPS = {
    1: Step(1, "step1_sft", "SFT", "chatrlhf.training.step1_sft", "chatrlhf.training.step1_sft.config:SFTConfig"),
    2: Step(2, "step2_reward", "reward model", "chatrlhf.training.step2_reward",
            "chatrlhf.training.step2_reward.config:RewardConfig"),
    3: Step(3, "step3_ppo", "PPO", "chatrlhf.training.step3_ppo", "chatrlhf.training.step3_ppo.config:PPOConfig"),
}
