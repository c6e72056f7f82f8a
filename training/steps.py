"""The step registry: every runnable step, by the names the pipeline, the flag reference and the docs use.

Adding a step is its own package plus one line here. Modules are named, not imported, so reading the registry
costs nothing and no shared module imports a step. Two steps may share a number: they are alternatives for that
place in the pipeline (`method`), e.g. step 2 trains a reward model (for PPO, step 3) or the policy itself by DPO.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    number: int      # the pipeline's --step number
    name: str        # output sub-folder and log name; the registry key
    title: str
    module: str      # runs as `python -m` / `deepspeed --module`; its main.py has run(config) and main(argv)
    config: str      # "module:Class"
    method: str = ""  # for alternatives at one number: the pipeline's --step2-method value that picks it

    def config_class(self):
        module, cls = self.config.split(":")
        return getattr(importlib.import_module(module), cls)


STEPS = {s.name: s for s in (
    Step(1, "step1_sft", "SFT", "chatrlhf.training.step1_sft", "chatrlhf.training.step1_sft.config:SFTConfig"),
    Step(2, "step2_reward", "reward model", "chatrlhf.training.step2_reward",
         "chatrlhf.training.step2_reward.config:RewardConfig", method="reward"),
    Step(2, "step2_dpo", "DPO", "chatrlhf.training.step2_dpo", "chatrlhf.training.step2_dpo.config:DPOConfig",
         method="dpo"),
    Step(3, "step3_ppo", "PPO", "chatrlhf.training.step3_ppo", "chatrlhf.training.step3_ppo.config:PPOConfig"),
)}

# What each step-2 method is followed by: the reward model feeds PPO; DPO trains the final model itself.
STEP2_METHODS = {"reward": (1, 2, 3), "dpo": (1, 2)}


def pipeline_steps(step2_method: str = "reward") -> dict[int, Step]:
    """{number: step} of the pipeline whose step 2 is `step2_method` (reward: SFT, reward model, PPO; dpo: SFT,
    DPO)."""
    if step2_method not in STEP2_METHODS:
        raise ValueError(f"unknown step-2 method {step2_method!r}; accepted: {', '.join(STEP2_METHODS)}")
    chosen = {}
    for step in STEPS.values():
        if step.number in STEP2_METHODS[step2_method] and step.method in ("", step2_method):
            chosen[step.number] = step
    return chosen
